"""`berth cache …` and `berth stats`, run as the real entry point over real services."""

from __future__ import annotations

import json
import subprocess
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest
from arq.connections import ArqRedis

from scheduler.metrics import snapshot_metrics
from shared.cache import Cache, RequirementRecord, count
from shared.engine import Engine, SandboxLimits
from shared.humanize import format_bytes, format_duration, parse_size
from shared.settings import Settings
from tests.test_cache import image
from tests.test_eviction import (
    MakeImage,
    cache_fixture,  # noqa: F401 (fixture)
    engine_fixture,  # noqa: F401 (fixture)
    evict_settings_fixture,  # noqa: F401 (fixture)
    key_of,
    make_image_fixture,  # noqa: F401 (fixture)
    on_engine,
    status,
    tracked,
)
from tests.test_warm import berth_cli

KEY_A = "a1" + "0" * 62
KEY_B = "b2" + "0" * 62
KEY_C = "b200" + "f" * 60


async def entries(pool: asyncpg.Pool, redis: ArqRedis, settings: Settings) -> None:
    """Three records: A (3.11, small, most used), B (3.12, large, recent), C (evicted)."""
    cache = Cache(redis, pool, settings)
    await cache.put_requirements(
        RequirementRecord(
            deps_hash="d" * 64,
            python_version="3.11",
            canonical="numpy==1.26.4\nrequests==2.32.3\n",
            lock="numpy==1.26.4\nrequests==2.32.3\n",
            pinned=True,
        )
    )
    await cache.put_image(image(KEY_A, size_bytes=1536))
    await cache.put_image(image(KEY_B, runtime="python3.12", size_bytes=3 * 1024**3))
    await cache.put_image(image(KEY_C))
    await cache.forget_image(KEY_C, status="evicted", reason="test")
    now = datetime.now(UTC)
    for key, used_ago, uses in ((KEY_A, 3, 40), (KEY_B, 1, 2), (KEY_C, 9, 1)):
        await pool.execute(
            "update image_cache set last_used_at = $2, use_count = $3 where image_key = $1",
            key,
            now - timedelta(hours=used_ago),
            uses,
        )


def lines(text: str) -> list[str]:
    return text.rstrip("\n").splitlines()


async def test_ls_shows_entries_aligned(
    pool: asyncpg.Pool, redis: ArqRedis, settings: Settings
) -> None:
    """`cache ls` prints one aligned row per entry: key prefix, sizes, ages, requirements."""
    await entries(pool, redis, settings)
    done = berth_cli(settings, "cache", "ls")
    assert done.returncode == 0, done.stderr
    header, *rows = lines(done.stdout)
    assert header.split() == [
        "KEY",
        "RUNTIME",
        "SIZE",
        "USES",
        "LAST",
        "USED",
        "STATUS",
        "REQUIREMENTS",
    ]
    assert [r.split()[0] for r in rows] == [KEY_B[:12], KEY_A[:12], KEY_C[:12]]
    for column in ("RUNTIME", "LAST USED", "STATUS", "REQUIREMENTS"):
        assert {r[header.index(column) - 1] for r in rows} == {" "}
    row_a = rows[1]
    assert "1.5 KiB" in row_a
    assert "3h ago" in row_a
    assert "numpy==1.26.4, requests==2.32.3" in row_a
    assert "3.0 GiB" in rows[0]


async def test_ls_sorts_and_filters(
    pool: asyncpg.Pool, redis: ArqRedis, settings: Settings
) -> None:
    """--sort orders by size or uses, largest first; --runtime keeps one runtime."""
    await entries(pool, redis, settings)
    by_uses = berth_cli(settings, "cache", "ls", "--sort", "uses")
    assert [r.split()[0] for r in lines(by_uses.stdout)[1:]] == [
        KEY_A[:12],
        KEY_B[:12],
        KEY_C[:12],
    ]
    by_size = berth_cli(settings, "cache", "ls", "--sort", "size", "--runtime", "python3.11")
    assert [r.split()[0] for r in lines(by_size.stdout)[1:]] == [KEY_A[:12], KEY_C[:12]]


async def test_ls_json_has_full_keys(
    pool: asyncpg.Pool, redis: ArqRedis, settings: Settings
) -> None:
    """`cache ls --json` gives full keys, exact sizes, statuses and requirement lines."""
    await entries(pool, redis, settings)
    done = berth_cli(settings, "cache", "ls", "--json", "--sort", "uses")
    data = json.loads(done.stdout)
    assert [e["image_key"] for e in data] == [KEY_A, KEY_B, KEY_C]
    assert data[0]["size_bytes"] == 1536
    assert data[0]["use_count"] == 40
    assert data[0]["requirements"] == ["numpy==1.26.4", "requests==2.32.3"]
    assert data[2]["status"] == "evicted"
    datetime.fromisoformat(data[0]["last_used_at"])


def test_ls_on_an_empty_cache(pool: asyncpg.Pool, settings: Settings) -> None:
    """An empty cache is a one-line message, not an empty table."""
    done = berth_cli(settings, "cache", "ls")
    assert (done.returncode, done.stdout) == (0, "no cache entries\n")


async def test_cache_stats_text_and_json(
    pool: asyncpg.Pool, redis: ArqRedis, settings: Settings
) -> None:
    """`cache stats` shows entries by status, ready size, hit rate, builds and evictions."""
    await entries(pool, redis, settings)
    await redis.flushdb()
    await count(redis, "image_hit", 3)
    await count(redis, "image_miss", 1)
    await count(redis, "builds", 2)
    await count(redis, "build_seconds_ms", 95_000)
    await count(redis, "evictions", 1)
    await count(redis, "evicted_bytes", 2048)
    done = berth_cli(settings, "cache", "stats")
    assert done.returncode == 0, done.stderr
    out = lines(done.stdout)
    words = [" ".join(line.split()) for line in out]
    assert "entries 3 (2 ready, 0 failed, 1 evicted)" in words
    assert "total size 3.0 GiB in ready images" in words
    assert "hit rate 75.0% (3 hits / 4 lookups)" in words
    assert "builds 2 (1m35s building)" in words
    assert "evictions 1 (2.0 KiB freed)" in words
    starts = {out[0].index("3 (2 ready"), out[2].index("75.0%"), out[4].index("2 (1m35s")}
    assert len(starts) == 1
    data = json.loads(berth_cli(settings, "cache", "stats", "--json").stdout)
    assert data["entries"] == {"ready": 2, "failed": 0, "evicted": 1}
    assert data["ready_bytes"] == 3 * 1024**3 + 1536
    assert data["hit_rate"] == {"hits": 3, "misses": 1, "ratio": 0.75}
    assert data["total"]["build_seconds"] == 95.0
    assert data["last_24h"]["evictions"] == 1


async def test_stats_shows_the_scheduler_snapshot(
    pool: asyncpg.Pool, redis: ArqRedis, settings: Settings
) -> None:
    """`berth stats` shows the stored snapshot: queue, jobs, hit rates, images per host."""
    await entries(pool, redis, settings)
    await pool.execute("update image_cache set engine_id = 'engine-one-0123456789'")
    await pool.execute(
        "insert into executions (job_id, status, runtime, finished_at)"
        " values ('j1', 'succeeded', 'python3.11', now()), ('j2', 'failed', 'python3.11', now())"
    )
    await count(redis, "image_hit", 1)
    await snapshot_metrics(pool, redis, settings)
    done = berth_cli(settings, "stats")
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "just now" in out
    assert "succeeded 1  failed 1" in out
    assert "100.0% (1 hits / 1 lookups)" in out
    host = [line for line in lines(out) if line.startswith("engine-one-0")]
    assert host[0].split() == ["engine-one-0", "2", "3.0", "GiB"]
    data = json.loads(berth_cli(settings, "stats", "--json").stdout)
    assert data["live"] is False
    assert data["jobs_last_hour"]["succeeded"] == 1
    assert data["hosts"] == [
        {"engine_id": "engine-one-0123456789", "images": 2, "size_bytes": 3 * 1024**3 + 1536}
    ]


def test_stats_without_a_snapshot_takes_one(
    pool: asyncpg.Pool, redis: ArqRedis, settings: Settings
) -> None:
    """Before the scheduler has stored a snapshot, `berth stats` takes one and says so."""
    done = berth_cli(settings, "stats")
    assert done.returncode == 0, done.stderr
    assert "no scheduler snapshot in Redis yet" in done.stdout
    assert "no ready images on any host" in done.stdout


def test_clear_without_yes_changes_nothing(pool: asyncpg.Pool, settings: Settings) -> None:
    """`cache clear` without --yes explains itself on stderr and exits 2."""
    done = berth_cli(settings, "cache", "clear")
    assert done.returncode == 2
    assert done.stdout == ""
    assert "--yes" in done.stderr


async def test_rm_unknown_or_ambiguous_prefix(
    pool: asyncpg.Pool, redis: ArqRedis, settings: Settings
) -> None:
    """`cache rm` names an unknown prefix, or the keys an ambiguous one matches, and exits 1."""
    await entries(pool, redis, settings)
    missing = berth_cli(settings, "cache", "rm", "ffff")
    assert missing.returncode == 1
    assert missing.stderr.startswith("berth: no cache entry has a key starting with 'ffff'")
    ambiguous = berth_cli(settings, "cache", "rm", "b200")
    assert ambiguous.returncode == 1
    assert "'b200' matches 2 entries" in ambiguous.stderr
    assert len(ambiguous.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("size", ["10X", "-1G", "lots"])
def test_prune_rejects_a_bad_size(settings: Settings, size: str) -> None:
    """`cache prune --max-size` accepts sizes like 10G and refuses anything else, exit 2."""
    done = berth_cli(settings, "cache", "prune", "--max-size", size)
    assert done.returncode == 2
    assert "--max-size" in done.stderr


# --- commands that remove images: real tiny images, scoped to this run's label ---------


def scoped_cli(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    """`berth` seeing only this run's images (BERTH_EXTRA_LABELS), as an operator runs it."""
    return berth_cli(settings, *args, BERTH_EXTRA_LABELS=json.dumps(settings.extra_labels))


@pytest.mark.docker
async def test_rm_removes_the_image_and_marks_the_record(
    engine: Engine, make_image: MakeImage, cache: Cache, evict_settings: Settings
) -> None:
    """`cache rm PREFIX` removes that entry's image and marks it evicted; the rest stay."""
    gone = await tracked(make_image, cache, engine, used_hours_ago=1)
    kept = await tracked(make_image, cache, engine, used_hours_ago=1)
    done = scoped_cli(evict_settings, "cache", "rm", key_of(gone)[:10], "--json")
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert data["images"] == [gone.id]
    assert data["records"] == [key_of(gone)]
    assert data["freed_bytes"] == gone.size_bytes
    assert not await on_engine(engine, gone)
    assert await status(cache.pool, gone) == "evicted"
    assert await on_engine(engine, kept)
    text = scoped_cli(evict_settings, "cache", "rm", key_of(kept))
    assert text.stdout.startswith(f"rm {key_of(kept)[:12]}: removed 1 image(s) from engine ")


@pytest.mark.docker
async def test_rm_refuses_an_image_in_use(
    engine: Engine, make_image: MakeImage, cache: Cache, evict_settings: Settings
) -> None:
    """`cache rm` of an image a container uses changes nothing and says why, exit 1."""
    busy = await tracked(make_image, cache, engine, used_hours_ago=1)
    limits = SandboxLimits.from_settings(evict_settings)
    async with engine.sandbox(
        image=busy.tags[0], job_id="rm-test", image_key=key_of(busy), limits=limits, env={}
    ):
        done = scoped_cli(evict_settings, "cache", "rm", key_of(busy)[:8])
    assert done.returncode == 1
    assert "a container on this engine uses it" in done.stderr
    assert await on_engine(engine, busy)
    assert await status(cache.pool, busy) == "ready"


@pytest.mark.docker
async def test_clear_removes_everything_but_what_is_in_use(
    engine: Engine, make_image: MakeImage, cache: Cache, evict_settings: Settings
) -> None:
    """`cache clear --yes` removes every idle image, marks records, and lists what it kept."""
    idle = [await tracked(make_image, cache, engine, used_hours_ago=h) for h in (1, 2)]
    busy = await tracked(make_image, cache, engine, used_hours_ago=3)
    limits = SandboxLimits.from_settings(evict_settings)
    async with engine.sandbox(
        image=busy.tags[0], job_id="clear-test", image_key=key_of(busy), limits=limits, env={}
    ):
        done = scoped_cli(evict_settings, "cache", "clear", "--yes")
    assert done.returncode == 0, done.stderr
    first, second = lines(done.stdout)
    assert first.startswith("clear: removed 2 image(s) from engine ")
    assert first.endswith("marked 2 record(s) evicted")
    assert second == f"kept 1 in use or being built: {key_of(busy)[:12]}"
    for info in idle:
        assert not await on_engine(engine, info)
        assert await status(cache.pool, info) == "evicted"
    assert await status(cache.pool, busy) == "ready"


@pytest.mark.docker
async def test_prune_dry_run_then_prune_to_a_size(
    engine: Engine, make_image: MakeImage, cache: Cache, evict_settings: Settings
) -> None:
    """`cache prune --dry-run` lists what would go; `--max-size` then evicts LRU to fit."""
    old = await tracked(make_image, cache, engine, used_hours_ago=5)
    new = await tracked(make_image, cache, engine, used_hours_ago=1)
    max_size = str(old.size_bytes + new.size_bytes - 1)
    dry = scoped_cli(evict_settings, "cache", "prune", "--max-size", max_size, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    head, _, header, row = lines(dry.stdout)
    assert head.startswith("would remove 1 of 2 image(s)")
    assert header.split() == ["KEY", "SIZE", "REASON"]
    assert row.startswith(key_of(old)[:12])
    assert row.endswith("over budget")
    assert await on_engine(engine, old)
    done = scoped_cli(evict_settings, "cache", "prune", "--max-size", max_size, "--json")
    data = json.loads(done.stdout)
    assert [r["image_key"] for r in data["removed"]] == [key_of(old)]
    assert data["dry_run"] is False
    assert not await on_engine(engine, old)
    assert await on_engine(engine, new)
    unused = scoped_cli(evict_settings, "cache", "prune", "--unused-days", "0.01", "--json")
    assert [r["reason"] for r in json.loads(unused.stdout)["removed"]] == ["unused"]


@pytest.mark.parametrize(
    ("text", "size_bytes"),
    [("1024", 1024), ("500M", 500 * 1024**2), ("10G", 10 * 1024**3), ("2.5GiB", 5 * 1024**3 // 2)],
)
def test_sizes_read_as_operators_write_them(text: str, size_bytes: int) -> None:
    """--max-size reads bare bytes and binary K/M/G/T suffixes, with or without "iB"."""
    assert parse_size(text) == size_bytes


def test_sizes_and_durations_print_short() -> None:
    """Sizes and durations print in the largest unit that keeps them short."""
    assert [format_bytes(n) for n in (0, 1536, 3 * 1024**3, None)] == [
        "0 B",
        "1.5 KiB",
        "3.0 GiB",
        "-",
    ]
    assert [format_duration(s) for s in (0.25, 9.5, 95, 7200, 90000)] == [
        "250ms",
        "9.5s",
        "1m35s",
        "2h",
        "1d1h",
    ]
