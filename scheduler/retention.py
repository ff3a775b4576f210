"""Retention: delete executions older than ``execution_retention_days``.

A row goes when it finished (or, never having finished, was queued) longer ago than
the retention; its output files go with it (``on delete cascade``). Rows still
building or running are the reaper's, never retention's. Cache records
(``image_cache``, ``requirements``) are kept: they are history, and eviction owns
the images. Deletes run in batches so one sweep never holds a long lock.
"""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg
import structlog

from shared.settings import Settings

log = structlog.get_logger(__name__)

BATCH = 5000
MAX_BATCHES = 100  # the rest waits for the next sweep


@dataclass(frozen=True)
class RetentionReport:
    deleted: int
    retention_days: float
    more_left: bool


async def delete_old_executions(pool: asyncpg.Pool, settings: Settings) -> RetentionReport:
    """Delete expired executions rows (and their files); returns how many went."""
    days = settings.execution_retention_days
    deleted = 0
    more_left = False
    for _ in range(MAX_BATCHES):
        status = await pool.execute(
            "delete from executions where job_id in ("
            " select job_id from executions"
            " where status not in ('building', 'running')"
            " and coalesce(finished_at, queued_at) < now() - make_interval(secs => $1)"
            " limit $2)",
            days * 86400.0,
            BATCH,
        )
        batch = int(status.rsplit(" ", 1)[1])
        deleted += batch
        more_left = batch == BATCH
        if not more_left:
            break
    report = RetentionReport(deleted=deleted, retention_days=days, more_left=more_left)
    log.info("scheduler.retention", deleted=deleted, retention_days=days, more_left=more_left)
    return report
