"""The two-tier cache over real Redis and Postgres."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest
from arq.connections import ArqRedis

from shared.cache import Cache, ImageRecord, RequirementRecord, Tier, hit_rate
from shared.constants import image_record_key, requirements_record_key
from shared.settings import Settings


def image(key: str = "a" * 64, **changes: object) -> ImageRecord:
    fields: dict[str, object] = {
        "image_key": key,
        "runtime": "python3.11",
        "base_image": "berth-base/python:3.11",
        "base_digest": "sha256:" + "b" * 64,
        "deps_hash": "d" * 64,
        "lock_hash": "l" * 64,
        "recipe_version": 1,
        "image_tag": f"berth/deps:{key}",
        "image_id": "sha256:" + "c" * 64,
        "size_bytes": 1234,
        "build_seconds": 2.5,
    }
    fields.update(changes)
    return ImageRecord.model_validate(fields)


@pytest.fixture
def cache(redis: ArqRedis, pool: asyncpg.Pool, settings: Settings) -> Cache:
    return Cache(redis, pool, settings)


async def test_miss_then_hit_from_redis(cache: Cache) -> None:
    """An unknown key misses; after a store the same key hits in Redis."""
    missed = await cache.get_image("a" * 64)
    assert missed.tier is Tier.MISS
    assert missed.record is None
    await cache.put_image(image())
    hit = await cache.get_image("a" * 64)
    assert hit.tier is Tier.REDIS
    assert hit.record is not None
    assert hit.record.image_id == "sha256:" + "c" * 64
    rate = await hit_rate(cache.redis)
    assert (rate.hits, rate.misses) == (1, 1)


async def test_flushed_redis_is_served_from_postgres_and_repopulated(
    cache: Cache, redis: ArqRedis
) -> None:
    """With Redis emptied the record comes from Postgres and lands in Redis again."""
    await cache.put_image(image())
    await redis.flushdb()
    first = await cache.get_image("a" * 64)
    assert first.tier is Tier.POSTGRES
    assert await redis.exists(image_record_key("a" * 64)) == 1
    second = await cache.get_image("a" * 64)
    assert second.tier is Tier.REDIS


async def test_hit_refreshes_the_ttl(cache: Cache, redis: ArqRedis, settings: Settings) -> None:
    """A hit sets the Redis TTL back to the full image TTL."""
    await cache.put_image(image())
    await redis.expire(image_record_key("a" * 64), 10)
    await cache.get_image("a" * 64)
    ttl = await redis.ttl(image_record_key("a" * 64))
    assert ttl > settings.image_cache_ttl_s - 5


async def test_concurrent_stores_leave_one_row(cache: Cache, pool: asyncpg.Pool) -> None:
    """Eight workers storing one key at once leave exactly one row."""
    await asyncio.gather(*(cache.put_image(image(size_bytes=i)) for i in range(8)))
    rows = await pool.fetch("select size_bytes from image_cache where image_key = $1", "a" * 64)
    assert len(rows) == 1


async def test_old_entries_stay_when_a_new_key_is_stored(cache: Cache) -> None:
    """Storing a new key leaves the old one served (historical re-runs)."""
    await cache.put_image(image("a" * 64))
    await cache.put_image(image("e" * 64, deps_hash="f" * 64))
    assert (await cache.get_image("a" * 64)).record is not None
    assert (await cache.get_image("e" * 64)).record is not None


async def test_evicted_record_is_a_miss_in_both_tiers(cache: Cache, redis: ArqRedis) -> None:
    """After forget_image(evicted) neither tier serves the record, but the row stays."""
    await cache.put_image(image())
    await cache.forget_image("a" * 64, status="evicted", reason="test")
    assert await redis.exists(image_record_key("a" * 64)) == 0
    assert (await cache.get_image("a" * 64)).tier is Tier.MISS
    status = await cache.pool.fetchval(
        "select status from image_cache where image_key = $1", "a" * 64
    )
    assert status == "evicted"


async def test_failed_build_is_served_only_within_its_ttl(
    cache: Cache, pool: asyncpg.Pool, redis: ArqRedis
) -> None:
    """A failed record is a negative hit until failed_build_ttl_s has passed."""
    await cache.put_image(image(status="failed", error="No solution found"))
    hit = await cache.get_image("a" * 64)
    assert hit.record is not None
    assert hit.record.status == "failed"
    old = datetime.now(UTC) - timedelta(hours=1)
    await pool.execute("update image_cache set created_at = $1", old)
    await redis.flushdb()
    assert (await cache.get_image("a" * 64)).tier is Tier.MISS


async def test_requirements_lock_round_trip_and_expiry(
    cache: Cache, pool: asyncpg.Pool, redis: ArqRedis, settings: Settings
) -> None:
    """An unpinned lock is served until lock_ttl_s, then misses; a pinned one never expires."""
    unpinned = RequirementRecord(
        deps_hash="1" * 64,
        python_version="3.11",
        canonical="six",
        lock="six==1.16.0",
        pinned=False,
    )
    pinned = RequirementRecord(
        deps_hash="2" * 64,
        python_version="3.11",
        canonical="six==1.16.0",
        lock="six==1.16.0",
        pinned=True,
    )
    await cache.put_requirements(unpinned)
    await cache.put_requirements(pinned)
    assert (await cache.get_requirements("1" * 64, "3.11")).tier is Tier.REDIS
    assert (await cache.get_requirements("1" * 64, "3.12")).tier is Tier.MISS
    stale = datetime.now(UTC) - timedelta(seconds=settings.lock_ttl_s + 60)
    await pool.execute("update requirements set resolved_at = $1", stale)
    await redis.delete(
        requirements_record_key("1" * 64, "3.11"), requirements_record_key("2" * 64, "3.11")
    )
    assert (await cache.get_requirements("1" * 64, "3.11")).tier is Tier.MISS
    still = await cache.get_requirements("2" * 64, "3.11")
    assert still.tier is Tier.POSTGRES
    assert still.record is not None
    assert still.record.lock == "six==1.16.0"


async def test_hit_rate_is_shared_by_separate_cache_objects(
    redis: ArqRedis, pool: asyncpg.Pool, settings: Settings
) -> None:
    """Two Cache objects (two workers) add to one fleet-wide counter, overall and hourly."""
    first, second = Cache(redis, pool, settings), Cache(redis, pool, settings)
    await first.put_image(image())
    await first.get_image("a" * 64)
    await second.get_image("a" * 64)
    await second.get_image("9" * 64)
    overall = await hit_rate(redis)
    recent = await hit_rate(redis, last_hours=24)
    assert (overall.hits, overall.misses) == (2, 1)
    assert (recent.hits, recent.misses) == (2, 1)
    assert overall.ratio == pytest.approx(2 / 3)


async def test_lookup_logs_one_line_with_tier(cache: Cache) -> None:
    """Each lookup emits one cache.lookup event naming the key prefix, tier and hit."""
    import structlog.testing

    await cache.put_image(image())
    with structlog.testing.capture_logs() as logs:
        await cache.get_image("a" * 64)
    lookups = [entry for entry in logs if entry["event"] == "cache.lookup"]
    assert lookups == [
        {
            "event": "cache.lookup",
            "kind": "image",
            "key": "a" * 12,
            "tier": "redis",
            "hit": True,
            "log_level": "info",
        }
    ]
