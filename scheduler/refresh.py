"""Keeping the cache ahead of the jobs: lock refresh and the hot-cache refresh.

Lock refresh re-resolves unpinned requirement sets whose lock is about to pass (or
has passed) ``lock_ttl_s``, so the next job finds a fresh lock instead of paying for
uv. Only sets used within ``image_unused_days`` are refreshed (a set nobody uses is
left to expire), the most recently used first, at most ``LOCK_REFRESH_LIMIT`` per run.
A set that no longer parses under the current settings, or fails to resolve, is
logged and left for the next job, which reports the error to its caller.

The hot-cache refresh is ``berth warm``'s code, run on a schedule.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import asyncpg
import structlog
from redis.asyncio import Redis

from shared.cache import Cache, RequirementRecord
from shared.errors import BerthError
from shared.locks import resolve_lock
from shared.requirements import parse_requirements
from shared.settings import Settings
from shared.warm import WarmResult, warm

log = structlog.get_logger(__name__)

LOCK_REFRESH_INTERVAL_S = 600
LOCK_REFRESH_LIMIT = 20
LOCK_REFRESH_TIMEOUT_S = 1800.0


@dataclass
class LockRefreshReport:
    due: int = 0
    refreshed: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)  # the lock moved to new pins
    failed: list[str] = field(default_factory=list)


async def refresh_locks(
    pool: asyncpg.Pool,
    redis: Redis,
    settings: Settings,
    *,
    limit: int = LOCK_REFRESH_LIMIT,
) -> LockRefreshReport:
    """Re-resolve the recently used unpinned sets whose lock is due within one interval."""
    rows = await pool.fetch(
        "select deps_hash, python_version, canonical, lock, last_used_at from requirements"
        " where not pinned"
        " and resolved_at < now() - make_interval(secs => $1)"
        " and last_used_at > now() - make_interval(secs => $2)"
        " order by last_used_at desc limit $3",
        float(max(0, settings.lock_ttl_s - LOCK_REFRESH_INTERVAL_S)),
        settings.image_unused_days * 86400.0,
        limit,
    )
    report = LockRefreshReport(due=len(rows))
    cache = Cache(redis, pool, settings)
    for row in rows:
        name = f"{row['deps_hash'][:12]}/{row['python_version']}"
        try:
            req = parse_requirements(
                row["canonical"], allow_index_options=settings.allow_index_options
            )
            lock = await resolve_lock(req, python_version=row["python_version"], settings=settings)
        except BerthError as e:
            report.failed.append(f"{name}: {str(e).splitlines()[0]}")
            continue
        await cache.put_requirements(
            RequirementRecord(
                deps_hash=row["deps_hash"],
                python_version=row["python_version"],
                canonical=row["canonical"],
                lock=lock,
                pinned=False,
            )
        )
        # put_requirements counts as a use; a refresh is not one, or a set would stay
        # "recently used" (and refreshed) forever.
        await pool.execute(
            "update requirements set last_used_at = $3"
            " where deps_hash = $1 and python_version = $2",
            row["deps_hash"],
            row["python_version"],
            row["last_used_at"],
        )
        report.refreshed.append(name)
        if lock != row["lock"]:
            report.changed.append(name)
    log.info(
        "scheduler.lock_refresh",
        due=report.due,
        refreshed=len(report.refreshed),
        changed=report.changed,
        failed=report.failed,
    )
    return report


async def refresh_hot_cache(pool: asyncpg.Pool, redis: Redis, settings: Settings) -> WarmResult:
    """Republish the most used records to Redis (``berth warm``; it logs its own line)."""
    return await warm(redis, pool, settings)
