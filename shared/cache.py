"""The two-tier cache of image and requirement records.

Redis holds the hot copy (JSON, with a TTL refreshed on every hit); Postgres is
the record of truth. A lookup goes Redis, then Postgres (repopulating Redis);
a store writes Postgres first (an upsert, so concurrent stores of one key leave
one row), then Redis. Hits and misses are counted in Redis, so every worker of
the fleet adds to one hit rate.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Literal, TypeVar

import asyncpg
import structlog
from pydantic import BaseModel, ConfigDict
from redis.asyncio import Redis

from shared.constants import (
    STATS_HOUR_TTL_S,
    STATS_KEY,
    image_record_key,
    requirements_record_key,
    stats_hour_key,
)
from shared.settings import Settings

log = structlog.get_logger(__name__)

ImageStatus = Literal["ready", "failed", "evicted"]


class ImageRecord(BaseModel):
    """One dependency image: what it was built from and where it is."""

    model_config = ConfigDict(frozen=True)

    image_key: str
    runtime: str
    base_image: str
    base_digest: str
    deps_hash: str
    lock_hash: str
    recipe_version: int
    image_tag: str
    image_id: str | None = None
    engine_id: str | None = None
    size_bytes: int | None = None
    status: ImageStatus = "ready"
    error: str | None = None
    build_seconds: float | None = None
    created_at: datetime | None = None
    last_used_at: datetime | None = None
    use_count: int = 0


class RequirementRecord(BaseModel):
    """A canonical requirement set and the lock it resolved to for one Python."""

    model_config = ConfigDict(frozen=True)

    deps_hash: str
    python_version: str
    canonical: str
    lock: str
    pinned: bool
    resolved_at: datetime | None = None


class Tier(StrEnum):
    REDIS = "redis"
    POSTGRES = "postgres"
    MISS = "miss"


@dataclass(frozen=True)
class ImageLookup:
    record: ImageRecord | None
    tier: Tier


@dataclass(frozen=True)
class RequirementLookup:
    record: RequirementRecord | None
    tier: Tier


_L = TypeVar("_L", ImageLookup, RequirementLookup)

_IMAGE_COLUMNS = tuple(ImageRecord.model_fields)
_REQ_COLUMNS = tuple(RequirementRecord.model_fields)


def _now() -> datetime:
    return datetime.now(UTC)


class Cache:
    """Image and requirement records over Redis and Postgres."""

    def __init__(self, redis: Redis, pool: asyncpg.Pool, settings: Settings) -> None:
        self.redis = redis
        self.pool = pool
        self.settings = settings

    # --- images -------------------------------------------------------------

    async def get_image(self, image_key: str) -> ImageLookup:
        """The usable record for a key: ready, or failed within its negative TTL."""
        redis_key = image_record_key(image_key)
        raw = await self.redis.getex(redis_key, ex=self.settings.image_cache_ttl_s)
        if raw is not None:
            record = ImageRecord.model_validate_json(raw)
            if self._usable(record):
                return await self._counted("image", image_key, ImageLookup(record, Tier.REDIS))
        row = await self.pool.fetchrow("select * from image_cache where image_key = $1", image_key)
        stored = ImageRecord(**dict(row)) if row is not None else None
        if stored is None or not self._usable(stored):
            await self.redis.delete(redis_key)
            return await self._counted("image", image_key, ImageLookup(None, Tier.MISS))
        await self._publish_image(stored)
        return await self._counted("image", image_key, ImageLookup(stored, Tier.POSTGRES))

    async def put_image(self, record: ImageRecord) -> None:
        """Upsert the record in Postgres, then publish it in Redis."""
        columns = [c for c in _IMAGE_COLUMNS if c not in ("created_at", "last_used_at")]
        values = [getattr(record, c) for c in columns]
        placeholders = ", ".join(f"${i}" for i in range(1, len(columns) + 1))
        updates = ", ".join(f"{c} = excluded.{c}" for c in columns if c != "image_key")
        row = await self.pool.fetchrow(
            f"insert into image_cache ({', '.join(columns)}) values ({placeholders})"  # noqa: S608
            f" on conflict (image_key) do update set {updates},"
            " created_at = now(), last_used_at = now() returning *",
            *values,
        )
        assert row is not None
        await self._publish_image(ImageRecord(**dict(row)))

    async def touch_image(self, image_key: str) -> None:
        """Count a use: last_used_at and use_count drive eviction order."""
        await self.pool.execute(
            "update image_cache set last_used_at = now(), use_count = use_count + 1"
            " where image_key = $1",
            image_key,
        )

    async def forget_image(self, image_key: str, *, status: ImageStatus, reason: str) -> None:
        """Mark a record evicted or failed in Postgres and drop its Redis copy."""
        await self.pool.execute(
            "update image_cache set status = $2, error = $3 where image_key = $1",
            image_key,
            status,
            reason,
        )
        await self.redis.delete(image_record_key(image_key))
        log.info("cache.forget", key=image_key[:12], status=status, reason=reason)

    def _usable(self, record: ImageRecord) -> bool:
        if record.status == "ready":
            return True
        if record.status == "failed" and record.created_at is not None:
            age_s = (_now() - record.created_at).total_seconds()
            return age_s < self.settings.failed_build_ttl_s
        return False

    async def _publish_image(self, record: ImageRecord) -> None:
        if record.status == "evicted":
            await self.redis.delete(image_record_key(record.image_key))
            return
        ttl_s = (
            self.settings.image_cache_ttl_s
            if record.status == "ready"
            else self.settings.failed_build_ttl_s
        )
        await self.redis.set(image_record_key(record.image_key), record.model_dump_json(), ex=ttl_s)

    # --- requirements -------------------------------------------------------

    async def get_requirements(self, deps_hash: str, python_version: str) -> RequirementLookup:
        """The lock for a set; an unpinned lock older than lock_ttl_s is a miss."""
        redis_key = requirements_record_key(deps_hash, python_version)
        raw = await self.redis.getex(redis_key, ex=self.settings.requirements_cache_ttl_s)
        if raw is not None:
            record = RequirementRecord.model_validate_json(raw)
            if self._fresh(record):
                return await self._counted(
                    "requirements", deps_hash, RequirementLookup(record, Tier.REDIS)
                )
        row = await self.pool.fetchrow(
            f"select {', '.join(_REQ_COLUMNS)} from requirements"  # noqa: S608
            " where deps_hash = $1 and python_version = $2",
            deps_hash,
            python_version,
        )
        stored = RequirementRecord(**dict(row)) if row is not None else None
        if stored is None or not self._fresh(stored):
            await self.redis.delete(redis_key)
            return await self._counted(
                "requirements", deps_hash, RequirementLookup(None, Tier.MISS)
            )
        await self.pool.execute(
            "update requirements set last_used_at = now()"
            " where deps_hash = $1 and python_version = $2",
            deps_hash,
            python_version,
        )
        await self._publish_requirements(stored)
        return await self._counted(
            "requirements", deps_hash, RequirementLookup(stored, Tier.POSTGRES)
        )

    async def put_requirements(self, record: RequirementRecord) -> RequirementRecord:
        """Upsert the lock (resolved now) in Postgres, then publish it in Redis."""
        row = await self.pool.fetchrow(
            "insert into requirements (deps_hash, python_version, canonical, lock, pinned)"
            " values ($1, $2, $3, $4, $5)"
            " on conflict (deps_hash, python_version) do update set"
            " canonical = excluded.canonical, lock = excluded.lock, pinned = excluded.pinned,"
            " resolved_at = now(), last_used_at = now()"
            " returning deps_hash, python_version, canonical, lock, pinned, resolved_at",
            record.deps_hash,
            record.python_version,
            record.canonical,
            record.lock,
            record.pinned,
        )
        assert row is not None
        stored = RequirementRecord(**dict(row))
        await self._publish_requirements(stored)
        return stored

    def _fresh(self, record: RequirementRecord) -> bool:
        if record.pinned or record.resolved_at is None:
            return record.pinned
        return (_now() - record.resolved_at).total_seconds() < self.settings.lock_ttl_s

    async def _publish_requirements(self, record: RequirementRecord) -> None:
        await self.redis.set(
            requirements_record_key(record.deps_hash, record.python_version),
            record.model_dump_json(),
            ex=self.settings.requirements_cache_ttl_s,
        )

    # --- fleet-wide counters --------------------------------------------------

    async def _counted(self, kind: str, key: str, lookup: _L) -> _L:
        hit = lookup.tier is not Tier.MISS
        field = f"{kind}_{'hit' if hit else 'miss'}"
        await count(self.redis, field)
        log.info("cache.lookup", kind=kind, key=key[:12], tier=str(lookup.tier), hit=hit)
        return lookup


async def count(redis: Redis, field: str, amount: int = 1) -> None:
    """Add to a fleet-wide counter, overall and in the current hour's bucket."""
    hour_key = stats_hour_key(time.strftime("%Y%m%d%H", time.gmtime()))
    async with redis.pipeline(transaction=False) as pipe:
        pipe.hincrby(STATS_KEY, field, amount)
        pipe.hincrby(hour_key, field, amount)
        pipe.expire(hour_key, STATS_HOUR_TTL_S)
        await pipe.execute()


def stats_keys(last_hours: int | None) -> list[str]:
    """The counter hashes to sum: the overall one, or the last N hourly buckets."""
    if last_hours is None:
        return [STATS_KEY]
    now = time.time()
    return [
        stats_hour_key(time.strftime("%Y%m%d%H", time.gmtime(now - 3600 * h)))
        for h in range(last_hours)
    ]


@dataclass(frozen=True)
class HitRate:
    hits: int
    misses: int

    @property
    def ratio(self) -> float | None:
        total = self.hits + self.misses
        return self.hits / total if total else None


async def hit_rate(redis: Redis, kind: str = "image", *, last_hours: int | None = None) -> HitRate:
    """The fleet's hit rate, overall or over the last N hourly buckets."""
    keys = stats_keys(last_hours)
    hits = misses = 0
    async with redis.pipeline(transaction=False) as pipe:
        for key in keys:
            pipe.hmget(key, [f"{kind}_hit", f"{kind}_miss"])
        for hit, miss in await pipe.execute():
            hits += int(hit or 0)
            misses += int(miss or 0)
    return HitRate(hits, misses)
