"""A model folder over HTTP: its file list, one file, or the whole folder as one archive, resumable by Range.

Two archives:

* ``tar_gz_stream``: the folder as a gzip-compressed tar, produced as the client reads it (the original
  ``/artifacts/model.tar.gz``). A gzip stream cannot start at an offset, so it cannot resume.
* ``tar_layout``: the folder as a plain, deterministic tar whose every byte offset is computed from the file list
  (name, size, mtime) before a byte is read: each member is a PAX header (``tarfile.TarInfo.tobuf``, no I/O),
  the file's bytes, zero padding to 512; then the 1024-byte end marker. So ``Content-Length`` is known, and a
  request for ``bytes=N-`` streams from offset N without building the archive. safetensors barely compress, so
  the plain tar costs little over the gzip one.

Both one file and the plain tar are served by :func:`ranged_response` (RFC 9110): ``Accept-Ranges: bytes``,
a strong ``ETag`` and ``Last-Modified``, 206 with ``Content-Range`` for one satisfiable range, 416 (with
``Content-Range: bytes */size``) when none is, 200 with the whole body when the ``If-Range`` validator is stale,
for a malformed Range (which RFC 9110 says to ignore) and for several ranges (a server may answer those whole).
Starlette's ``FileResponse`` does ranges for one file, but answers 416 and a malformed Range as plain text (400
for the latter), and cannot serve the archive; one implementation serves both here.

Symlinks are left out everywhere: a download holds only what the export wrote, and a path never leaves its
folder (:func:`folder_file`). Files are read as they stream; if one changed since the layout was computed (the
folder was replaced), the stream is cut short rather than mixing two versions, and the client's retry gets the
new ETag.

A folder is on this disk (a ``Path``: the fast path, one machine or a shared volume) or only in the shared storage
(a :class:`StoredFolder`, ``app.storage``: workers on other machines pushed it, marker last). :func:`open_folder`
picks. A stored folder's manifest keeps every file's size and mtime, so its listing, its tars (both) and its
files are byte for byte what the same folder on disk gives; only the ETag differs (it names the stored objects'
versions, so a folder pushed again gets a new one).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import stat
import tarfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from email.utils import formatdate, parsedate_to_datetime
from pathlib import Path

from fastapi import Request
from fastapi.responses import StreamingResponse

from app.api.errors import RETRY_AFTER_SECONDS, ApiError
from app.storage import FolderManifest, ObjectInfo, Storage, StorageError

logger = logging.getLogger(__name__)

CHUNK = 1 << 20
GZIP_LEVEL = 1  # safetensors barely compress; level 1 keeps the stream fast
TAR_LAYOUT_VERSION = 1  # in the ETag: a change of how the tar is laid out must not match an old download
_RANGE = re.compile(r"^\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class StoredFolder:
    """A complete folder in the shared storage: its manifest (the marker) and its objects' versions, read once
    when a response is laid out."""

    storage: Storage
    key: str
    manifest: FolderManifest
    objects: dict[str, ObjectInfo]

    def visible_files(self) -> list[str]:
        """The files a download shows: as :func:`export_files` on disk, hidden names and folders left out."""
        return sorted(name for name in self.manifest.files
                      if not any(part.startswith(".") for part in name.split("/")))

    def folder_mtime(self, relative: str) -> float:
        return self.manifest.folders.get(relative, self.manifest.folders.get("", 0)) / 1e9


Folder = Path | StoredFolder


def open_folder(local: Path, storage: Storage | None, key: str) -> Folder | None:
    """The folder on this disk when it is here (fast path), else its complete copy in ``storage`` under ``key``,
    else None. A folder in the storage without its marker (a push in progress) is None. An unreachable storage
    is the API's 503 (:func:`storage_unavailable`)."""
    if local.is_dir():
        return local
    if storage is None:
        return None
    try:
        manifest = storage.folder_manifest(key)
        if manifest is None:
            return None
        return StoredFolder(storage, key, manifest, storage.list(key))
    except StorageError as error:
        raise storage_unavailable(error) from None


def storage_unavailable(error: StorageError) -> ApiError:
    """The 503 of a request the shared storage could not serve; what failed goes to the log, not the client."""
    logger.warning("shared storage unavailable: %s", error)
    return ApiError(503, "service_unavailable", "the service's shared storage is unavailable right now; retry in "
                    f"{RETRY_AFTER_SECONDS} s", headers={"Retry-After": str(RETRY_AFTER_SECONDS)})


def export_files(folder: Folder) -> list[tuple[str, Path | str, int]]:
    """``(relative posix path, absolute path or storage key, size)`` of every regular file under ``folder``,
    sorted. Hidden entries (a staging folder being written next to a materialised model) and symlinks are left
    out."""
    if isinstance(folder, StoredFolder):
        return [(name, f"{folder.key}/{name}", folder.manifest.files[name].size) for name in folder.visible_files()]
    files: list[tuple[str, Path | str, int]] = []
    for root, dirs, names in os.walk(folder, followlinks=False):
        dirs[:] = sorted(name for name in dirs if not name.startswith("."))
        for name in names:
            path = Path(root) / name
            if name.startswith(".") or path.is_symlink() or not path.is_file():
                continue
            try:
                size = path.stat().st_size
            except FileNotFoundError:  # a checkpoint pruned while it was listed
                continue
            files.append((path.relative_to(folder).as_posix(), path, size))
    return sorted(files)


def _gzip_emitter(compressor: zlib._Compress) -> Callable[[bytes], Iterator[bytes]]:
    """``emit(data)``: what ``compressor`` gives back for ``data`` (nothing until it has a block), as chunks."""

    def emit(data: bytes) -> Iterator[bytes]:
        out = compressor.compress(data)
        if out:
            yield out

    return emit


def _directory_header(name: str, mtime: float) -> bytes:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, int(mtime)
    return info.tobuf(format=tarfile.PAX_FORMAT)


def tar_gz_stream(folder: Folder, root_name: str) -> Iterator[bytes]:
    """The folder as ``root_name/...`` in a gzip-compressed tar, in chunks."""
    if isinstance(folder, StoredFolder):
        yield from _stored_tar_gz_stream(folder, root_name)
        return
    compressor = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, 16 + zlib.MAX_WBITS)  # 16+: the gzip container
    emit = _gzip_emitter(compressor)
    seen_dirs: set[str] = set()

    yield from emit(_directory_header(root_name, folder.stat().st_mtime))
    for relative, path, _size in export_files(folder):
        assert isinstance(path, Path)  # a folder on disk lists paths
        parts = relative.split("/")[:-1]
        for depth in range(1, len(parts) + 1):
            sub = "/".join(parts[:depth])
            if sub not in seen_dirs:
                seen_dirs.add(sub)
                yield from emit(_directory_header(f"{root_name}/{sub}", (folder / sub).stat().st_mtime))
        with path.open("rb") as handle:
            opened = os.fstat(handle.fileno())
            info = tarfile.TarInfo(f"{root_name}/{relative}")
            info.size, info.mode, info.mtime = opened.st_size, 0o644, int(opened.st_mtime)
            yield from emit(info.tobuf(format=tarfile.PAX_FORMAT))
            remaining = opened.st_size
            while remaining:  # exactly the size in the header, even if the file changes meanwhile
                chunk = handle.read(min(CHUNK, remaining)) or b"\0" * min(CHUNK, remaining)
                remaining -= len(chunk)
                yield from emit(chunk)
        padding = (-opened.st_size) % tarfile.BLOCKSIZE
        if padding:
            yield from emit(b"\0" * padding)
    yield from emit(b"\0" * (2 * tarfile.BLOCKSIZE))  # end-of-archive marker
    tail = compressor.flush()
    if tail:
        yield tail


def _stored_tar_gz_stream(folder: StoredFolder, root_name: str) -> Iterator[bytes]:
    """:func:`tar_gz_stream` of a stored folder: the same headers (sizes and mtimes from its manifest), the
    files' bytes read from the storage as the client reads."""
    compressor = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    emit = _gzip_emitter(compressor)
    seen_dirs: set[str] = set()
    yield from emit(_directory_header(root_name, folder.folder_mtime("")))
    for relative in folder.visible_files():
        parts = relative.split("/")[:-1]
        for depth in range(1, len(parts) + 1):
            sub = "/".join(parts[:depth])
            if sub not in seen_dirs:
                seen_dirs.add(sub)
                yield from emit(_directory_header(f"{root_name}/{sub}", folder.folder_mtime(sub)))
        part = _stored_part(folder, relative)
        info = tarfile.TarInfo(f"{root_name}/{relative}")
        info.size, info.mode, info.mtime = part.size, 0o644, part.mtime_ns // 1_000_000_000
        yield from emit(info.tobuf(format=tarfile.PAX_FORMAT))
        for chunk in part.storage.read(part.key, 0, part.size, expect=part.expect):
            yield from emit(chunk)
        padding = (-part.size) % tarfile.BLOCKSIZE
        if padding:
            yield from emit(b"\0" * padding)
    yield from emit(b"\0" * (2 * tarfile.BLOCKSIZE))
    tail = compressor.flush()
    if tail:
        yield tail


# ------------------------------------------------------------------------------- byte sources with offsets


@dataclass(frozen=True)
class FilePart:
    """A file's bytes inside a download, with what it looked like when the layout was computed."""

    path: Path
    size: int
    mtime_ns: int
    inode: int

    @property
    def identity(self) -> str:
        return f"{self.size}\0{self.mtime_ns}\0{self.inode}"


@dataclass(frozen=True)
class StoredPart:
    """An object's bytes inside a download: its size, the mtime its manifest recorded, and the version it had
    when the layout was computed (a rewritten object cuts the stream, as a replaced file does)."""

    storage: Storage
    key: str
    size: int
    mtime_ns: int
    expect: ObjectInfo

    @property
    def identity(self) -> str:
        return f"{self.size}\0{self.mtime_ns}\0{self.expect.version}"


@dataclass(frozen=True)
class Layout:
    """A download as consecutive parts (literal bytes, a file or a stored object), with its total size and
    validators."""

    parts: tuple[bytes | FilePart | StoredPart, ...]
    size: int
    etag: str  # strong: equal ETags mean equal bytes
    mtime: float  # Last-Modified: the newest file's

    def stream(self, start: int, end: int) -> Iterator[bytes]:
        """Bytes ``start`` to ``end`` (inclusive), reading each file only for the slice that overlaps."""
        offset = 0
        for part in self.parts:
            length = len(part) if isinstance(part, bytes) else part.size
            lo, hi = max(start, offset), min(end + 1, offset + length)
            if lo < hi:
                if isinstance(part, bytes):
                    yield part[lo - offset:hi - offset]
                elif isinstance(part, StoredPart):
                    yield from part.storage.read(part.key, lo - offset, hi - offset, expect=part.expect)
                else:
                    yield from _read_file(part, lo - offset, hi - offset)
            offset += length
            if offset > end:
                return


def _stored_part(folder: StoredFolder, relative: str) -> StoredPart:
    entry = folder.manifest.files[relative]
    # An object the listing lacks is read as its manifest says, and fails there: the stream is cut short.
    expect = folder.objects.get(relative, ObjectInfo(size=entry.size, version=""))
    return StoredPart(folder.storage, f"{folder.key}/{relative}", entry.size, entry.mtime_ns, expect)


def _file_part(path: Path) -> FilePart:
    info = os.stat(path, follow_symlinks=False)
    return FilePart(path=path, size=info.st_size, mtime_ns=info.st_mtime_ns, inode=info.st_ino)


def _read_file(part: FilePart, start: int, stop: int) -> Iterator[bytes]:
    with part.path.open("rb") as handle:
        info = os.fstat(handle.fileno())
        if (info.st_size, info.st_mtime_ns, info.st_ino) != (part.size, part.mtime_ns, part.inode):
            # The folder was replaced since the response began: cut the stream (the client sees a short body and
            # retries, getting the new ETag) rather than send bytes of two versions under one validator.
            raise OSError(f"{part.path} changed while it was being downloaded")
        handle.seek(start)
        remaining = stop - start
        while remaining:
            chunk = handle.read(min(CHUNK, remaining))
            if not chunk:
                raise OSError(f"{part.path} is shorter than when the download began")
            remaining -= len(chunk)
            yield chunk


def _etag(kind: str, parts: list[tuple[str, FilePart]] | list[tuple[str, StoredPart]]) -> str:
    digest = hashlib.sha256(f"{kind}:{TAR_LAYOUT_VERSION}".encode())
    for name, part in parts:
        digest.update(f"\0{name}\0{part.identity}".encode())
    return f'"{digest.hexdigest()[:32]}"'


def file_layout(path: Path) -> Layout:
    part = _file_part(path)
    return Layout(parts=(part,), size=part.size, etag=_etag("file", [(path.name, part)]), mtime=part.mtime_ns / 1e9)


def _stored_file_layout(folder: StoredFolder, relative: str) -> Layout:
    part = _stored_part(folder, relative)
    name = relative.rsplit("/", 1)[-1]
    return Layout(parts=(part,), size=part.size, etag=_etag("stored-file", [(name, part)]), mtime=part.mtime_ns / 1e9)


def tar_layout(folder: Folder, root_name: str) -> Layout:
    """The folder as an uncompressed tar of ``root_name/<relative path>``, laid out without reading a file.
    Directory entries carry the newest file's mtime, so the layout depends on the file list alone."""
    files: list[tuple[str, FilePart]] | list[tuple[str, StoredPart]]
    if isinstance(folder, StoredFolder):
        files = [(relative, _stored_part(folder, relative)) for relative in folder.visible_files()]
        kind = f"stored-tar:{root_name}"
    else:
        files = [(relative, _file_part(Path(path))) for relative, path, _ in export_files(folder)]
        kind = f"tar:{root_name}"
    newest = max((part.mtime_ns for _, part in files), default=0)
    parts: list[bytes | FilePart | StoredPart] = []

    def header(name: str, *, size: int = 0, mtime_ns: int, directory: bool = False) -> bytes:
        info = tarfile.TarInfo(name)
        info.size, info.mtime = size, mtime_ns // 1_000_000_000
        info.type, info.mode = (tarfile.DIRTYPE, 0o755) if directory else (tarfile.REGTYPE, 0o644)
        info.uname = info.gname = ""
        return info.tobuf(format=tarfile.PAX_FORMAT)

    parts.append(header(f"{root_name}/", mtime_ns=newest, directory=True))
    seen: set[str] = set()
    for relative, part in files:
        folders = relative.split("/")[:-1]
        for depth in range(1, len(folders) + 1):
            sub = "/".join(folders[:depth])
            if sub not in seen:
                seen.add(sub)
                parts.append(header(f"{root_name}/{sub}/", mtime_ns=newest, directory=True))
        parts.append(header(f"{root_name}/{relative}", size=part.size, mtime_ns=part.mtime_ns))
        parts.append(part)
        if part.size % tarfile.BLOCKSIZE:
            parts.append(b"\0" * (-part.size % tarfile.BLOCKSIZE))
    parts.append(b"\0" * (2 * tarfile.BLOCKSIZE))  # end-of-archive marker
    size = sum(len(part) if isinstance(part, bytes) else part.size for part in parts)
    return Layout(parts=tuple(parts), size=size, etag=_etag(kind, files), mtime=newest / 1e9)


# ------------------------------------------------------------------------------------------ Range


def requested_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The one byte range (first, last; inclusive) a Range header asks of ``size`` bytes, clamped to the end, or
    None to send the whole body with 200 (no header, a malformed one, several ranges). A range that covers
    everything (``bytes=0-``, how download managers probe for resume support) is still a 206. Raises the 416 when
    the range is syntactically fine but starts past the end (or asks for the last 0 bytes)."""
    if header is None:
        return None
    match = _RANGE.match(header)
    if match is None:
        return None  # RFC 9110 14.2: a server ignores a Range it does not understand (several ranges included)
    first, last = match.group(1), match.group(2)
    if not first and not last:
        return None
    if not first:  # bytes=-N: the last N bytes
        suffix = int(last)
        if suffix == 0 or size == 0:
            raise _unsatisfiable(header, size)
        start, end = max(0, size - suffix), size - 1
    else:
        start = int(first)
        end = min(int(last), size - 1) if last else size - 1
        if last and int(last) < start:
            return None  # an invalid range-spec: ignored like a malformed header
        if start >= size:
            raise _unsatisfiable(header, size)
    return start, end


def _unsatisfiable(header: str, size: int) -> ApiError:
    return ApiError(416, "range_not_satisfiable",
                    f"Range {header!r} starts past the end of this {size}-byte file; ask for bytes=0-{max(size - 1, 0)} "
                    "or fewer, or drop the Range header for the whole file", "Range",
                    headers={"Content-Range": f"bytes */{size}", "Accept-Ranges": "bytes"})


def _validator_matches(if_range: str, layout: Layout, last_modified: str) -> bool:
    """RFC 9110 13.1.5: a strong ETag must match exactly (a weak one never does); a date must equal
    Last-Modified (to the second)."""
    value = if_range.strip()
    if value.startswith('"') or value.startswith("W/"):
        return value == layout.etag
    try:
        return parsedate_to_datetime(value) == parsedate_to_datetime(last_modified)
    except (TypeError, ValueError):
        return False


def ranged_response(request: Request, layout: Layout, *, media_type: str, filename: str) -> StreamingResponse:
    """``layout`` whole (200) or the one range the request asks (206), per RFC 9110 (module docstring)."""
    last_modified = formatdate(layout.mtime, usegmt=True)
    headers = {
        "Accept-Ranges": "bytes", "ETag": layout.etag, "Last-Modified": last_modified,
        "Content-Disposition": f'attachment; filename="{filename}"',
    }
    wanted = None
    if_range = request.headers.get("if-range")
    if if_range is None or _validator_matches(if_range, layout, last_modified):
        wanted = requested_range(request.headers.get("range"), layout.size)
    if wanted is None:
        headers["Content-Length"] = str(layout.size)
        return StreamingResponse(layout.stream(0, layout.size - 1) if layout.size else iter(()), status_code=200,
                                 media_type=media_type, headers=headers)
    start, end = wanted
    headers["Content-Range"] = f"bytes {start}-{end}/{layout.size}"
    headers["Content-Length"] = str(end - start + 1)
    return StreamingResponse(layout.stream(start, end), status_code=206, media_type=media_type, headers=headers)


# ------------------------------------------------------------------------------------------ one file


def _safe_relative(relative: str) -> bool:
    """No ``..``, ``.`` or empty segments, no hidden names, no backslashes."""
    parts = relative.split("/")
    return bool(relative) and not any(part in ("", ".", "..") or part.startswith(".") or "\\" in part
                                      for part in parts)


def folder_file(folder: Path, relative: str) -> Path | None:
    """The regular file ``relative`` names inside ``folder``, or None: no ``..``, ``.`` or empty segments, no
    hidden names, no symlink on the way (so nothing resolves outside the folder), nothing but a regular file."""
    if not _safe_relative(relative):
        return None
    path = folder
    for part in relative.split("/"):
        path = path / part
        try:
            mode = path.lstat().st_mode
        except (FileNotFoundError, NotADirectoryError):
            return None
        if stat.S_ISLNK(mode):
            return None
    if not stat.S_ISREG(mode) or not path.resolve().is_relative_to(folder.resolve()):
        return None
    return path


_BINARY = {"schema": {"type": "string", "format": "binary"}}
_DOWNLOAD_HEADERS = {
    "Accept-Ranges": {"description": "`bytes`.", "schema": {"type": "string"}},
    "ETag": {"description": "A strong validator: send it as `If-Range` when resuming.", "schema": {"type": "string"}},
    "Content-Range": {"description": "206 only: `bytes <first>-<last>/<size>`.", "schema": {"type": "string"}},
}


def download_responses(media_type: str, what: str) -> dict[int | str, dict[str, object]]:
    """The 200 and 206 of a ranged download (for a route's ``responses=``)."""
    return {
        200: {"content": {media_type: _BINARY}, "description": f"{what}, whole.", "headers": _DOWNLOAD_HEADERS},
        206: {"content": {media_type: _BINARY}, "description": f"The requested range of {what} (`Range: bytes=N-`).",
              "headers": _DOWNLOAD_HEADERS},
    }


def file_download(request: Request, folder: Folder, path: str) -> StreamingResponse:
    """One file of ``folder`` by its relative path (404 for anything that is not a file inside it)."""
    missing = ApiError(404, "not_found", f"no file {path!r} in this model folder; its listing names the files", "path")
    if isinstance(folder, StoredFolder):
        if not _safe_relative(path) or path not in folder.manifest.files:
            raise missing
        return ranged_response(request, _stored_file_layout(folder, path), media_type="application/octet-stream",
                               filename=path.rsplit("/", 1)[-1])
    found = folder_file(folder, path)
    if found is None:
        raise missing
    return ranged_response(request, file_layout(found), media_type="application/octet-stream", filename=found.name)
