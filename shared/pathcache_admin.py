"""Path-cache bookkeeping: deleting entries, fleet-wide counters, eviction.

Restore and save (shared.pathcache) call into this module; the scheduler's
eviction cron and `berth paths` use it directly.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import asyncpg
import structlog
from redis.asyncio import Redis
from redis.exceptions import RedisError

from shared.blobstore import BlobStore
from shared.cache import count
from shared.constants import REDIS_PREFIX, STATS_KEY
from shared.settings import Settings

log = structlog.get_logger(__name__)

TARGET_RATIO = 0.9  # eviction brings an over-budget scope or store down to 90 % of it
PENDING_STALE_S = 3600.0  # a save claim this old belongs to a writer that died
PATH_STATS_PREFIX = f"{REDIS_PREFIX}path-stats:"


# --- bookkeeping -------------------------------------------------------------


async def delete_entries(
    pool: asyncpg.Pool, store: BlobStore, ids: Sequence[int], *storage_paths: str
) -> list[asyncpg.Record]:
    """Delete rows, then their blobs (a reader holding a blob open keeps reading)."""
    rows = await pool.fetch(
        "delete from path_caches where id = any($1::bigint[])"
        " returning id, scope, key, version, state, size_bytes, storage_path",
        list(ids),
    )
    for path in {*storage_paths, *(r["storage_path"] for r in rows)}:
        try:
            await store.delete(path)
        except OSError as e:
            log.warning("path_cache.blob_delete_failed", storage_path=path, error=str(e))
    return rows


async def _record_quietly(redis: Redis, scope: str, event: str, **amounts: int) -> None:
    """Counters are worth a log line when Redis fails, never a failed job."""
    try:
        await record(redis, scope, event, **amounts)
    except (RedisError, OSError) as e:
        log.warning("path_cache.count_failed", scope=scope, event=event, error=str(e))


def path_stats_key(scope: str) -> str:
    return f"{PATH_STATS_PREFIX}{scope}"


async def record(redis: Redis, scope: str, event: str, **amounts: int) -> None:
    """Count one event (and byte amounts) fleet-wide and for the scope."""
    fields = {event: 1, **{name: n for name, n in amounts.items() if n}}
    async with redis.pipeline(transaction=False) as pipe:
        for name, n in fields.items():
            pipe.hincrby(path_stats_key(scope), name, n)
        await pipe.execute()
    for name, n in fields.items():
        await count(redis, name, n)


COUNTERS = (
    "path_exact",
    "path_prefix",
    "path_miss",
    "path_bytes_restored",
    "path_saved",
    "path_save_skipped",
    "path_save_failed",
    "path_bytes_saved",
)


async def read_counters(redis: Redis) -> tuple[dict[str, int], dict[str, dict[str, int]]]:
    """The fleet's path-cache counters: overall, and per scope."""
    keys = [STATS_KEY]
    async for raw_key in redis.scan_iter(match=f"{PATH_STATS_PREFIX}*", count=500):
        keys.append(raw_key.decode() if isinstance(raw_key, bytes) else str(raw_key))
    async with redis.pipeline(transaction=False) as pipe:
        for key in keys:
            pipe.hmget(key, list(COUNTERS))
        values = await pipe.execute()
    per_scope = {
        key.removeprefix(PATH_STATS_PREFIX): _ints(v)
        for key, v in zip(keys[1:], values[1:], strict=True)
    }
    return _ints(values[0]), per_scope


def _ints(values: Sequence[Any]) -> dict[str, int]:
    return {name: int(v or 0) for name, v in zip(COUNTERS, values, strict=True)}


# --- eviction ----------------------------------------------------------------

_OVER_BUDGET = """
    select id from (
        select id,
               sum(size_bytes) over (partition by {part} order by last_accessed_at desc, id desc)
                   as kept,
               sum(size_bytes) over (partition by {part}) as total
        from path_caches where state = 'ready'
    ) ranked where total > $1 and kept > $2
"""


@dataclass
class EvictionReport:
    """What one sweep removed; ``as_dict()`` is the log line and the JSON output."""

    stale_pending: int = 0
    unused: int = 0
    over_scope_budget: int = 0
    over_budget: int = 0
    orphan_blobs: int = 0
    bytes_freed: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


async def evict_path_caches(
    pool: asyncpg.Pool, store: BlobStore, settings: Settings
) -> EvictionReport:
    """Drop unused entries, then least recently accessed ones over the per-scope and
    global budgets (down to 90 %), dead writers' claims, and blobs nobody records."""
    report = EvictionReport()

    async def drop(sql: str, *args: Any) -> int:
        ids = [r["id"] for r in await pool.fetch(sql, *args)]
        rows = await delete_entries(pool, store, ids) if ids else []
        report.bytes_freed += sum(r["size_bytes"] for r in rows)
        return len(rows)

    report.stale_pending = await drop(
        "select id from path_caches where state = 'pending'"
        " and created_at < now() - make_interval(secs => $1)",
        PENDING_STALE_S,
    )
    report.unused = await drop(
        "select id from path_caches where state = 'ready'"
        " and last_accessed_at < now() - make_interval(secs => $1)",
        settings.path_cache_unused_days * 86400,
    )
    scope_budget = settings.path_cache_scope_budget_bytes
    report.over_scope_budget = await drop(
        _OVER_BUDGET.format(part="scope"), scope_budget, int(scope_budget * TARGET_RATIO)
    )
    budget = settings.path_cache_budget_bytes
    report.over_budget = await drop(
        _OVER_BUDGET.format(part="true"), budget, int(budget * TARGET_RATIO)
    )
    report.orphan_blobs = await _sweep_orphans(pool, store)
    log.info("path_cache.evicted", **report.as_dict())
    return report


async def _sweep_orphans(pool: asyncpg.Pool, store: BlobStore) -> int:
    """Remove blobs (and partial writes) no row records, once older than a dead claim."""
    cutoff = time.time() - PENDING_STALE_S
    old = [b async for b in store.scan() if b.modified_at < cutoff]
    known = {
        r["storage_path"]
        for r in await pool.fetch(
            "select storage_path from path_caches where storage_path = any($1::text[])",
            [b.name for b in old],
        )
    }
    removed = 0
    for blob in old:
        if (blob.partial or blob.name not in known) and await store.delete(blob.name):
            removed += 1
    return removed
