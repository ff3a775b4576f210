"""Where path-cache archives live: a small interface and a directory behind it.

The interface is what an object store would offer too: write a stream under a
name (atomically: a reader never sees half a blob), read a stream, delete, list.
`DirectoryBlobStore` keeps blobs as files under one directory; when workers run
on several hosts that directory is a volume they all mount.

Everything streams in bounded chunks; file I/O runs in worker threads.
"""

from __future__ import annotations

import asyncio
import os
import re
import secrets
from collections.abc import AsyncIterable, AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Protocol

from shared.errors import BlobNotFound
from shared.settings import Settings

CHUNK_BYTES = 1024 * 1024
PARTIAL_SUFFIX = ".part"
_PART = r"[a-z0-9][a-z0-9_-]*(?:\.[a-z0-9_-]+)*"  # no empty, "." or ".." parts
BLOB_NAME = re.compile(rf"^{_PART}(?:/{_PART})*$")


@dataclass(frozen=True)
class BlobInfo:
    """One stored object; ``partial`` for a write still under way (or abandoned)."""

    name: str
    size_bytes: int
    modified_at: float  # seconds since the epoch
    partial: bool = False


class BlobStore(Protocol):
    """Streams in, streams out; names are relative, lowercase, ``/``-separated."""

    async def write(self, name: str, chunks: AsyncIterable[bytes]) -> int:
        """Store the stream under ``name`` once complete; the number of bytes stored."""
        ...

    def read(self, name: str) -> AbstractAsyncContextManager[AsyncIterator[bytes]]:
        """``async with store.read(name) as chunks``; BlobNotFound on entering."""
        ...

    async def delete(self, name: str) -> bool:
        """Remove a blob (and any partial write of it); whether anything was there."""
        ...

    def scan(self) -> AsyncIterator[BlobInfo]:
        """Every blob and partial write in the store."""
        ...


def check_name(name: str) -> str:
    if not BLOB_NAME.match(name) or len(name) > 512:
        raise ValueError(f"{name!r} is not a blob name (lowercase a-z, 0-9, _ - . and /)")
    return name


class DirectoryBlobStore:
    """Blobs as files under ``root``: written to ``<name>.part-<token>``, then renamed."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, name: str) -> Path:
        return self.root / check_name(name)

    async def write(self, name: str, chunks: AsyncIterable[bytes]) -> int:
        final = self._path(name)
        partial = final.with_name(f"{final.name}{PARTIAL_SUFFIX}-{secrets.token_hex(4)}")
        await asyncio.to_thread(final.parent.mkdir, parents=True, exist_ok=True)
        file = await asyncio.to_thread(_open_new, partial)
        written = 0
        try:
            try:
                async for chunk in chunks:
                    await asyncio.to_thread(file.write, chunk)
                    written += len(chunk)
                await asyncio.to_thread(_sync, file)
            finally:
                await asyncio.to_thread(file.close)
            await asyncio.to_thread(os.replace, partial, final)
        except BaseException:
            await asyncio.to_thread(partial.unlink, missing_ok=True)
            raise
        return written

    def read(self, name: str) -> AbstractAsyncContextManager[AsyncIterator[bytes]]:
        return self._read(self._path(name), name)

    @asynccontextmanager
    async def _read(self, path: Path, name: str) -> AsyncIterator[AsyncIterator[bytes]]:
        try:
            file = await asyncio.to_thread(path.open, "rb")
        except FileNotFoundError as e:
            raise BlobNotFound(name) from e
        try:
            yield _chunks(file)
        finally:
            await asyncio.to_thread(file.close)

    async def delete(self, name: str) -> bool:
        path = self._path(name)
        return await asyncio.to_thread(_delete, path)

    async def scan(self) -> AsyncIterator[BlobInfo]:
        for info in await asyncio.to_thread(self._walk):
            yield info

    def _walk(self) -> list[BlobInfo]:
        found: list[BlobInfo] = []
        for dirpath, _dirs, files in os.walk(self.root):
            for file_name in files:
                path = Path(dirpath) / file_name
                try:
                    stat = path.stat()
                except FileNotFoundError:
                    continue
                rel = path.relative_to(self.root).as_posix()
                base, sep, _token = rel.rpartition(PARTIAL_SUFFIX + "-")
                found.append(
                    BlobInfo(
                        name=base if sep else rel,
                        size_bytes=stat.st_size,
                        modified_at=stat.st_mtime,
                        partial=bool(sep),
                    )
                )
        return found


async def _chunks(file: IO[bytes]) -> AsyncIterator[bytes]:
    while chunk := await asyncio.to_thread(file.read, CHUNK_BYTES):
        yield chunk


def _open_new(path: Path) -> IO[bytes]:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    return os.fdopen(fd, "wb")


def _sync(file: IO[bytes]) -> None:
    file.flush()
    os.fsync(file.fileno())


def _delete(path: Path) -> bool:
    """The blob and any partial write of it; whether anything was removed."""
    removed = False
    for candidate in [path, *path.parent.glob(f"{path.name}{PARTIAL_SUFFIX}-*")]:
        try:
            candidate.unlink()
            removed = True
        except FileNotFoundError:
            pass
    return removed


def blob_store(settings: Settings) -> DirectoryBlobStore:
    """The store the settings name (a directory; an object store can be added here)."""
    return DirectoryBlobStore(settings.path_cache_dir)
