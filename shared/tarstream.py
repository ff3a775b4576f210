"""Tar in and out of containers, in memory for small sets and streamed for big ones.

``files_tar`` packs a job's files (owned by the job user). ``regular_files`` reads a
tar stream in one pass, like ``tarfile`` mode ``r|`` but fed by an async iterator,
so an archive of any size is read with flat memory and stops at the caps.
"""

from __future__ import annotations

import io
import tarfile
import time
from collections.abc import AsyncIterator, Iterable
from pathlib import PurePosixPath
from typing import Final

from shared.errors import EngineError


def relative_parts(name: str) -> tuple[str, ...]:
    """The parts of a relative path; ValueError for absolute paths and '..'."""
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts or not path.parts or "\0" in name:
        raise ValueError(f"file name {name!r} must be a relative path without '..'")
    return path.parts


def files_tar(files: Iterable[tuple[str, bytes, int]], *, uid: int, gid: int) -> bytes:
    """A tar of (relative name, data, mode) files, parents included, owned by uid:gid."""
    buffer = io.BytesIO()
    now = int(time.time())
    seen: set[str] = set()

    def entry(name: str, kind: bytes, mode: int, size: int = 0) -> tarfile.TarInfo:
        info = tarfile.TarInfo(name)
        info.type, info.mode, info.size, info.mtime = kind, mode, size, now
        info.uid, info.gid = uid, gid
        return info

    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data, mode in files:
            parts = relative_parts(name)
            for depth in range(1, len(parts)):
                parent = "/".join(parts[:depth])
                if parent not in seen:
                    seen.add(parent)
                    tar.addfile(entry(parent, tarfile.DIRTYPE, 0o755))
            tar.addfile(entry("/".join(parts), tarfile.REGTYPE, mode, len(data)), io.BytesIO(data))
    return buffer.getvalue()


class _ChunkReader:
    """Exact-size reads over an async iterator of chunks."""

    def __init__(self, chunks: AsyncIterator[bytes]) -> None:
        self._chunks = chunks
        self._buffer = bytearray()

    async def _fill(self, size: int) -> bool:
        while len(self._buffer) < size:
            chunk = await anext(self._chunks, b"")
            if not chunk:
                return False
            self._buffer += chunk
        return True

    async def read(self, size: int) -> bytes | None:
        """Exactly ``size`` bytes, or None at a clean end of stream."""
        if not await self._fill(size):
            if self._buffer:
                raise EngineError("archive read", "the tar stream ended inside a member")
            return None
        data = bytes(self._buffer[:size])
        del self._buffer[:size]
        return data

    async def skip(self, size: int) -> None:
        while size > 0:
            if not self._buffer and not await self._fill(1):
                raise EngineError("archive read", "the tar stream ended inside a member")
            step = min(size, len(self._buffer))
            del self._buffer[:step]
            size -= step


def _pax_records(data: bytes) -> dict[str, str]:
    records: dict[str, str] = {}
    pos = 0
    while pos < len(data):
        space = data.find(b" ", pos)
        if space < 0 or not data[pos:space].isdigit():
            break
        length = int(data[pos:space])
        if length <= 0:
            break
        key, _, value = data[space + 1 : pos + length - 1].partition(b"=")
        records[key.decode("utf-8", "replace")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return records


_REGULAR: Final = (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE)
# Headers that describe the next member (pax records, GNU long names and link names).
_EXTENSIONS: Final = (
    tarfile.XHDTYPE,
    tarfile.XGLTYPE,
    tarfile.GNUTYPE_LONGNAME,
    tarfile.GNUTYPE_LONGLINK,
)


async def regular_files(
    chunks: AsyncIterator[bytes], *, max_files: int, max_bytes: int
) -> tuple[dict[str, bytes], bool]:
    """Regular files of a tar stream, names without their first component.

    One pass, like ``tarfile`` mode ``r|`` (headers parsed by ``TarInfo.frombuf``):
    links, devices and directories are skipped, and reading stops at the caps.
    """
    reader = _ChunkReader(chunks)
    files: dict[str, bytes] = {}
    total = 0
    pax: dict[str, str] = {}
    long_name: str | None = None
    while (block := await reader.read(tarfile.BLOCKSIZE)) is not None:
        if block == tarfile.NUL * tarfile.BLOCKSIZE:
            break
        try:
            info = tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
        except tarfile.HeaderError as e:
            raise EngineError("archive read", f"bad tar header: {e}") from e
        if info.type in _EXTENSIONS:
            payload = (await reader.read(_padded(info.size)) or b"")[: info.size]
            if info.type == tarfile.XHDTYPE:
                pax = _pax_records(payload)
            elif info.type == tarfile.GNUTYPE_LONGNAME:
                long_name = payload.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            continue
        name = pax.get("path") or long_name or info.name
        size = int(pax["size"]) if pax.get("size", "").isdigit() else info.size
        pax, long_name = {}, None
        parts = PurePosixPath(name).parts[1:]
        if info.type not in _REGULAR or not parts or ".." in parts:
            await reader.skip(_padded(size))
            continue
        if len(files) >= max_files or total + size > max_bytes:
            return files, True
        data = await reader.read(size) if size else b""
        if data is None:
            raise EngineError("archive read", "the tar stream ended inside a member")
        await reader.skip(_padded(size) - size)
        files["/".join(parts)] = data
        total += size
    return files, False


def _padded(size: int) -> int:
    return -(-size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
