"""`berth warm`, the init container's command, over real Redis and Postgres."""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime, timedelta

import asyncpg
from arq.connections import ArqRedis

from shared.cache import Cache, RequirementRecord, Tier
from shared.constants import image_record_key
from shared.settings import Settings
from shared.warm import warm
from tests.test_cache import image


def berth_cli(settings: Settings, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """Run the real `berth` entry point in a subprocess with these settings."""
    environ = {
        "PATH": "/usr/bin:/bin",
        "BERTH_REDIS_URL": settings.redis_url,
        "BERTH_POSTGRES_DSN": settings.postgres_dsn.get_secret_value(),
        "BERTH_LOG_FORMAT": "json",
        **env,
    }
    return subprocess.run(
        [sys.executable, "-c", "from shared.cli import main; main()", *args],
        capture_output=True,
        text=True,
        env=environ,
        timeout=60,
        check=False,
    )


async def test_warm_on_empty_database(
    redis: ArqRedis, pool: asyncpg.Pool, settings: Settings
) -> None:
    """An empty database warms nothing and is not an error."""
    result = await warm(redis, pool, settings)
    assert (result.images, result.requirements) == (0, 0)
    assert await redis.dbsize() == 0


async def test_warm_loads_most_recent_ready_records(
    redis: ArqRedis, pool: asyncpg.Pool, settings: Settings
) -> None:
    """Warm publishes the N most recently used ready images, skipping evicted ones."""
    cache = Cache(redis, pool, settings)
    keys = [str(i) * 64 for i in range(5)]
    for i, key in enumerate(keys):
        await cache.put_image(image(key))
        await pool.execute(
            "update image_cache set last_used_at = $2 where image_key = $1",
            key,
            datetime.now(UTC) - timedelta(minutes=10 - i),
        )
    await cache.forget_image(keys[4], status="evicted", reason="test")
    await cache.put_requirements(
        RequirementRecord(
            deps_hash="r" * 64,
            python_version="3.11",
            canonical="six",
            lock="six==1.16.0",
            pinned=False,
        )
    )
    await redis.flushdb()

    result = await warm(redis, pool, settings, limit=2)
    assert (result.images, result.requirements) == (2, 1)
    # keys[3] and keys[2] are the most recent ready ones (keys[4] is evicted)
    assert await redis.exists(image_record_key(keys[3])) == 1
    assert await redis.exists(image_record_key(keys[2])) == 1
    assert await redis.exists(image_record_key(keys[1])) == 0
    assert (await cache.get_image(keys[3])).tier is Tier.REDIS


async def test_warm_skips_expired_unpinned_locks(
    redis: ArqRedis, pool: asyncpg.Pool, settings: Settings
) -> None:
    """An unpinned lock past lock_ttl_s is not warmed, so the next job re-resolves it."""
    cache = Cache(redis, pool, settings)
    await cache.put_requirements(
        RequirementRecord(
            deps_hash="r" * 64,
            python_version="3.11",
            canonical="six",
            lock="six==1.16.0",
            pinned=False,
        )
    )
    await pool.execute("update requirements set resolved_at = now() - interval '2 days'")
    await redis.flushdb()
    assert (await warm(redis, pool, settings)).requirements == 0


async def test_cli_warm_prints_counts(
    redis: ArqRedis, pool: asyncpg.Pool, settings: Settings
) -> None:
    """`berth warm` prints how many records it loaded and exits 0."""
    await Cache(redis, pool, settings).put_image(image())
    await redis.flushdb()
    done = berth_cli(settings, "warm")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "warmed 1 image record(s) and 0 lock(s)"
    assert await redis.exists(image_record_key("a" * 64)) == 1


def test_cli_warm_with_postgres_down(settings: Settings) -> None:
    """With Postgres unreachable, warm exits non-zero with one line naming it."""
    done = berth_cli(
        settings, "warm", BERTH_POSTGRES_DSN="postgresql://berth:secret@127.0.0.1:1/berth"
    )
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [done.stderr.strip().splitlines()[-1]]
    assert done.stderr.startswith("berth: postgres at postgresql://berth:***@127.0.0.1:1/berth")
    assert "Traceback" not in done.stderr
    assert "secret" not in done.stderr


def test_cli_warm_with_redis_down(settings: Settings) -> None:
    """With Redis unreachable, warm exits non-zero with one line naming it."""
    done = berth_cli(settings, "warm", BERTH_REDIS_URL="redis://127.0.0.1:1/0")
    assert done.returncode == 1
    assert done.stderr.startswith("berth: redis at redis://127.0.0.1:1/0 is unreachable")
    assert len(done.stderr.strip().splitlines()) == 1


def test_cli_rejects_bad_setting(settings: Settings) -> None:
    """A malformed setting is one line naming the variable, exit 2."""
    done = berth_cli(settings, "warm", BERTH_RUNTIME_IMAGES='{"ruby": "x"}')
    assert done.returncode == 2
    assert done.stderr.startswith("berth: invalid setting BERTH_RUNTIME_IMAGES:")
    assert "python3.<minor>" in done.stderr
