"""The tar guard and zstd streams, on archives built in memory (no services)."""

from __future__ import annotations

import io
import os
import tarfile
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import pytest
import zstandard

from shared.archive import END_OF_ARCHIVE, ArchiveRejected, TarGuard, compress, decompress

OWNER = (65534, 65534)


@dataclass
class M:
    """A member to put in a test archive."""

    name: str
    kind: bytes = tarfile.REGTYPE
    data: bytes = b""
    link: str = ""
    mode: int = 0o644


def make_tar(members: Sequence[M], fmt: int = tarfile.PAX_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for m in members:
            info = tarfile.TarInfo(m.name)
            info.type, info.linkname, info.mode = m.kind, m.link, m.mode
            info.uid, info.gid, info.uname = 0, 0, "root"
            info.size = len(m.data) if m.kind == tarfile.REGTYPE else 0
            tar.addfile(info, io.BytesIO(m.data) if m.kind == tarfile.REGTYPE else None)
    return buf.getvalue()


async def chunked(data: bytes, size: int = 700) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


async def collect(stream: AsyncIterator[bytes]) -> bytes:
    return b"".join([chunk async for chunk in stream])


async def sanitize(
    data: bytes, *, rename: tuple[str, str] | None = None, max_bytes: int = 10**8
) -> list[tarfile.TarInfo]:
    guard = TarGuard(owner=OWNER, max_bytes=max_bytes)
    out = await collect(guard.sanitize(chunked(data), rename=rename))
    with tarfile.open(fileobj=io.BytesIO(out)) as tar:
        return tar.getmembers()


async def rejected(data: bytes, **kwargs: object) -> str:
    with pytest.raises(ArchiveRejected) as info:
        await sanitize(data, **kwargs)  # type: ignore[arg-type]
    return str(info.value)


async def test_round_trip_keeps_content_and_rewrites_owner() -> None:
    """Files, dirs and in-tree links pass with their data; owner becomes the job user."""
    long_name = "d/" + "x" * 150 + "/naïve.txt"
    data = make_tar(
        [
            M("d", tarfile.DIRTYPE, mode=0o755),
            M("d/a.txt", data=b"hello" * 1000, mode=0o4755),
            M(long_name, data=b"long"),
            M("d/link", tarfile.SYMTYPE, link="a.txt"),
            M("d/hard", tarfile.LNKTYPE, link="d/a.txt"),
        ]
    )
    guard = TarGuard(owner=OWNER, max_bytes=10**8)
    out = await collect(guard.sanitize(chunked(data)))
    with tarfile.open(fileobj=io.BytesIO(out)) as tar:
        members = {m.name: m for m in tar.getmembers()}
        assert tar.extractfile("d/a.txt").read() == b"hello" * 1000  # type: ignore[union-attr]
        assert tar.extractfile(long_name).read() == b"long"  # type: ignore[union-attr]
    assert members["d/link"].issym()
    assert members["d/link"].linkname == "a.txt"
    assert members["d/hard"].islnk()
    assert members["d/hard"].linkname == "d/a.txt"
    assert {(m.uid, m.gid, m.uname) for m in members.values()} == {(*OWNER, "")}
    assert members["d/a.txt"].mode == 0o755  # setuid dropped
    assert guard.member_count == 5


async def test_gnu_long_names_are_read() -> None:
    """GNU long-name and long-link headers (not only pax) are understood."""
    name = "n/" + "y" * 200
    members = await sanitize(
        make_tar(
            [M(name, data=b"1"), M("n/l", tarfile.SYMTYPE, link="y" * 200)], tarfile.GNU_FORMAT
        )
    )
    assert [m.name for m in members] == ["n", name, "n/l"]
    assert members[2].linkname == "y" * 200


async def test_rename_reroots_names_and_adds_parents() -> None:
    """docker cp's basename becomes the cache path; missing parents are emitted, job-owned."""
    data = make_tar(
        [
            M("pip", tarfile.DIRTYPE),
            M("pip/wheel", data=b"w"),
            M("pip/same", tarfile.LNKTYPE, link="pip/wheel"),
        ]
    )
    members = await sanitize(data, rename=("pip", ".cache/pip"))
    assert [(m.name, m.type) for m in members] == [
        (".cache", tarfile.DIRTYPE),
        (".cache/pip", tarfile.DIRTYPE),
        (".cache/pip/wheel", tarfile.REGTYPE),
        (".cache/pip/same", tarfile.LNKTYPE),
    ]
    assert members[3].linkname == ".cache/pip/wheel"
    assert members[0].uid == OWNER[0]


async def test_rename_refuses_names_outside_the_base() -> None:
    """With re-rooting, a member not under the expected top entry is refused."""
    assert "expected a name under 'pip'" in await rejected(
        make_tar([M("other/f", data=b"x")]), rename=("pip", "pip")
    )


async def test_absolute_path_rejected() -> None:
    """A member with an absolute name is refused."""
    assert "absolute paths" in await rejected(make_tar([M("/etc/cron.d/evil", data=b"x")]))


async def test_dotdot_rejected() -> None:
    """A member whose name climbs with '..' is refused."""
    assert "'..'" in await rejected(make_tar([M("a/../../evil", data=b"x")]))


async def test_symlink_to_absolute_path_rejected() -> None:
    """A symbolic link to an absolute path is refused."""
    assert "absolute" in await rejected(make_tar([M("l", tarfile.SYMTYPE, link="/etc")]))


async def test_symlink_escaping_with_dotdot_rejected() -> None:
    """A symbolic link whose relative target leaves the work dir is refused."""
    data = make_tar([M("d", tarfile.DIRTYPE), M("d/l", tarfile.SYMTYPE, link="../../etc")])
    assert "leads outside" in await rejected(data)


async def test_symlink_inside_with_dotdot_allowed() -> None:
    """A relative link that climbs but stays inside the work dir is fine (e.g. .bin links)."""
    data = make_tar([M("nm/.bin", tarfile.DIRTYPE), M("nm/.bin/x", tarfile.SYMTYPE, link="../x")])
    assert [m.name for m in await sanitize(data)] == ["nm", "nm/.bin", "nm/.bin/x"]


async def test_symlink_chain_escape_rejected_in_any_order() -> None:
    """Links that escape only through another link are caught, whichever comes first."""
    first = [M("l", tarfile.SYMTYPE, link="."), M("d", tarfile.DIRTYPE)]
    second = [M("d/m", tarfile.SYMTYPE, link="../l/..")]
    assert "leads outside" in await rejected(make_tar(first + second))
    assert "leads outside" in await rejected(make_tar([M("d", tarfile.DIRTYPE), *second, first[0]]))


async def test_member_below_a_symlink_rejected() -> None:
    """Nothing is written through a link of the archive (Docker would follow it)."""
    data = make_tar([M("l", tarfile.SYMTYPE, link="sub"), M("l/f", data=b"x")])
    assert "below the symbolic link" in await rejected(data)


async def test_guard_remembers_links_across_archives() -> None:
    """A second cache restored in the same job cannot write through the first one's link."""
    guard = TarGuard(owner=OWNER, max_bytes=10**8)
    await collect(guard.sanitize(chunked(make_tar([M("l", tarfile.SYMTYPE, link="sub")]))))
    with pytest.raises(ArchiveRejected, match="below the symbolic link"):
        await collect(guard.sanitize(chunked(make_tar([M("l/f", data=b"x")]))))


async def test_hard_link_escaping_rejected() -> None:
    """Hard links to absolute paths, '..', through a link of the archive, or to a dir fail."""
    assert "absolute" in await rejected(make_tar([M("h", tarfile.LNKTYPE, link="/etc/shadow")]))
    assert "'..'" in await rejected(make_tar([M("h", tarfile.LNKTYPE, link="../etc/shadow")]))
    through = make_tar([M("l", tarfile.SYMTYPE, link="d"), M("h", tarfile.LNKTYPE, link="l/f")])
    assert "goes through a symbolic link" in await rejected(through)
    to_dir = make_tar([M("d", tarfile.DIRTYPE), M("h", tarfile.LNKTYPE, link="d")])
    assert "must name a file" in await rejected(to_dir)


async def test_tracking_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """A tree of more directories than the guard keeps is refused, not buffered."""
    monkeypatch.setattr("shared.archive.MAX_TRACKED", 40)
    guard = TarGuard(owner=OWNER, max_bytes=10**9)
    data = make_tar([M(f"d{i}", tarfile.DIRTYPE) for i in range(50)])
    with pytest.raises(ArchiveRejected, match="more than 40 directories"):
        await collect(guard.sanitize(chunked(data)))


@pytest.mark.parametrize(
    ("kind", "why"),
    [
        (tarfile.CHRTYPE, "device"),
        (tarfile.BLKTYPE, "device"),
        (tarfile.FIFOTYPE, "fifo"),
    ],
)
async def test_special_files_rejected(kind: bytes, why: str) -> None:
    """Device files and fifos are refused."""
    assert why in await rejected(make_tar([M("dev", kind)]))


async def test_size_limit() -> None:
    """An archive expanding past the entry limit is refused."""
    data = make_tar([M("big", data=os.urandom(20_000))])
    assert "limit of 10000 bytes" in await rejected(data, max_bytes=10_000)


async def test_truncated_archive_rejected() -> None:
    """A stream cut in a member, or without its end marker, is refused."""
    data = make_tar([M("f", data=b"x" * 5000)])
    assert "ends in the middle" in await rejected(data[:3000])
    assert "ends in the middle" in await rejected(data[: 2048 + 5120 - len(END_OF_ARCHIVE) - 512])


async def test_corrupt_header_and_trailing_data_rejected() -> None:
    """A header with a bad checksum, or data after the end marker, is refused."""
    data = bytearray(make_tar([M("f", data=b"x")]))
    good = bytes(data)
    data[100] ^= 0xFF
    assert "bad tar header" in await rejected(bytes(data))
    assert "after the end" in await rejected(good + b"junk")


async def test_malformed_pax_header_rejected() -> None:
    """A pax header whose records do not parse is refused, as are sparse records."""
    info = tarfile.TarInfo("././@PaxHeader")
    info.type, body = tarfile.XHDTYPE, b"99 path=x\n"
    info.size = len(body)
    header = info.tobuf(tarfile.USTAR_FORMAT) + body + bytes(512 - len(body))
    assert "malformed pax" in await rejected(header + make_tar([M("f")]))
    sparse = tarfile.TarInfo("f")
    sparse.pax_headers = {"GNU.sparse.major": "1"}
    assert "sparse" in await rejected(sparse.tobuf(tarfile.PAX_FORMAT) + END_OF_ARCHIVE)


async def test_zstd_round_trip_in_bounded_chunks() -> None:
    """Compressing then decompressing returns the data; no chunk exceeds the bound."""
    data = os.urandom(300_000) + bytes(3_000_000)
    packed = await collect(compress(chunked(data, 64 * 1024)))
    assert len(packed) < 400_000
    chunks = [c async for c in decompress(chunked(packed, 4096), chunk_bytes=64 * 1024)]
    assert b"".join(chunks) == data
    assert max(len(c) for c in chunks) <= 64 * 1024


async def test_decompress_rejects_garbage_and_trailing_data() -> None:
    """Not-zstd input, or bytes after the frame, are refused."""
    packed = zstandard.ZstdCompressor().compress(b"hello")
    with pytest.raises(ArchiveRejected, match="zstd"):
        await collect(decompress(chunked(b"not zstd at all" * 10)))
    with pytest.raises(ArchiveRejected):
        await collect(decompress(chunked(packed + b"more")))


async def test_decompress_passes_on_the_source_error() -> None:
    """An error of the underlying stream reaches the reader instead of a short archive."""

    async def failing() -> AsyncIterator[bytes]:
        yield zstandard.ZstdCompressor().compress(b"x" * 10_000)[:20]
        raise OSError("disk gone")

    with pytest.raises(OSError, match="disk gone"):
        await collect(decompress(failing()))


async def test_many_decompressions_at_once_do_not_starve_each_other() -> None:
    """Twenty streams whose sources read through worker threads all finish."""
    import asyncio

    data = os.urandom(200_000)
    packed = zstandard.ZstdCompressor().compress(data)

    async def threaded_source() -> AsyncIterator[bytes]:
        for i in range(0, len(packed), 8192):
            yield await asyncio.to_thread(bytes, packed[i : i + 8192])

    results = await asyncio.gather(
        *(collect(decompress(threaded_source(), chunk_bytes=16 * 1024)) for _ in range(20))
    )
    assert all(r == data for r in results)


async def test_abandoned_decompression_cleans_up() -> None:
    """Closing a decompression half way stops its pump and thread; nothing hangs."""
    packed = zstandard.ZstdCompressor().compress(os.urandom(2_000_000))
    stream = decompress(chunked(packed, 4096), chunk_bytes=64 * 1024)
    assert len(await anext(stream)) == 64 * 1024
    await stream.aclose()  # type: ignore[attr-defined]
