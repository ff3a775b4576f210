"""What `berth cache …` does: list, count, remove and clear image cache entries.

Removal works on the Docker engine this process talks to (``docker_url``) and on the
shared records: the record becomes ``evicted`` (kept for history) and its Redis copy
goes, so the next job for the key rebuilds. A copy of the
image on another host is then a leftover there, removed first by that host's sweep.
An image that a container uses, or whose key is being built, is never removed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal

import asyncpg
from redis.asyncio import Redis

from scheduler.eviction import berth_images, prune_environments, remove_berth_image
from scheduler.metrics import Counters, Rate, counters
from shared.cache import Cache, count, hit_rate
from shared.constants import LABEL_IMAGE_KEY, build_lease_key, image_record_key
from shared.engine import Engine
from shared.errors import AmbiguousPrefix, EntryNotFound, ImageBusy
from shared.settings import Settings

SortKey = Literal["last-used", "size", "uses"]
SORT_SQL: dict[str, str] = {
    "last-used": "i.last_used_at desc",
    "size": "i.size_bytes desc nulls last",
    "uses": "i.use_count desc",
}
MIN_PREFIX = 4


@dataclass(frozen=True)
class Entry:
    image_key: str
    runtime: str
    size_bytes: int | None
    use_count: int
    last_used_at: datetime
    created_at: datetime
    status: str
    engine_id: str | None
    requirements: list[str]


@dataclass(frozen=True)
class CacheStats:
    entries: dict[str, int]
    ready_bytes: int
    hit_rate: Rate
    hit_rate_24h: Rate
    total: Counters
    last_24h: Counters


@dataclass
class Removed:
    """What rm or clear did on this engine and to the records."""

    engine_id: str
    images: list[str] = field(default_factory=list)  # image ids removed from this engine
    freed_bytes: int = 0
    records: list[str] = field(default_factory=list)  # keys marked evicted
    kept: list[str] = field(default_factory=list)  # keys in use or being built
    environments: int = 0  # environments removed from the store (of any key no image needs)


async def list_entries(
    pool: asyncpg.Pool, *, runtime: str | None = None, sort: SortKey = "last-used"
) -> list[Entry]:
    rows = await pool.fetch(
        "select i.image_key, i.runtime, i.size_bytes, i.use_count, i.last_used_at,"  # noqa: S608
        " i.created_at, i.status, i.engine_id, r.canonical"
        " from image_cache i left join lateral ("
        "  select canonical from requirements r where r.deps_hash = i.deps_hash limit 1"
        " ) r on true"
        " where $1::text is null or i.runtime = $1"
        f" order by {SORT_SQL[sort]}, i.image_key",
        runtime,
    )
    return [
        Entry(
            requirements=(r["canonical"] or "").splitlines(),
            **{k: r[k] for k in dict(r) if k != "canonical"},
        )
        for r in rows
    ]


async def cache_stats(pool: asyncpg.Pool, redis: Redis) -> CacheStats:
    rows = await pool.fetch("select status, count(*) as n from image_cache group by status")
    ready_bytes = await pool.fetchval(
        "select coalesce(sum(size_bytes), 0)::bigint from image_cache where status = 'ready'"
    )
    overall = await hit_rate(redis, "image")
    recent = await hit_rate(redis, "image", last_hours=24)
    return CacheStats(
        entries={"ready": 0, "failed": 0, "evicted": 0} | {r["status"]: r["n"] for r in rows},
        ready_bytes=int(ready_bytes),
        hit_rate=Rate(hits=overall.hits, misses=overall.misses, ratio=overall.ratio),
        hit_rate_24h=Rate(hits=recent.hits, misses=recent.misses, ratio=recent.ratio),
        total=await counters(redis, None),
        last_24h=await counters(redis, 24),
    )


async def find_key(pool: asyncpg.Pool, prefix: str) -> str:
    """The one key starting with ``prefix`` (at least 4 hex characters)."""
    prefix = prefix.strip().lower()
    if len(prefix) < MIN_PREFIX or not all(c in "0123456789abcdef" for c in prefix):
        raise EntryNotFound(prefix)
    rows = await pool.fetch(
        "select image_key from image_cache where starts_with(image_key, $1)"
        " order by image_key limit 20",
        prefix,
    )
    if not rows:
        raise EntryNotFound(prefix)
    if len(rows) > 1:
        raise AmbiguousPrefix(prefix, [r["image_key"] for r in rows])
    return str(rows[0]["image_key"])


async def remove_entry(
    engine: Engine, pool: asyncpg.Pool, redis: Redis, settings: Settings, image_key: str
) -> Removed:
    """Remove the key's images from this engine and mark its record evicted."""
    if image_key in await engine.image_keys_in_use():
        raise ImageBusy(image_key, "a container on this engine uses it")
    if await redis.exists(build_lease_key(image_key)):
        raise ImageBusy(image_key, "a worker is building it now")
    done = Removed(engine_id=await engine.engine_id())
    for image in await berth_images(engine, settings):
        if image.labels[LABEL_IMAGE_KEY] == image_key:
            if not await remove_berth_image(engine, image.id, tuple(image.tags)):
                raise ImageBusy(image_key, f"the engine refused to remove {image.id[:19]}")
            done.images.append(image.id)
            done.freed_bytes += image.size_bytes
    await Cache(redis, pool, settings).forget_image(
        image_key, status="evicted", reason="removed by berth cache rm"
    )
    done.records.append(image_key)
    done.environments = len(await prune_environments(engine, settings))
    await _count(redis, done)
    return done


async def clear_all(
    engine: Engine, pool: asyncpg.Pool, redis: Redis, settings: Settings
) -> Removed:
    """Remove every berth image this engine can spare and mark every record evicted.

    Kept: images in use or being built, and the records of keys a container uses.
    """
    in_use = await engine.image_keys_in_use()
    done = Removed(engine_id=await engine.engine_id())
    kept: set[str] = set()
    for image in await berth_images(engine, settings):
        key = image.labels[LABEL_IMAGE_KEY]
        if key in in_use or await redis.exists(build_lease_key(key)):
            kept.add(key)
        elif await remove_berth_image(engine, image.id, tuple(image.tags)):
            done.images.append(image.id)
            done.freed_bytes += image.size_bytes
        else:
            kept.add(key)
    protected = sorted(in_use | kept)
    rows = await pool.fetch(
        "update image_cache set status = 'evicted', error = 'cleared by berth cache clear'"
        " where status <> 'evicted' and not (image_key = any($1::text[])) returning image_key",
        protected,
    )
    done.records = sorted(r["image_key"] for r in rows)
    kept_records = await pool.fetch(
        "select image_key from image_cache where status <> 'evicted'"
        " and image_key = any($1::text[])",
        protected,
    )
    done.kept = sorted(kept | {r["image_key"] for r in kept_records})
    if done.records:
        await redis.delete(*(image_record_key(k) for k in done.records))
    done.environments = len(await prune_environments(engine, settings))
    await _count(redis, done)
    return done


async def _count(redis: Redis, done: Removed) -> None:
    if done.images:
        await count(redis, "evictions", len(done.images))
        await count(redis, "evicted_bytes", done.freed_bytes)
