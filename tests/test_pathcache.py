"""Path caches over real Postgres, Redis, a blob directory and the Docker engine."""

from __future__ import annotations

import asyncio
import io
import os
import secrets
import tarfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest
from arq.connections import ArqRedis
from pydantic import BaseModel, ValidationError
from structlog.testing import capture_logs

from shared.archive import TarGuard, compress
from shared.blobstore import DirectoryBlobStore
from shared.engine import Engine, RunResult, Sandbox, SandboxLimits
from shared.errors import BlobNotFound
from shared.pathcache import (
    CacheOutcome,
    CacheSpec,
    SaveOutcome,
    cache_version,
    find_entry,
    restore_caches,
    save_caches,
)
from shared.pathcache_admin import evict_path_caches, read_counters, record
from shared.settings import Settings
from tests.docker_fixtures import BASE_IMAGE
from tests.memory import peak_rss_growth_kib, reset_peak_rss

# --- helpers -------------------------------------------------------------------


@pytest.fixture
def cache_settings(settings: Settings, tmp_path: Path) -> Settings:
    """Settings with this test's own blob directory."""
    return settings.model_copy(update={"path_cache_dir": tmp_path / "blobs"})


@pytest.fixture
def store(cache_settings: Settings) -> DirectoryBlobStore:
    return DirectoryBlobStore(cache_settings.path_cache_dir)


def tar_of(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


async def once(data: bytes) -> AsyncIterator[bytes]:
    yield data


async def put_entry(
    pool: asyncpg.Pool,
    store: DirectoryBlobStore,
    *,
    scope: str,
    key: str,
    paths: list[str],
    files: dict[str, bytes] | None = None,
    raw_tar: bytes | None = None,
    accessed_days_ago: float = 0.0,
) -> int:
    """A ready entry made directly (as a save would leave it), returning its id."""
    if raw_tar is None:
        guard = TarGuard(owner=(65534, 65534), max_bytes=10**9)
        raw_tar = b"".join([c async for c in guard.sanitize(once(tar_of(files or {})))])
    storage_path = f"test/{os.urandom(8).hex()}.tar.zst"
    size = await store.write(storage_path, compress(once(raw_tar)))
    entry_id: int = await pool.fetchval(
        "insert into path_caches (scope, key, version, paths, state, size_bytes, content_bytes,"
        " compression, storage_path, last_accessed_at)"
        " values ($1, $2, $3, $4, 'ready', $5, $6, 'zstd', $7,"
        " now() - make_interval(secs => $8)) returning id",
        scope,
        key,
        cache_version(paths),
        paths,
        size,
        len(raw_tar),
        storage_path,
        accessed_days_ago * 86400,
    )
    return entry_id


def spec(key: str, *restore_keys: str, paths: tuple[str, ...] = ("deps",)) -> CacheSpec:
    return CacheSpec(key=key, paths=list(paths), restore_keys=list(restore_keys))


class Job(BaseModel):
    """How a JobSpec holds caches: errors carry the field's location."""

    caches: list[CacheSpec]


# --- the spec --------------------------------------------------------------------


def test_spec_normalizes_paths() -> None:
    """'./node_modules/' and 'node_modules' are one path, and one version."""
    a = CacheSpec(key="k", paths=["./node_modules/", ".cache//pip"])
    b = CacheSpec(key="k", paths=[".cache/pip", "node_modules"])
    assert a.paths == ["node_modules", ".cache/pip"]
    assert a.version == b.version


def test_version_depends_on_paths_and_compression() -> None:
    """The same key with other paths or another compression is another entry."""
    assert cache_version(["a"]) != cache_version(["a", "b"])
    assert cache_version(["a"]) != cache_version(["a"], compression="gzip")


@pytest.mark.parametrize(
    ("caches", "where", "says"),
    [
        ([{"key": "a,b", "paths": ["x"]}], ("caches", 0, "key"), "commas"),
        ([{"key": "k" * 513, "paths": ["x"]}], ("caches", 0, "key"), "1-512 characters"),
        ([{"key": "", "paths": ["x"]}], ("caches", 0, "key"), "1-512 characters"),
        ([{"key": "k", "paths": ["/etc"]}], ("caches", 0, "paths"), "absolute"),
        ([{"key": "k", "paths": ["../up"]}], ("caches", 0, "paths"), "'..'"),
        ([{"key": "k", "paths": ["."]}], ("caches", 0, "paths"), "not the work dir itself"),
        ([{"key": "k", "paths": ["*.whl"]}], ("caches", 0, "paths"), "wildcards"),
        ([{"key": "k", "paths": []}], ("caches", 0, "paths"), "1-16 paths"),
        ([{"key": "k", "paths": ["a", "a/b"]}], ("caches", 0, "paths"), "overlaps"),
        (
            [{"key": "k", "paths": ["a"], "restore_keys": ["ok", "x,y"]}],
            ("caches", 0, "restore_keys"),
            "restore_keys[1] may not contain commas",
        ),
        ([{"key": "k", "paths": ["a"], "extra": 1}], ("caches", 0, "extra"), "Extra inputs"),
    ],
)
def test_spec_errors_name_the_field(
    caches: list[dict[str, object]], where: tuple[object, ...], says: str
) -> None:
    """A bad cache spec fails naming its field and what is allowed."""
    with pytest.raises(ValidationError) as info:
        Job.model_validate({"caches": caches})
    error = info.value.errors()[0]
    assert error["loc"] == where
    assert says in error["msg"]


# --- the blob store --------------------------------------------------------------


async def test_blob_write_is_atomic_and_streamed(store: DirectoryBlobStore) -> None:
    """A blob appears under its name only once complete; a failed write leaves nothing."""
    seen_during_write: list[bool] = []

    async def chunks() -> AsyncIterator[bytes]:
        yield b"a" * 1000
        seen_during_write.append((store.root / "s/x.bin").exists())
        yield b"b" * 1000

    assert await store.write("s/x.bin", chunks()) == 2000
    assert seen_during_write == [False]
    async with store.read("s/x.bin") as read:
        assert b"".join([c async for c in read]) == b"a" * 1000 + b"b" * 1000

    async def failing() -> AsyncIterator[bytes]:
        yield b"partial"
        raise OSError("source broke")

    with pytest.raises(OSError, match="source broke"):
        await store.write("s/y.bin", failing())
    assert sorted(p.name for p in (store.root / "s").iterdir()) == ["x.bin"]


async def test_blob_missing_delete_and_scan(store: DirectoryBlobStore) -> None:
    """Reading a missing blob says so; delete reports whether it removed; scan lists all."""
    with pytest.raises(BlobNotFound):
        async with store.read("nope/x.bin"):
            pass
    await store.write("a/one.bin", once(b"1"))
    (store.root / "a/two.bin.part-dead").write_bytes(b"half")
    found = sorted((b.name, b.partial) for b in [b async for b in store.scan()])
    assert found == [("a/one.bin", False), ("a/two.bin", True)]
    assert await store.delete("a/two.bin") is True
    assert await store.delete("a/one.bin") is True
    assert await store.delete("a/one.bin") is False


def test_blob_names_cannot_escape(store: DirectoryBlobStore) -> None:
    """Blob names are checked: no '..', no absolute paths."""
    for name in ("../x", "/etc/passwd", "a/../../x", "A/B"):
        with pytest.raises(ValueError, match="not a blob name"):
            store.read(name)


# --- lookup ------------------------------------------------------------------------


async def test_prefix_picks_the_newest_match_of_the_first_restore_key_that_matches(
    pool: asyncpg.Pool, store: DirectoryBlobStore
) -> None:
    """Exact key first; else each restore key in order, newest entry among its matches."""
    await put_entry(pool, store, scope="t", key="deps-linux-old", paths=["deps"])
    await asyncio.sleep(0.01)
    await put_entry(pool, store, scope="t", key="deps-linux-new", paths=["deps"])
    await put_entry(pool, store, scope="t", key="deps-other", paths=["other"])
    row, result = await find_entry(pool, ["t"], spec("deps-linux-abc", "nomatch-", "deps-"))
    assert (result, row["key"] if row else None) == ("prefix", "deps-linux-new")
    row, result = await find_entry(pool, ["t"], spec("deps-linux-old", "deps-"))
    assert (result, row["key"] if row else None) == ("exact", "deps-linux-old")
    row, result = await find_entry(pool, ["t"], spec("x", "deps-", paths=("elsewhere",)))
    assert (result, row) == ("miss", None)


async def test_prefix_is_literal(pool: asyncpg.Pool, store: DirectoryBlobStore) -> None:
    """A restore key with % or _ matches those characters only (no LIKE patterns)."""
    await put_entry(pool, store, scope="t", key="a-b", paths=["deps"])
    _, result = await find_entry(pool, ["t"], spec("zz", "a_", "%"))
    assert result == "miss"


# --- eviction ------------------------------------------------------------------------


async def test_eviction_by_age(
    pool: asyncpg.Pool, store: DirectoryBlobStore, cache_settings: Settings
) -> None:
    """Entries unused for longer than path_cache_unused_days go, with their blobs."""
    old = await put_entry(pool, store, scope="t", key="old", paths=["d"], accessed_days_ago=8)
    await put_entry(pool, store, scope="t", key="fresh", paths=["d"], accessed_days_ago=6)
    report = await evict_path_caches(pool, store, cache_settings)
    assert report.unused == 1
    assert report.bytes_freed > 0
    keys = [r["key"] for r in await pool.fetch("select key from path_caches")]
    assert keys == ["fresh"]
    assert len([b async for b in store.scan()]) == 1
    assert old not in [r["id"] for r in await pool.fetch("select id from path_caches")]


async def test_eviction_by_scope_and_global_budget(
    pool: asyncpg.Pool, store: DirectoryBlobStore, cache_settings: Settings
) -> None:
    """Over a budget, least recently accessed entries go first, down to 90 % of it."""
    blob = os.urandom(10_000)  # incompressible: each entry is a little over 10 kB
    for i, days in enumerate([5.0, 4.0, 3.0, 2.0, 1.0]):
        await put_entry(
            pool,
            store,
            scope="a",
            key=f"a{i}",
            paths=["d"],
            files={"f": blob},
            accessed_days_ago=days,
        )
    for i, days in enumerate([5.5, 0.5]):
        await put_entry(
            pool,
            store,
            scope="b",
            key=f"b{i}",
            paths=["d"],
            files={"f": blob},
            accessed_days_ago=days,
        )
    size = await pool.fetchval("select max(size_bytes) from path_caches")
    settings = cache_settings.model_copy(
        update={
            "path_cache_scope_budget_bytes": int(size * 3.5),  # a: 5 entries -> keep 3
            "path_cache_budget_bytes": int(size * 4.5),  # then 5 in all -> keep 4
        }
    )
    report = await evict_path_caches(pool, store, settings)
    assert (report.over_scope_budget, report.over_budget) == (2, 1)
    keys = sorted(r["key"] for r in await pool.fetch("select key from path_caches"))
    assert keys == ["a2", "a3", "a4", "b1"]
    assert len([b async for b in store.scan()]) == 4


async def test_eviction_reaps_dead_claims_and_orphan_blobs(
    pool: asyncpg.Pool, store: DirectoryBlobStore, cache_settings: Settings
) -> None:
    """A pending claim older than an hour and blobs no row records are removed."""
    await pool.execute(
        "insert into path_caches (scope, key, version, paths, state, compression, storage_path,"
        " created_at) values ('t', 'k', 'v', '{d}', 'pending', 'zstd', 'x/dead.tar.zst',"
        " now() - interval '2 hours')"
    )
    await store.write("x/dead.tar.zst", once(b"half"))
    await store.write("x/orphan.tar.zst", once(b"lost"))
    await store.write("x/young.tar.zst", once(b"being written"))
    old = time.time() - 7200
    for name in ("dead.tar.zst", "orphan.tar.zst"):
        os.utime(store.root / "x" / name, (old, old))
    report = await evict_path_caches(pool, store, cache_settings)
    assert (report.stale_pending, report.orphan_blobs) == (1, 1)
    assert [b.name async for b in store.scan()] == ["x/young.tar.zst"]
    assert await pool.fetchval("select count(*) from path_caches") == 0


async def test_counters_per_scope_and_overall(redis: ArqRedis) -> None:
    """Counters are kept per scope and fleet-wide."""
    await record(redis, "t1", "path_exact", path_bytes_restored=100)
    await record(redis, "t2", "path_miss")
    await record(redis, "t2", "path_saved", path_bytes_saved=50)
    overall, scopes = await read_counters(redis)
    assert (overall["path_exact"], overall["path_miss"], overall["path_bytes_saved"]) == (1, 1, 50)
    assert scopes["t1"]["path_bytes_restored"] == 100
    assert scopes["t2"]["path_saved"] == 1


# --- in containers -------------------------------------------------------------------

docker = pytest.mark.docker


@pytest.fixture(scope="session")
def _cache_images() -> dict[str, str]:
    return {}


@pytest.fixture
async def cache_image(engine: Engine, docker_prefix: str, _cache_images: dict[str, str]) -> str:
    """A dependency image with nothing installed (its /work belongs to the job user)."""
    if "empty" not in _cache_images:
        built = await engine.build_image(
            image_key=f"{docker_prefix}-pathcache",
            base_image=BASE_IMAGE,
            lock_text="",
            labels={"berth.test": docker_prefix},
        )
        _cache_images["empty"] = built.tag
    return _cache_images["empty"]


@dataclass
class Jobs:
    """Runs jobs the way the worker does: restore, run one command, save."""

    engine: Engine
    image: str
    prefix: str
    settings: Settings
    pool: asyncpg.Pool
    redis: ArqRedis
    store: DirectoryBlobStore

    @asynccontextmanager
    async def box(self) -> AsyncIterator[Sandbox]:
        limits = SandboxLimits.from_settings(self.settings)
        async with self.engine.sandbox(
            image=self.image,
            job_id=f"{self.prefix}-pc-{secrets.token_hex(4)}",
            image_key=f"{self.prefix}-pathcache",
            limits=limits,
            env={},
        ) as box:
            yield box

    async def restore(self, box: Sandbox, scope: str, *caches: CacheSpec) -> list[CacheOutcome]:
        return await restore_caches(
            self.pool, self.redis, self.store, self.settings, scope=scope, caches=caches, box=box
        )

    async def save(self, box: Sandbox, scope: str, *caches: CacheSpec) -> list[SaveOutcome]:
        return await save_caches(
            self.pool,
            self.redis,
            self.store,
            self.settings,
            scope=scope,
            caches=caches,
            job_id=box.job_id,
            box=box,
            succeeded=True,
        )

    async def run(
        self, scope: str, script: str, *caches: CacheSpec
    ) -> tuple[list[CacheOutcome], RunResult, list[SaveOutcome]]:
        async with self.box() as box:
            restored = await self.restore(box, scope, *caches)
            result = await box.run(["python3", "-c", script])
            saved = await self.save(box, scope, *caches) if result.exit_code == 0 else []
        assert result.exit_code == 0, result.stderr.decode()
        return restored, result, saved


@pytest.fixture
def jobs(
    engine: Engine,
    cache_image: str,
    docker_prefix: str,
    cache_settings: Settings,
    pool: asyncpg.Pool,
    redis: ArqRedis,
    store: DirectoryBlobStore,
) -> Jobs:
    return Jobs(engine, cache_image, docker_prefix, cache_settings, pool, redis, store)


async def absent(box: Sandbox, path: str) -> bool:
    """Whether ``path`` is missing from the container (as the engine sees it)."""
    try:
        async for _ in box.get_archive_stream(path):
            pass
    except FileNotFoundError:
        return True
    return False


MAKE_DEPS = """
import os
os.makedirs('deps/sub', exist_ok=True)
open('deps/a.txt', 'w').write('alpha')
open('deps/sub/b.bin', 'wb').write(bytes(range(256)) * 100)
os.symlink('a.txt', 'deps/link')
os.link('deps/a.txt', 'deps/hard')
"""

READ_DEPS = """
import os
st = os.stat('deps/sub/b.bin')
print(open('deps/link').read(), os.readlink('deps/link'), st.st_size, st.st_uid,
      os.stat('deps/hard').st_nlink)
open('deps/sub/new.txt', 'w').write('the job can write here')
"""


@docker
async def test_miss_and_save_then_exact_hit_restores_the_files(
    jobs: Jobs, pool: asyncpg.Pool, redis: ArqRedis
) -> None:
    """First run: miss, then saved; second run: exact hit, files in place and job-owned."""
    deps = spec("deps-v1", "deps-")
    restored, _, saved = await jobs.run("t", MAKE_DEPS, deps)
    assert [(o.result, o.bytes) for o in restored] == [("miss", 0)]
    assert [s.result for s in saved] == ["saved"]
    assert saved[0].bytes > 0
    row = await pool.fetchrow("select * from path_caches")
    assert row is not None
    assert (row["state"], row["scope"], row["key"], row["paths"]) == (
        "ready",
        "t",
        "deps-v1",
        ["deps"],
    )
    assert row["size_bytes"] == saved[0].bytes
    assert row["content_bytes"] > 25_600

    restored, result, saved = await jobs.run("t", READ_DEPS, deps)
    assert [(o.result, o.matched_key, o.bytes) for o in restored] == [
        ("exact", "deps-v1", row["size_bytes"])
    ]
    assert result.stdout == b"alpha a.txt 25600 65534 2\n"
    assert [s.result for s in saved] == ["exists"]
    assert await pool.fetchval("select access_count from path_caches") == 1
    overall, scopes = await read_counters(redis)
    assert (overall["path_miss"], overall["path_exact"], overall["path_saved"]) == (1, 1, 1)
    assert scopes["t"]["path_bytes_restored"] == row["size_bytes"]
    assert scopes["t"]["path_bytes_saved"] == row["size_bytes"]


@docker
async def test_restore_key_prefix_restores_the_newest_match(
    jobs: Jobs, pool: asyncpg.Pool, store: DirectoryBlobStore
) -> None:
    """With no exact entry, the newest entry matching the restore key is restored."""
    await put_entry(pool, store, scope="t", key="deps-1", paths=["deps"], files={"deps/v": b"1"})
    await asyncio.sleep(0.01)
    await put_entry(pool, store, scope="t", key="deps-2", paths=["deps"], files={"deps/v": b"2"})
    await put_entry(pool, store, scope="t", key="other-3", paths=["deps"], files={"deps/v": b"3"})
    restored, result, saved = await jobs.run(
        "t", "print(open('deps/v').read())", spec("deps-9", "nothing-", "deps-")
    )
    assert [(o.result, o.matched_key) for o in restored] == [("prefix", "deps-2")]
    assert result.stdout == b"2\n"
    assert [s.result for s in saved] == ["saved"]  # the exact key was absent


@docker
async def test_a_job_in_another_scope_cannot_see_the_entry(
    jobs: Jobs, pool: asyncpg.Pool, store: DirectoryBlobStore
) -> None:
    """Scopes are separate; the shared scope is readable by all and not written by them."""
    await put_entry(pool, store, scope="a", key="deps", paths=["deps"], files={"deps/v": b"a"})
    script = "import os\nprint(os.path.exists('deps/v'))"
    restored, result, saved = await jobs.run("b", script, spec("deps", "d"))
    assert (restored[0].result, result.stdout) == ("miss", b"False\n")
    assert saved[0].result == "skipped"  # nothing at deps/ to save

    await put_entry(pool, store, scope="shared", key="deps", paths=["deps"], files={"deps/v": b"s"})
    jobs.settings = jobs.settings.model_copy(update={"path_cache_shared_scope": "shared"})
    restored, result, saved = await jobs.run("b", "print(open('deps/v').read())", spec("deps"))
    assert [(o.result, o.scope) for o in restored] == [("exact", "shared")]
    assert result.stdout == b"s\n"
    assert saved[0].result == "exists"
    scopes = [r["scope"] for r in await pool.fetch("select scope from path_caches order by scope")]
    assert scopes == ["a", "shared"]


@docker
async def test_concurrent_saves_of_one_key(jobs: Jobs, pool: asyncpg.Pool) -> None:
    """Two jobs saving one key at once: one entry is stored, the other job skips."""
    deps = spec("deps-race")
    async with jobs.box() as one, jobs.box() as two:
        for box, text in ((one, "one"), (two, "two")):
            await box.run(
                [
                    "python3",
                    "-c",
                    f"import os; os.mkdir('deps'); open('deps/v', 'w').write({text!r})",
                ]
            )
        with capture_logs() as logs:
            results = await asyncio.gather(jobs.save(one, "t", deps), jobs.save(two, "t", deps))
    assert sorted(r[0].result for r in results) == ["exists", "saved"]
    assert await pool.fetchval("select count(*) from path_caches") == 1
    assert len([b async for b in jobs.store.scan()]) == 1
    assert "path_cache.save_skipped" in [entry["event"] for entry in logs]


@docker
async def test_missing_archive_drops_the_record_and_misses(
    jobs: Jobs, pool: asyncpg.Pool, store: DirectoryBlobStore
) -> None:
    """An entry whose archive is gone is deleted at restore time and counts as a miss."""
    await put_entry(pool, store, scope="t", key="deps", paths=["deps"], files={"deps/v": b"x"})
    for blob in [b async for b in store.scan()]:
        await store.delete(blob.name)
    async with jobs.box() as box:
        with capture_logs() as logs:
            restored = await jobs.restore(box, "t", spec("deps"))
    assert [o.result for o in restored] == ["miss"]
    assert await pool.fetchval("select count(*) from path_caches") == 0
    assert "path_cache.archive_missing" in [entry["event"] for entry in logs]


def hostile(*members: tuple[str, bytes, str]) -> bytes:
    """A raw tar (never through the guard) of (name, type, link target) members."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, kind, link in members:
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, link
            data = b"pwned" if kind == tarfile.REGTYPE else b""
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


HOSTILE = {
    "absolute path": hostile(("deps/ok", tarfile.REGTYPE, ""), ("/tmp/evil", tarfile.REGTYPE, "")),
    "dotdot": hostile(("deps/../../tmp/evil", tarfile.REGTYPE, "")),
    "symlink escape": hostile(
        ("deps", tarfile.DIRTYPE, ""),
        ("deps/esc", tarfile.SYMTYPE, "../../tmp"),
        ("deps/esc/evil", tarfile.REGTYPE, ""),
    ),
    "absolute symlink": hostile(
        ("deps/esc", tarfile.SYMTYPE, "/tmp"), ("deps/esc/evil", tarfile.REGTYPE, "")
    ),
    "hard link escape": hostile(("deps/h", tarfile.LNKTYPE, "../../etc/passwd")),
    "absolute hard link": hostile(("deps/h", tarfile.LNKTYPE, "/etc/passwd")),
}


@docker
@pytest.mark.parametrize("case", sorted(HOSTILE))
async def test_hostile_archive_is_rejected_and_writes_nothing_outside(
    case: str, jobs: Jobs, pool: asyncpg.Pool, store: DirectoryBlobStore
) -> None:
    """A hostile archive is a miss with a log line; the entry goes; nothing lands outside."""
    await put_entry(pool, store, scope="t", key="deps", paths=["deps"], raw_tar=HOSTILE[case])
    async with jobs.box() as box:
        with capture_logs() as logs:
            restored = await jobs.restore(box, "t", spec("deps"))
        for path in ("/tmp/evil", "/evil", "/work/tmp", "/work/deps/esc", "/work/deps/h"):
            assert await absent(box, path), path
    assert [o.result for o in restored] == ["miss"]
    assert "path_cache.archive_rejected" in [entry["event"] for entry in logs]
    assert await pool.fetchval("select count(*) from path_caches") == 0
    assert [b async for b in store.scan()] == []


@docker
async def test_save_refuses_links_out_of_the_work_dir(jobs: Jobs, pool: asyncpg.Pool) -> None:
    """A job whose cache path holds a link to /etc saves nothing (and does not fail)."""
    script = "import os\nos.mkdir('deps')\nos.symlink('/etc', 'deps/etc')"
    _, _, saved = await jobs.run("t", script, spec("deps"))
    assert saved[0].result == "failed"
    assert "links to absolute paths" in (saved[0].reason or "")
    assert await pool.fetchval("select count(*) from path_caches") == 0
    assert [b async for b in jobs.store.scan()] == []


@docker
async def test_save_skips_an_archive_over_the_budget(jobs: Jobs, pool: asyncpg.Pool) -> None:
    """An archive that eviction would drop at once (over 90 % of a budget) is not stored."""
    jobs.settings = jobs.settings.model_copy(update={"path_cache_scope_budget_bytes": 100_000})
    script = "import os\nos.mkdir('deps')\nopen('deps/r', 'wb').write(os.urandom(200_000))"
    _, _, saved = await jobs.run("t", script, spec("deps"))
    assert saved[0].result == "skipped"
    assert "over 90 % of the budget" in (saved[0].reason or "")
    assert await pool.fetchval("select count(*) from path_caches") == 0
    assert [b async for b in jobs.store.scan()] == []


@docker
async def test_missing_paths_are_left_out(jobs: Jobs, pool: asyncpg.Pool) -> None:
    """Paths that do not exist are skipped; the others are saved."""
    script = "import os\nos.mkdir('a')\nopen('a/f', 'w').write('f')"
    _, _, saved = await jobs.run("t", script, spec("k", paths=("a", "missing/b")))
    assert saved[0].result == "saved"
    restored, result, _ = await jobs.run(
        "t",
        "import os\nprint(open('a/f').read(), os.path.exists('missing'))",
        spec("k", paths=("a", "missing/b")),
    )
    assert (restored[0].result, result.stdout) == ("exact", b"f False\n")


BIG_MIB = 300
MAKE_BIG = f"""
import hashlib, os
os.makedirs('big', exist_ok=True)
digest = hashlib.sha256()
with open('big/blob.bin', 'wb') as f:
    for _ in range({BIG_MIB}):
        chunk = os.urandom(1 << 20)
        digest.update(chunk)
        f.write(chunk)
print(digest.hexdigest())
"""
HASH_BIG = """
import hashlib
digest = hashlib.sha256()
with open('big/blob.bin', 'rb') as f:
    while chunk := f.read(1 << 20):
        digest.update(chunk)
print(digest.hexdigest())
"""


@docker
@pytest.mark.timeout(300)
async def test_a_cache_of_hundreds_of_mb_round_trips_in_flat_memory(
    jobs: Jobs, pool: asyncpg.Pool
) -> None:
    """300 MB saved and restored intact while the worker's peak memory grows far less."""
    big = spec("big", paths=("big",))
    async with jobs.box() as box:
        made = await box.run(["python3", "-c", MAKE_BIG])
        assert made.exit_code == 0, made.stderr
        baseline = reset_peak_rss()
        saved = await jobs.save(box, "t", big)
        save_growth_kib = peak_rss_growth_kib(baseline)
    assert saved[0].result == "saved"
    assert saved[0].bytes > BIG_MIB << 20
    async with jobs.box() as box:
        baseline = reset_peak_rss()
        restored = await jobs.restore(box, "t", big)
        restore_growth_kib = peak_rss_growth_kib(baseline)
        hashed = await box.run(["python3", "-c", HASH_BIG])
    assert restored[0].result == "exact"
    assert hashed.stdout == made.stdout
    limit_kib = 64 << 10  # a fifth of the archive: buffering it whole could not fit
    assert save_growth_kib < limit_kib, save_growth_kib
    assert restore_growth_kib < limit_kib, restore_growth_kib
