"""Stuck-job reaping: close the executions rows of jobs whose worker was lost.

A row is stuck when it is still ``building`` or ``running``, its deadline plus
``stuck_grace_s`` has passed, and arq will never run its job again: no in-progress
key (no worker holds it) and no entry in the queue (a job whose worker died stays
queued and arq retries it, so it is left alone). Such a row becomes ``error`` with
the reason "worker lost".

Each row is closed by one ``update … where status in ('building', 'running')
… returning``: however many reapers race, one of them gets the row back, so a job
is reported once. A row without a deadline gets one from its start (or queue) time
plus the longest allowed run and build.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import asyncpg
import structlog
from arq.constants import in_progress_key_prefix
from redis.asyncio import Redis

from shared.settings import Settings

log = structlog.get_logger(__name__)

WORKER_LOST = "worker lost"
BATCH = 500

# The moment after which a building/running row is overdue ($1: grace, $2: fallback).
_OVERDUE = (
    "coalesce(deadline_at, coalesce(started_at, queued_at) + make_interval(secs => $2))"
    " + make_interval(secs => $1) < now()"
)


@dataclass
class ReapReport:
    overdue: int = 0
    still_held: int = 0  # in progress or queued: arq will finish or retry it
    reaped: list[str] = field(default_factory=list)


async def reap_stuck_jobs(pool: asyncpg.Pool, redis: Redis, settings: Settings) -> ReapReport:
    """Mark overdue building/running rows that arq no longer holds as ``error``."""
    grace_s = settings.stuck_grace_s
    fallback_s = settings.max_timeout_s + settings.build_timeout_s
    rows = await pool.fetch(
        "select job_id from executions where status in ('building', 'running')"  # noqa: S608
        f" and {_OVERDUE} order by job_id limit {BATCH}",
        grace_s,
        fallback_s,
    )
    report = ReapReport(overdue=len(rows))
    job_ids = [r["job_id"] for r in rows]
    held = await _held_by_arq(redis, settings.queue_name, job_ids)
    report.still_held = len(held)
    for job_id in job_ids:
        if job_id in held:
            continue
        row = await pool.fetchrow(
            "update executions set status = 'error', error = $3, finished_at = now()"  # noqa: S608
            f" where job_id = $4 and status in ('building', 'running') and {_OVERDUE}"
            " returning job_id",
            grace_s,
            fallback_s,
            WORKER_LOST,
            job_id,
        )
        if row is not None:
            report.reaped.append(job_id)
    log.log(
        logging.WARNING if report.reaped else logging.INFO,
        "scheduler.reap",
        overdue=report.overdue,
        still_held=report.still_held,
        reaped=report.reaped,
        reason=WORKER_LOST,
    )
    return report


async def _held_by_arq(redis: Redis, queue_name: str, job_ids: list[str]) -> set[str]:
    """The job ids arq still holds: running somewhere, or queued (maybe for a retry)."""
    if not job_ids:
        return set()
    async with redis.pipeline(transaction=False) as pipe:
        for job_id in job_ids:
            pipe.exists(in_progress_key_prefix + job_id)
            pipe.zscore(queue_name, job_id)
        answers = await pipe.execute()
    held = set()
    for i, job_id in enumerate(job_ids):
        in_progress, score = answers[2 * i], answers[2 * i + 1]
        if in_progress or score is not None:
            held.add(job_id)
    return held
