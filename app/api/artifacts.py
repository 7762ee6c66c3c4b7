"""A job's exported model folder: its file list, and a streamed tar.gz of it.

The archive is produced file by file as the client reads it (tar headers and data through one gzip
stream), so a multi-GB export never sits in memory or in a temporary file. Symlinks are left out: the
archive holds only what the export wrote.
"""

from __future__ import annotations

import os
import tarfile
import zlib
from collections.abc import Iterator
from pathlib import Path

CHUNK = 1 << 20
GZIP_LEVEL = 1  # safetensors barely compress; level 1 keeps the stream fast


def export_files(folder: Path) -> list[tuple[str, Path, int]]:
    """``(relative posix path, absolute path, size)`` of every regular file under ``folder``, sorted."""
    files = []
    for root, _dirs, names in os.walk(folder, followlinks=False):
        for name in names:
            path = Path(root) / name
            if path.is_symlink() or not path.is_file():
                continue
            files.append((path.relative_to(folder).as_posix(), path, path.stat().st_size))
    return sorted(files)


def tar_gz_stream(folder: Path, root_name: str) -> Iterator[bytes]:
    """The folder as ``root_name/...`` in a gzip-compressed tar, in chunks."""
    compressor = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, 16 + zlib.MAX_WBITS)  # 16+: the gzip container
    seen_dirs: set[str] = set()

    def emit(data: bytes) -> Iterator[bytes]:
        out = compressor.compress(data)
        if out:
            yield out

    def directory(name: str, mtime: float) -> bytes:
        info = tarfile.TarInfo(name)
        info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, int(mtime)
        return info.tobuf(format=tarfile.PAX_FORMAT)

    yield from emit(directory(root_name, folder.stat().st_mtime))
    for relative, path, _size in export_files(folder):
        parts = relative.split("/")[:-1]
        for depth in range(1, len(parts) + 1):
            sub = "/".join(parts[:depth])
            if sub not in seen_dirs:
                seen_dirs.add(sub)
                yield from emit(directory(f"{root_name}/{sub}", (folder / sub).stat().st_mtime))
        with path.open("rb") as handle:
            stat = os.fstat(handle.fileno())
            info = tarfile.TarInfo(f"{root_name}/{relative}")
            info.size, info.mode, info.mtime = stat.st_size, 0o644, int(stat.st_mtime)
            yield from emit(info.tobuf(format=tarfile.PAX_FORMAT))
            remaining = stat.st_size
            while remaining:  # exactly the size in the header, even if the file changes meanwhile
                chunk = handle.read(min(CHUNK, remaining)) or b"\0" * min(CHUNK, remaining)
                remaining -= len(chunk)
                yield from emit(chunk)
        padding = (-stat.st_size) % tarfile.BLOCKSIZE
        if padding:
            yield from emit(b"\0" * padding)
    yield from emit(b"\0" * (2 * tarfile.BLOCKSIZE))  # end-of-archive marker
    tail = compressor.flush()
    if tail:
        yield tail
