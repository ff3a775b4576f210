"""Stuck-job reaping over real Postgres and Redis (arq's own keys)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import asyncpg
from arq.connections import ArqRedis
from arq.constants import in_progress_key_prefix, retry_key_prefix

from scheduler.reaper import WORKER_LOST, reap_stuck_jobs
from shared.settings import Settings


async def execution(
    pool: asyncpg.Pool,
    job_id: str,
    *,
    status: str = "running",
    deadline_ago_s: float | None = 3600.0,
) -> None:
    """An executions row as a worker leaves it mid-job (deadline in the past by default)."""
    now = datetime.now(UTC)
    deadline = None if deadline_ago_s is None else now - timedelta(seconds=deadline_ago_s)
    started = now - timedelta(seconds=max(600.0, (deadline_ago_s or 0.0) + 60))
    await pool.execute(
        "insert into executions (job_id, status, runtime, worker, attempts, started_at,"
        " deadline_at) values ($1, $2, 'python3.11', 'host-a:123', 1, $3, $4)",
        job_id,
        status,
        started,
        deadline,
    )


async def status_of(pool: asyncpg.Pool, job_id: str) -> tuple[str, str | None]:
    row = await pool.fetchrow("select status, error from executions where job_id = $1", job_id)
    assert row is not None
    return row["status"], row["error"]


async def test_killed_workers_job_is_marked_error_once(
    pool: asyncpg.Pool, redis: ArqRedis, settings: Settings
) -> None:
    """An overdue running row that arq no longer holds becomes error "worker lost", once."""
    await execution(pool, "lost")
    first = await reap_stuck_jobs(pool, redis, settings)
    assert first.reaped == ["lost"]
    assert await status_of(pool, "lost") == ("error", WORKER_LOST)
    assert await pool.fetchval("select finished_at from executions where job_id = 'lost'")
    second = await reap_stuck_jobs(pool, redis, settings)
    assert second.reaped == []


async def test_building_row_is_reaped_too(
    pool: asyncpg.Pool, redis: ArqRedis, settings: Settings
) -> None:
    """A row lost while its image was building is reaped like a running one."""
    await execution(pool, "lost-in-build", status="building")
    assert (await reap_stuck_jobs(pool, redis, settings)).reaped == ["lost-in-build"]


async def test_concurrent_reapers_report_each_job_once(
    pool: asyncpg.Pool, redis: ArqRedis, settings: Settings
) -> None:
    """Several reapers racing over the same rows mark each row exactly once between them."""
    job_ids = [f"lost-{i}" for i in range(20)]
    for job_id in job_ids:
        await execution(pool, job_id)
    reports = await asyncio.gather(*(reap_stuck_jobs(pool, redis, settings) for _ in range(4)))
    reaped = [job_id for report in reports for job_id in report.reaped]
    assert sorted(reaped) == sorted(job_ids)


async def test_retrying_job_is_left_alone(
    pool: asyncpg.Pool, redis: ArqRedis, settings: Settings
) -> None:
    """A row whose job is back in arq's queue (a retry after a dead worker) is not touched."""
    await execution(pool, "retrying")
    await redis.zadd(settings.queue_name, {"retrying": 1})
    await redis.set(retry_key_prefix + "retrying", 1)
    report = await reap_stuck_jobs(pool, redis, settings)
    assert (report.reaped, report.still_held) == ([], 1)
    assert await status_of(pool, "retrying") == ("running", None)


async def test_job_in_progress_is_left_alone(
    pool: asyncpg.Pool, redis: ArqRedis, settings: Settings
) -> None:
    """A row whose job a worker still holds (arq's in-progress key) is not touched."""
    await execution(pool, "held")
    await redis.set(in_progress_key_prefix + "held", b"1")
    assert (await reap_stuck_jobs(pool, redis, settings)).reaped == []
    assert await status_of(pool, "held") == ("running", None)


async def test_row_within_its_grace_is_left_alone(
    pool: asyncpg.Pool, redis: ArqRedis, settings: Settings
) -> None:
    """A deadline passed by less than stuck_grace_s is not yet stuck."""
    await execution(pool, "late", deadline_ago_s=settings.stuck_grace_s / 2)
    assert (await reap_stuck_jobs(pool, redis, settings)).reaped == []


async def test_final_rows_are_never_touched(
    pool: asyncpg.Pool, redis: ArqRedis, settings: Settings
) -> None:
    """Finished rows keep their status whatever their deadline says."""
    for status in ("succeeded", "failed", "timeout", "cancelled"):
        await execution(pool, status, status=status)
    assert (await reap_stuck_jobs(pool, redis, settings)).overdue == 0


async def test_row_without_deadline_falls_back_to_longest_run(
    pool: asyncpg.Pool, redis: ArqRedis, settings: Settings
) -> None:
    """With no deadline, a row is stuck only after the longest allowed build and run."""
    await execution(pool, "no-deadline", deadline_ago_s=None)
    assert (await reap_stuck_jobs(pool, redis, settings)).reaped == []
    await pool.execute(
        "update executions set started_at = now() - interval '3 days' where job_id = 'no-deadline'"
    )
    assert (await reap_stuck_jobs(pool, redis, settings)).reaped == ["no-deadline"]
