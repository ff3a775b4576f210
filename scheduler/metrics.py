"""The fleet's metrics snapshot: taken by the scheduler, stored in Redis, shown by `berth stats`.

Everything in it is fleet-wide: the queue, Postgres (jobs, image records per engine)
and the Redis counters every worker adds to (``shared.cache.count``: lookups, builds,
evictions), overall and over the last 24 hourly buckets. Images per host come from
the ready records, each of which names the engine that holds its image.
"""

from __future__ import annotations

from datetime import UTC, datetime

import asyncpg
import structlog
from pydantic import BaseModel
from redis.asyncio import Redis

from shared.cache import hit_rate, stats_keys
from shared.constants import METRICS_SNAPSHOT_KEY
from shared.models import Status
from shared.settings import Settings

log = structlog.get_logger(__name__)

COUNTERS = ("builds", "build_seconds_ms", "evictions", "evicted_bytes")
RECENT_HOURS = 24
ALL_STATUSES = tuple(status.value for status in Status)


class Rate(BaseModel):
    hits: int
    misses: int
    ratio: float | None


class HostImages(BaseModel):
    engine_id: str | None
    images: int
    size_bytes: int


class Counters(BaseModel):
    builds: int = 0
    build_seconds: float = 0.0
    evictions: int = 0
    evicted_bytes: int = 0


class MetricsSnapshot(BaseModel):
    taken_at: datetime
    queue_depth: int
    jobs_last_hour: dict[str, int]  # finished in the hour, or still queued/building/running
    image_hit_rate: Rate
    image_hit_rate_24h: Rate
    requirements_hit_rate: Rate
    hosts: list[HostImages]
    total: Counters
    last_24h: Counters


async def take_snapshot(pool: asyncpg.Pool, redis: Redis, settings: Settings) -> MetricsSnapshot:
    """Gather the fleet's figures now."""
    queue_depth = int(await redis.zcard(settings.queue_name))
    rows = await pool.fetch(
        "select status, count(*) as n from executions"
        " where status in ('queued', 'building', 'running')"
        " or finished_at > now() - interval '1 hour'"
        " group by status"
    )
    jobs = dict.fromkeys(ALL_STATUSES, 0) | {r["status"]: r["n"] for r in rows}
    host_rows = await pool.fetch(
        "select engine_id, count(*) as images, coalesce(sum(size_bytes), 0)::bigint as size_bytes"
        " from image_cache where status = 'ready' group by engine_id order by engine_id"
    )
    snapshot = MetricsSnapshot(
        taken_at=datetime.now(UTC),
        queue_depth=queue_depth,
        jobs_last_hour=jobs,
        image_hit_rate=await _rate(redis, "image", None),
        image_hit_rate_24h=await _rate(redis, "image", RECENT_HOURS),
        requirements_hit_rate=await _rate(redis, "requirements", None),
        hosts=[HostImages(**dict(r)) for r in host_rows],
        total=await counters(redis, None),
        last_24h=await counters(redis, RECENT_HOURS),
    )
    return snapshot


async def store_snapshot(redis: Redis, snapshot: MetricsSnapshot) -> None:
    await redis.set(METRICS_SNAPSHOT_KEY, snapshot.model_dump_json())


async def load_snapshot(redis: Redis) -> MetricsSnapshot | None:
    """The last stored snapshot, or None before the scheduler has taken one."""
    raw = await redis.get(METRICS_SNAPSHOT_KEY)
    return None if raw is None else MetricsSnapshot.model_validate_json(raw)


async def snapshot_metrics(pool: asyncpg.Pool, redis: Redis, settings: Settings) -> MetricsSnapshot:
    """Take a snapshot and store it (the scheduler's cron)."""
    snapshot = await take_snapshot(pool, redis, settings)
    await store_snapshot(redis, snapshot)
    log.info(
        "scheduler.metrics",
        queue_depth=snapshot.queue_depth,
        jobs_last_hour={k: v for k, v in snapshot.jobs_last_hour.items() if v},
        image_hit_ratio=snapshot.image_hit_rate.ratio,
        image_hit_ratio_24h=snapshot.image_hit_rate_24h.ratio,
        hosts=len(snapshot.hosts),
        images=sum(h.images for h in snapshot.hosts),
        image_bytes=sum(h.size_bytes for h in snapshot.hosts),
    )
    return snapshot


async def counters(redis: Redis, last_hours: int | None) -> Counters:
    """Builds and evictions, overall (``None``) or over the last N hourly buckets."""
    keys = stats_keys(last_hours)
    sums = dict.fromkeys(COUNTERS, 0)
    async with redis.pipeline(transaction=False) as pipe:
        for key in keys:
            pipe.hmget(key, list(COUNTERS))
        for values in await pipe.execute():
            for name, value in zip(COUNTERS, values, strict=True):
                sums[name] += int(value or 0)
    return Counters(
        builds=sums["builds"],
        build_seconds=sums["build_seconds_ms"] / 1000,
        evictions=sums["evictions"],
        evicted_bytes=sums["evicted_bytes"],
    )


async def _rate(redis: Redis, kind: str, last_hours: int | None) -> Rate:
    rate = await hit_rate(redis, kind, last_hours=last_hours)
    return Rate(hits=rate.hits, misses=rate.misses, ratio=rate.ratio)
