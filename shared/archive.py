"""Streaming tar + zstd for path caches, and the rules a tar must pass.

No tar stream is trusted, whichever way it flows: on save, what the container
holds (read back like ``docker cp``) is rewritten; on restore, what the blob store
holds is rewritten again before Docker unpacks it into the work dir. Either way
every member goes through one `TarGuard`, header by header, in constant memory:

- names are relative, without ``..`` or NUL, and never below a symbolic link of
  the archive (Docker would write through the link);
- a symbolic link's target is relative and, resolved through the links seen so
  far, stays inside the work dir; at the end of the archive every link is checked
  again against the final set (a later link can change where an earlier one leads);
- a hard link names a path inside the work dir, not through a link;
- only regular files, directories and links: no devices, fifos, sparse or
  multi-volume members; the expanded size is capped.

A member is rewritten with its name, type, permission bits (no setuid, setgid or
sticky), size and mtime; the owner becomes the job's user and everything else
(user names, xattrs, other pax records) is dropped. Missing parent directories are
emitted, owned by the job's user, so a restored tree is writable by the job.

zstd runs in worker threads, one bounded chunk at a time, so a highly compressible
archive never expands into memory whole.
"""

from __future__ import annotations

import asyncio
import tarfile
from collections.abc import AsyncIterable, AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import IO, cast

import zstandard

from shared.errors import BerthError

CHUNK_BYTES = 1024 * 1024
FLUSH_BYTES = 256 * 1024
BLOCK = 512
END_OF_ARCHIVE = bytes(2 * BLOCK)
ZSTD_LEVEL = 3
MAX_NAME_BYTES = 4096
MAX_EXTENDED_HEADER_BYTES = 1024 * 1024
MAX_TRAILER_BYTES = 1024 * 1024
MAX_LINK_HOPS = 40
MAX_TRACKED = 200_000  # directories and links one guard remembers (about 25 MB)
MAX_MTIME = 8**11 - 1

_REGULAR = (tarfile.REGTYPE, tarfile.AREGTYPE)
_REFUSED = {
    tarfile.CHRTYPE: "device files are not allowed",
    tarfile.BLKTYPE: "device files are not allowed",
    tarfile.FIFOTYPE: "fifos are not allowed",
    tarfile.CONTTYPE: "contiguous files are not supported",
    tarfile.GNUTYPE_SPARSE: "sparse files are not supported",
}
_PATH_KEYS = {"path", "linkpath", "size"}


class ArchiveRejected(BerthError):
    """A tar or zstd stream broke a safety rule or its format."""

    def __init__(self, member: str | None, reason: str) -> None:
        self.member = member
        self.reason = reason
        super().__init__(str(self))

    def __str__(self) -> str:
        if self.member is None:
            return f"archive rejected: {self.reason}"
        return f"archive member {self.member!r} rejected: {self.reason}"


class _Reader:
    """Exact reads over an async byte stream, holding one chunk at a time."""

    def __init__(self, source: AsyncIterable[bytes]) -> None:
        self._source = aiter(source)
        self._chunk = b""
        self._pos = 0

    async def _fill(self) -> bool:
        while self._pos >= len(self._chunk):
            try:
                self._chunk = bytes(await anext(self._source))
            except StopAsyncIteration:
                return False
            self._pos = 0
        return True

    async def pieces(self, size: int) -> AsyncIterator[bytes]:
        while size:
            if not await self._fill():
                raise ArchiveRejected(None, "the stream ends in the middle of a member")
            piece = self._chunk[self._pos : self._pos + size]
            self._pos += len(piece)
            size -= len(piece)
            yield piece

    async def exact(self, size: int) -> bytes:
        return b"".join([piece async for piece in self.pieces(size)])

    async def rest(self, limit: int) -> bytes:
        """What is left of the stream (zero padding after the end marker), capped."""
        left = b""
        while await self._fill():
            left += self._chunk[self._pos :]
            self._pos = len(self._chunk)
            if len(left) > limit:
                raise ArchiveRejected(None, "too much data after the end of the archive")
        return left


def _pax_records(data: bytes) -> dict[str, bytes]:
    """``"<len> key=value\\n"`` records of a pax extended header."""
    records: dict[str, bytes] = {}
    pos = 0
    while pos < len(data) and data[pos] != 0:
        space = data.find(b" ", pos)
        length = int(data[pos:space]) if space > pos and data[pos:space].isdigit() else 0
        end = pos + length
        if length <= space - pos or end > len(data) or data[end - 1] != 0x0A:
            raise ArchiveRejected(None, "malformed pax extended header")
        key, sep, value = data[space + 1 : end - 1].partition(b"=")
        if not sep:
            raise ArchiveRejected(None, "malformed pax extended header")
        records[key.decode("utf-8", "surrogateescape")] = value
        pos = end
    return records


def _decode(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def _number(pax: dict[str, bytes], key: str, default: float) -> int:
    """A size or mtime from a pax record (mtime may have a fraction), never negative."""
    if key not in pax:
        return int(default)
    try:
        value = int(float(pax[key])) if key == "mtime" else int(pax[key])
    except (ValueError, OverflowError) as e:
        raise ArchiveRejected(None, f"pax record {key}={_decode(pax[key])[:40]!r}") from e
    if value < 0:
        raise ArchiveRejected(None, f"pax record {key} is negative")
    return value


class TarGuard:
    """Validates and rewrites tar members; one guard sees every archive of a restore."""

    def __init__(self, *, owner: tuple[int, int], max_bytes: int) -> None:
        self.owner = owner
        self.max_bytes = max_bytes
        self.archive_bytes = 0
        self.member_count = 0
        self._kinds: dict[str, str] = {}  # name -> "dir" | "link"
        self._links: dict[str, str] = {}  # symbolic link name -> target

    def new_archive(self) -> None:
        """Start counting the size budget again (restore: one call per cache)."""
        self.archive_bytes = 0

    async def sanitize(
        self, source: AsyncIterable[bytes], *, rename: tuple[str, str] | None = None
    ) -> AsyncIterator[bytes]:
        """One whole archive: the rewritten members, the end marker, nothing after."""
        async for data in self.members(source, rename=rename):
            yield data
        yield self.finish()

    def finish(self) -> bytes:
        """Check every link against the final set of links; the end-of-archive marker."""
        for name, target in self._links.items():
            self._resolve(name, target)
        self._account(len(END_OF_ARCHIVE))
        return END_OF_ARCHIVE

    async def members(
        self, source: AsyncIterable[bytes], *, rename: tuple[str, str] | None = None
    ) -> AsyncIterator[bytes]:
        """The members of one tar stream, rewritten, without an end marker.

        ``rename=(base, dest)``: every name must start with ``base`` (the top entry
        of ``docker cp``), which becomes ``dest`` (the cache path in the work dir).
        """
        reader = _Reader(source)
        batch: list[bytes] = []
        batched = 0
        pax: dict[str, bytes] = {}
        while True:
            block = await reader.exact(BLOCK)
            if not block.strip(b"\0"):  # the end-of-archive marker
                break
            try:
                info = tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
            except tarfile.HeaderError as e:
                raise ArchiveRejected(None, f"bad tar header: {e}") from e
            size = info.size
            padded = size + (-size) % BLOCK
            if info.type in (tarfile.XHDTYPE, tarfile.SOLARIS_XHDTYPE, tarfile.XGLTYPE):
                records = _pax_records(await self._small(reader, padded, size))
                if any(k.startswith("GNU.sparse") for k in records):
                    raise ArchiveRejected(None, "sparse files are not supported")
                if info.type == tarfile.XGLTYPE and _PATH_KEYS & set(records):
                    raise ArchiveRejected(None, "global pax headers may not set names or sizes")
                if info.type != tarfile.XGLTYPE:
                    pax.update(records)
                continue
            if info.type in (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK):
                key = "path" if info.type == tarfile.GNUTYPE_LONGNAME else "linkpath"
                pax[key] = (await self._small(reader, padded, size)).split(b"\0", 1)[0]
                continue
            raw_name = _decode(pax["path"]) if "path" in pax else info.name
            raw_link = _decode(pax["linkpath"]) if "linkpath" in pax else info.linkname
            size = _number(pax, "size", info.size)
            padded = size + (-size) % BLOCK
            mtime = _number(pax, "mtime", info.mtime)
            pax = {}
            out = self._member(info, raw_name, raw_link, size, mtime, rename)
            regular = info.type in _REGULAR and bool(out)
            for header in out:
                batch.append(header)
                batched += len(header)
            if regular:
                self._account(padded)
                async for piece in reader.pieces(size):
                    if batched + len(piece) >= FLUSH_BYTES:
                        yield b"".join(batch)
                        batch, batched = [], 0
                    batch.append(piece)
                    batched += len(piece)
                await reader.exact(padded - size)
                batch.append(bytes(padded - size))
                batched += padded - size
            else:
                async for _ in reader.pieces(padded):
                    pass
            if batched >= FLUSH_BYTES:
                yield b"".join(batch)
                batch, batched = [], 0
        if batch:
            yield b"".join(batch)
        if (await reader.rest(MAX_TRAILER_BYTES)).strip(b"\0"):
            raise ArchiveRejected(None, "data after the end of the archive")

    async def _small(self, reader: _Reader, padded: int, size: int) -> bytes:
        if size > MAX_EXTENDED_HEADER_BYTES:
            raise ArchiveRejected(None, f"an extended header of {size} bytes is too large")
        return (await reader.exact(padded))[:size]

    def _member(
        self,
        info: tarfile.TarInfo,
        raw_name: str,
        raw_link: str,
        size: int,
        mtime: int,
        rename: tuple[str, str] | None,
    ) -> list[bytes]:
        """The headers to emit for one member (parents first), or [] to drop it."""
        name = self._clean(raw_name, rename)
        if info.type in _REFUSED:
            raise ArchiveRejected(name or raw_name, _REFUSED[info.type])
        if info.type not in (*_REGULAR, tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE):
            raise ArchiveRejected(name or raw_name, f"member type {info.type!r} is not supported")
        if not name:  # the work dir itself ("./"): keep its owner and mode as they are
            return []
        out = self._parents(name, mtime)
        mode = info.mode & 0o777
        mtime = min(max(mtime, 0), MAX_MTIME)
        if info.type == tarfile.SYMTYPE:
            self._link(name, raw_link)
            out.append(self._header(name, tarfile.SYMTYPE, mode=0o777, mtime=mtime, link=raw_link))
        elif info.type == tarfile.LNKTYPE:
            target = self._clean(raw_link, rename)
            self._hard_link(name, target)
            self._set(name, None)
            out.append(self._header(name, tarfile.LNKTYPE, mode=mode, mtime=mtime, link=target))
        elif info.type == tarfile.DIRTYPE:
            self._set(name, "dir")
            out.append(self._header(name, tarfile.DIRTYPE, mode=mode, mtime=mtime))
        else:
            self._set(name, None)
            out.append(self._header(name, tarfile.REGTYPE, mode=mode, mtime=mtime, size=size))
        self.member_count += 1
        for header in out:
            self._account(len(header))
        return out

    def _clean(self, raw: str, rename: tuple[str, str] | None) -> str:
        """A relative name without ``.``/``..`` parts; re-rooted by ``rename``."""
        if "\0" in raw or len(raw.encode("utf-8", "surrogateescape")) > MAX_NAME_BYTES:
            raise ArchiveRejected(raw[:200], "names must be NUL-free and at most 4096 bytes")
        if raw.startswith("/"):
            raise ArchiveRejected(raw, "absolute paths are not allowed")
        parts = [p for p in raw.split("/") if p not in ("", ".")]
        if ".." in parts:
            raise ArchiveRejected(raw, "'..' is not allowed in names")
        if rename is not None:
            base, dest = rename
            if not parts or parts[0] != base:
                raise ArchiveRejected(raw, f"expected a name under {base!r}")
            parts = [*dest.split("/"), *parts[1:]]
        return "/".join(parts)

    def _set(self, name: str, kind: str | None) -> None:
        """Record a directory or link (files are not kept: memory grows with trees only)."""
        self._links.pop(name, None)
        if kind is None:
            self._kinds.pop(name, None)
            return
        self._kinds[name] = kind
        if len(self._kinds) > MAX_TRACKED:
            raise ArchiveRejected(name, f"more than {MAX_TRACKED} directories and links")

    def _parents(self, name: str, mtime: int) -> list[bytes]:
        """Headers for parent directories not seen yet; a parent may not be a link."""
        out: list[bytes] = []
        parts = name.split("/")
        for i in range(1, len(parts)):
            parent = "/".join(parts[:i])
            kind = self._kinds.get(parent)
            if kind == "link":
                raise ArchiveRejected(name, f"lies below the symbolic link {parent!r}")
            if kind is None:
                self._set(parent, "dir")
                out.append(self._header(parent, tarfile.DIRTYPE, mode=0o755, mtime=mtime))
        return out

    def _hard_link(self, name: str, target: str) -> None:
        """A hard link names a file inside the work dir, not through a link (names are clean)."""
        if not target or self._kinds.get(target) == "dir":
            raise ArchiveRejected(name, f"a hard link must name a file, not {target!r}")
        parts = target.split("/")
        for i in range(1, len(parts)):
            if self._kinds.get("/".join(parts[:i])) == "link":
                why = f"hard link target {target!r} goes through a symbolic link"
                raise ArchiveRejected(name, why)

    def _link(self, name: str, target: str) -> None:
        if not target or "\0" in target or len(target.encode("utf-8", "surrogateescape")) > 4096:
            raise ArchiveRejected(name, "a symbolic link needs a target of 1-4096 bytes")
        if target.startswith("/"):
            raise ArchiveRejected(name, f"links to absolute paths are not allowed ({target!r})")
        if self._kinds.get(name) == "dir":
            raise ArchiveRejected(name, "a symbolic link may not replace a directory")
        self._resolve(name, target)
        self._set(name, "link")
        self._links[name] = target

    def _resolve(self, name: str, target: str) -> list[str]:
        """Where ``name -> target`` leads through the known links; outside is an error."""
        resolved: list[str] = []
        pending = [*name.split("/")[:-1], *target.split("/")]
        hops = 0
        while pending:
            part = pending.pop(0)
            if part in ("", "."):
                continue
            if part == "..":
                if not resolved:
                    raise ArchiveRejected(
                        name, f"link target {target!r} leads outside the work dir"
                    )
                resolved.pop()
                continue
            resolved.append(part)
            inner = self._links.get("/".join(resolved))
            if inner is not None and pending:  # a link used as a directory: follow it
                hops += 1
                if hops > MAX_LINK_HOPS:
                    raise ArchiveRejected(name, "too many levels of symbolic links")
                resolved.pop()
                pending = [*inner.split("/"), *pending]
        return resolved

    def _header(
        self, name: str, kind: bytes, *, mode: int, mtime: int, size: int = 0, link: str = ""
    ) -> bytes:
        info = tarfile.TarInfo(name)
        info.type = kind
        info.mode = mode
        info.mtime = mtime
        info.size = size
        info.linkname = link
        info.uid, info.gid = self.owner
        info.uname = info.gname = ""
        try:
            return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
        except (ValueError, UnicodeError) as e:
            raise ArchiveRejected(name, f"cannot be written back: {e}") from e

    def _account(self, size: int) -> None:
        self.archive_bytes += size
        if self.archive_bytes > self.max_bytes:
            raise ArchiveRejected(None, f"expands past the limit of {self.max_bytes} bytes")


async def compress(
    source: AsyncIterable[bytes], *, level: int = ZSTD_LEVEL
) -> AsyncIterator[bytes]:
    """zstd-compress a byte stream (one frame, with a checksum), in a worker thread."""
    compressor = zstandard.ZstdCompressor(level=level, write_checksum=True).compressobj()
    async for chunk in source:
        out = await asyncio.to_thread(compressor.compress, chunk)
        if out:
            yield out
    yield compressor.flush()


class _ThreadSource:
    """A blocking ``read()`` for zstd's thread, fed from the event loop by a pump task."""

    def __init__(self, queue: asyncio.Queue[bytes | None], loop: asyncio.AbstractEventLoop) -> None:
        self._queue = queue
        self._loop = loop
        self._chunk = b""
        self._eof = False

    def read(self, size: int = -1) -> bytes:
        if not self._chunk and not self._eof:
            item = asyncio.run_coroutine_threadsafe(self._queue.get(), self._loop).result()
            self._chunk, self._eof = (b"", True) if item is None else (item, False)
        size = len(self._chunk) if size < 0 else size
        out, self._chunk = self._chunk[:size], self._chunk[size:]
        return out


async def decompress(
    source: AsyncIterable[bytes], *, chunk_bytes: int = CHUNK_BYTES
) -> AsyncIterator[bytes]:
    """zstd-decompress a stream (one frame) into chunks of at most ``chunk_bytes``.

    zstd reads its input with a blocking ``read()``, so it gets a thread of its own
    (a shared pool could fill up with readers all waiting for input that needs the
    same pool to arrive); a pump task feeds it from the event loop.
    """
    queue: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=2)

    async def pump() -> None:
        try:
            async for chunk in source:
                await queue.put(bytes(chunk))
        finally:
            await queue.put(None)

    loop = asyncio.get_running_loop()
    thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="berth-zstd")
    pump_task = asyncio.create_task(pump())
    thread_source = _ThreadSource(queue, loop)
    reader = zstandard.ZstdDecompressor().stream_reader(
        cast("IO[bytes]", thread_source), read_size=CHUNK_BYTES
    )
    try:
        while out := await loop.run_in_executor(thread, reader.read, chunk_bytes):
            yield out
        if await loop.run_in_executor(thread, thread_source.read, 1):
            raise ArchiveRejected(None, "data after the end of the zstd frame")
        await pump_task  # the source's own error, if it failed
    except zstandard.ZstdError as e:
        raise ArchiveRejected(None, f"not a valid zstd stream: {e}") from e
    finally:
        pump_task.cancel()
        while not queue.empty():  # unblock the thread if it waits for a chunk
            queue.get_nowait()
        queue.put_nowait(None)
        await asyncio.gather(pump_task, return_exceptions=True)
        thread.shutdown(wait=False)
