"""One storage interface on fsspec: a local folder (``file:///srv/ctpd``) or an S3-compatible bucket
(``s3://bucket/prefix``, through s3fs), addressed by relative keys (``jobs/<id>/export/config.json``).

Object stores have no atomic folder rename, so a folder is complete only once its marker object
(:data:`FOLDER_MARKER`, a manifest of its files) is written, LAST: :meth:`Storage.put_folder` uploads every file
first, and readers (:meth:`Storage.folder_manifest`, :meth:`Storage.get_folder`) look for the marker before they
read a byte; a folder without it (a push cut short, or one being replaced) reads as absent. The manifest keeps
each file's size and mtime, so a folder fetched back (or served as a tar) has the same bytes and headers as the
one pushed. A single file is atomic on its own: an S3 object appears only once its upload completed, and the
local backend writes a temporary name and renames it.

Every backend failure (an OSError, botocore's connection and client errors) is raised as :class:`StorageError`,
whose message names the storage URL, never its options (they hold credentials).
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

logger = logging.getLogger(__name__)

FOLDER_MARKER = ".ctpd-complete.json"  # hidden: the API's file listings never show it
MANIFEST_VERSION = 1
READ_CHUNK = 8 << 20  # one ranged GET per 8 MiB of a download
SCHEMES = ("file", "s3")
# Short timeouts and few retries: a job or an API request that cannot reach the bucket should say so in seconds,
# not after botocore's default minute of retries. Options that name them win.
_S3_CONFIG_DEFAULTS = {"connect_timeout": 10, "read_timeout": 120, "retries": {"max_attempts": 3, "mode": "standard"}}


class StorageError(OSError):
    """The storage refused or could not be reached; the message says which storage and what to check."""


@dataclass(frozen=True)
class ObjectInfo:
    size: int
    version: str  # changes when the object is rewritten: the S3 ETag, or the local file's mtime and inode


@dataclass(frozen=True)
class ManifestFile:
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class FolderManifest:
    """What a complete folder holds: its files (relative posix path -> size, mtime) and its sub-folders' mtimes
    (``""`` is the folder itself)."""

    files: dict[str, ManifestFile]
    folders: dict[str, int]

    def to_json(self) -> bytes:
        return json.dumps({
            "version": MANIFEST_VERSION,
            "files": {name: {"size": f.size, "mtime_ns": f.mtime_ns} for name, f in sorted(self.files.items())},
            "folders": dict(sorted(self.folders.items())),
        }, indent=1).encode()

    @classmethod
    def from_json(cls, data: bytes) -> FolderManifest:
        raw = json.loads(data)
        return cls(files={name: ManifestFile(int(f["size"]), int(f["mtime_ns"])) for name, f in raw["files"].items()},
                   folders={name: int(mtime) for name, mtime in raw.get("folders", {}).items()})

    @classmethod
    def of_folder(cls, folder: Path) -> FolderManifest:
        """Every regular file under ``folder`` (hidden ones included, symlinks left out)."""
        files: dict[str, ManifestFile] = {}
        folders = {"": folder.stat().st_mtime_ns}
        for root, dirs, names in os.walk(folder, followlinks=False):
            base = Path(root)
            for name in dirs:
                if not (base / name).is_symlink():
                    folders[(base / name).relative_to(folder).as_posix()] = (base / name).stat().st_mtime_ns
            for name in names:
                path = base / name
                if path.is_symlink() or not path.is_file():
                    continue
                info = path.stat()
                files[path.relative_to(folder).as_posix()] = ManifestFile(info.st_size, info.st_mtime_ns)
        return cls(files=files, folders=folders)


def check_key(key: str) -> str:
    """A relative posix key with no empty, ``.`` or ``..`` segment (so no key leaves the storage's root)."""
    parts = key.split("/")
    if not key or any(part in ("", ".", "..") or "\\" in part for part in parts):
        raise ValueError(f"storage key {key!r}: must be a relative path without empty, '.' or '..' segments")
    return key


def _backend_errors(protocol: str) -> tuple[type[BaseException], ...]:
    errors: tuple[type[BaseException], ...] = (OSError,)
    if protocol == "s3":
        from botocore.exceptions import BotoCoreError, ClientError

        errors += (BotoCoreError, ClientError)
    return errors


class Storage:
    """Keys under one root of one fsspec filesystem (see the module docstring). Thread-safe as fsspec is."""

    def __init__(self, url: str, fs: Any, root: str) -> None:
        self.url = url  # shown in messages; it holds no secret (those live in the options)
        self.fs = fs
        self.root = root.rstrip("/")
        protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
        self.local = "file" in protocols
        self._errors = _backend_errors("s3" if not self.local else "file")

    @classmethod
    def from_url(cls, url: str, options: Mapping[str, Any] | None = None) -> Storage:
        """``file:///absolute/folder`` or ``s3://bucket[/prefix]``; ``options`` go to the fsspec filesystem (for
        s3fs: ``endpoint_url``, ``key``, ``secret``, ``client_kwargs``, ``config_kwargs``...). Raises ValueError
        for a URL this cannot use (the caller names the setting)."""
        import fsspec

        parsed = urlparse(url)
        scheme = parsed.scheme.lower()
        options = dict(options or {})
        if scheme == "file":
            if parsed.netloc not in ("", "localhost") or not parsed.path.startswith("/"):
                raise ValueError(f"{url!r}: a file URL names an absolute folder, file:///srv/ctpd-storage")
            return cls(url, fsspec.filesystem("file", **options), parsed.path)
        if scheme == "s3":
            if not parsed.netloc:
                raise ValueError(f"{url!r}: an s3 URL names a bucket, s3://my-bucket or s3://my-bucket/prefix")
            try:
                import s3fs  # noqa: F401  (a clear message below instead of fsspec's generic one)
            except ImportError:
                raise ValueError(f"{url!r}: s3 storage needs s3fs, which is not installed; install the api or "
                                 "worker extra (pip install 'ctpd[api]')") from None
            config = {**_S3_CONFIG_DEFAULTS, **options.pop("config_kwargs", {})}
            # Listings are never cached: other machines write the bucket while this process lives.
            options.setdefault("use_listings_cache", False)
            fs = fsspec.filesystem("s3", skip_instance_cache=True, config_kwargs=config, **options)
            return cls(url, fs, f"{parsed.netloc}{parsed.path}".rstrip("/"))
        shown = scheme or "none"
        raise ValueError(f"{url!r}: unsupported scheme ({shown}); use file:///absolute/folder or s3://bucket/prefix")

    # ------------------------------------------------------------------------------------------ plumbing

    def path(self, key: str) -> str:
        return f"{self.root}/{check_key(key)}"

    @contextmanager
    def _errors_named(self, what: str) -> Iterator[None]:
        try:
            yield
        except StorageError:
            raise
        except FileNotFoundError:
            raise
        except self._errors as error:
            raise StorageError(f"storage {self.url}: could not {what} ({type(error).__name__}: {error}); check that "
                               "the storage is reachable and that CTPD_STORAGE_OPTIONS' credentials may read and "
                               "write it") from error

    def check(self) -> None:
        """Write, read and delete a probe object: the storage exists, is reachable and accepts these credentials."""
        probe = f".ctpd-probe-{uuid.uuid4().hex}"
        try:
            with self._errors_named("write, read and delete a probe object"):
                if self.local:
                    self.fs.makedirs(self.root, exist_ok=True)
                self.fs.pipe_file(self.path(probe), b"ok")
                if self.fs.cat_file(self.path(probe)) != b"ok":
                    raise StorageError(f"storage {self.url}: a probe object read back different bytes")
                self.fs.rm_file(self.path(probe))
        except FileNotFoundError as error:  # s3fs's answer to a bucket that does not exist
            raise StorageError(f"storage {self.url}: the bucket does not exist ({error}); create it first") from None

    # --------------------------------------------------------------------------------------------- files

    def put_file(self, local: Path, key: str) -> None:
        """Upload one file; readers see the old object or the whole new one."""
        target = self.path(key)
        with self._errors_named(f"upload {key}"):
            if self.local:  # a copy is not atomic on a filesystem: write a temporary name, then rename
                parent = target.rsplit("/", 1)[0]
                self.fs.makedirs(parent, exist_ok=True)
                staging = f"{parent}/.{target.rsplit('/', 1)[1]}.part-{uuid.uuid4().hex[:8]}"
                try:
                    self.fs.put_file(str(local), staging)
                    os.replace(staging, target)
                finally:
                    Path(staging).unlink(missing_ok=True)
            else:
                self.fs.put_file(str(local), target)

    def get_file(self, key: str, local: Path, *, staging: Path | None = None) -> None:
        """Download one object to ``local``, through ``staging`` (default: a temporary sibling) renamed into place,
        so ``local`` is whole or absent. FileNotFoundError if there is no such object."""
        local.parent.mkdir(parents=True, exist_ok=True)
        staging = staging or local.with_name(f".{local.name}.part-{uuid.uuid4().hex[:8]}")
        try:
            with self._errors_named(f"download {key}"):
                self.fs.get_file(self.path(key), str(staging))
            os.replace(staging, local)
        finally:
            staging.unlink(missing_ok=True)

    def info(self, key: str) -> ObjectInfo:
        """Size and version of one object; FileNotFoundError if absent."""
        with self._errors_named(f"read the metadata of {key}"):
            return self._info_of(self.fs.info(self.path(key)))

    def _info_of(self, raw: Mapping[str, Any]) -> ObjectInfo:
        if self.local:
            version = f"{raw.get('mtime')}:{raw.get('ino')}"
        else:
            version = str(raw.get("ETag") or raw.get("etag") or raw.get("LastModified") or "")
        return ObjectInfo(size=int(raw["size"]), version=version)

    def exists(self, key: str) -> bool:
        with self._errors_named(f"look for {key}"):
            return bool(self.fs.exists(self.path(key)))

    def size(self, key: str) -> int:
        return self.info(key).size

    def list(self, key: str) -> dict[str, ObjectInfo]:
        """Every object under the folder ``key``, by path relative to it (the marker included, if any)."""
        prefix = self.path(key)
        with self._errors_named(f"list {key}"):
            if not self.fs.exists(prefix):
                return {}
            found = self.fs.find(prefix, detail=True)
        strip = len(prefix.rstrip("/")) + 1
        listed = {}
        for name, raw in found.items():
            name = name.rstrip("/")
            if raw.get("type") == "file" and len(name) > strip:
                listed[name[strip:]] = self._info_of(raw)
        return listed

    def delete(self, key: str) -> None:
        """Remove the object or folder ``key`` (a folder's marker first, so a delete cut short leaves a folder that
        reads as incomplete, never one that looks whole with files missing). Absent: nothing to do."""
        target = self.path(key)
        with self._errors_named(f"delete {key}"):
            if not self.fs.exists(target):
                return
            marker = f"{target}/{FOLDER_MARKER}"
            if self.fs.exists(marker):
                self.fs.rm_file(marker)
            self.fs.rm(target, recursive=True)

    def read(self, key: str, start: int, stop: int, *, expect: ObjectInfo | None = None) -> Iterator[bytes]:
        """Bytes ``start`` to ``stop`` (exclusive) of one object, in chunks of at most :data:`READ_CHUNK`.
        ``expect``: the size and version the caller laid its response out with; a rewritten object raises
        StorageError before a byte is sent, rather than mixing two versions under one validator."""
        path = self.path(key)
        if expect is not None and self.info(key) != expect:
            raise StorageError(f"storage {self.url}: {key} changed since the download began")
        offset = start
        while offset < stop:
            end = min(stop, offset + READ_CHUNK)
            with self._errors_named(f"read {key}"):
                chunk = self.fs.cat_file(path, start=offset, end=end)
            if not chunk:
                raise StorageError(f"storage {self.url}: {key} is shorter than when the download began")
            offset += len(chunk)
            yield chunk

    # ------------------------------------------------------------------------------------------- folders

    def folder_manifest(self, key: str) -> FolderManifest | None:
        """The manifest of the complete folder ``key``, or None (absent, or not complete: no marker)."""
        with self._errors_named(f"read the marker of {key}"):
            try:
                data = self.fs.cat_file(self.path(f"{key}/{FOLDER_MARKER}"))
            except FileNotFoundError:
                return None
        return FolderManifest.from_json(data)

    def put_folder(self, local: Path, key: str, *, replace: bool) -> bool:
        """Upload the folder ``local`` as ``key``, its marker last. A complete folder already there is kept
        (returns False) unless ``replace``; then its marker goes first, so no reader mistakes the old files and
        the new for one folder, and files the new folder lacks are removed. Returns True when it uploaded."""
        if not replace and self.folder_manifest(key) is not None:
            return False
        manifest = FolderManifest.of_folder(local)
        self.delete(key)  # the old marker first (see delete), then what a previous push left
        names = sorted(manifest.files)
        with self._errors_named(f"upload the folder {key}"):
            if self.local:
                for name in names:
                    target = self.path(f"{key}/{name}")
                    self.fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
                    self.fs.put_file(str(local / name), target)
            elif names:  # s3fs uploads a list of files concurrently
                self.fs.put([str(local / name) for name in names], [self.path(f"{key}/{name}") for name in names])
            self.fs.pipe_file(self.path(f"{key}/{FOLDER_MARKER}"), manifest.to_json())
        logger.info("storage %s: pushed %s (%d files, %d bytes)", self.url, key, len(names),
                    sum(f.size for f in manifest.files.values()))
        return True

    def get_folder(self, key: str, into: Path) -> bool:
        """Download the complete folder ``key`` into the existing folder ``into`` (files keep their mtimes);
        False when there is no complete folder ``key``. Raises StorageError when a file the marker names is
        missing or of another size (a folder deleted or replaced meanwhile): ``into`` then holds a partial
        copy, which the caller discards."""
        manifest = self.folder_manifest(key)
        if manifest is None:
            return False
        names = sorted(manifest.files)
        targets = [into / name for name in names]
        for target in targets:
            target.parent.mkdir(parents=True, exist_ok=True)
        with self._errors_named(f"download the folder {key}"):
            if self.local:
                for name, target in zip(names, targets, strict=True):
                    self.fs.get_file(self.path(f"{key}/{name}"), str(target))
            elif names:
                self.fs.get([self.path(f"{key}/{name}") for name in names], [str(t) for t in targets])
        for name, target in zip(names, targets, strict=True):
            expected = manifest.files[name]
            if not target.is_file() or target.stat().st_size != expected.size:
                raise StorageError(f"storage {self.url}: {key}/{name} is missing or not the size its marker says; "
                                   "the folder was replaced or deleted while it was read")
            os.utime(target, ns=(expected.mtime_ns, expected.mtime_ns))
        for name, mtime in sorted(manifest.folders.items(), key=lambda item: -item[0].count("/")):
            folder = into / name if name else into
            if folder.is_dir():
                os.utime(folder, ns=(mtime, mtime))
        return True
