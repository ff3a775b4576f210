"""Retention of executions rows over real Postgres."""

from __future__ import annotations

from datetime import timedelta

import asyncpg
from arq.connections import ArqRedis

from scheduler.retention import delete_old_executions
from shared.cache import Cache, RequirementRecord
from shared.settings import Settings
from tests.test_cache import image


async def row(pool: asyncpg.Pool, job_id: str, status: str, days: int, *, finished: bool) -> None:
    """An executions row queued ``days`` ago, finished then too when ``finished``."""
    await pool.execute(
        "insert into executions (job_id, status, runtime, queued_at, finished_at)"
        " values ($1, $2, 'python3.11', now() - $3::interval,"
        " case when $4 then now() - $3::interval end)",
        job_id,
        status,
        timedelta(days=days),
        finished,
    )


async def job_ids(pool: asyncpg.Pool) -> list[str]:
    return [r["job_id"] for r in await pool.fetch("select job_id from executions order by 1")]


async def test_old_rows_and_their_files_go_recent_rows_stay(
    pool: asyncpg.Pool, settings: Settings
) -> None:
    """Rows finished before the retention go with their output files; newer ones stay."""
    await row(pool, "old", "succeeded", 40, finished=True)
    await row(pool, "recent", "failed", 2, finished=True)
    for job_id in ("old", "recent"):
        await pool.execute(
            "insert into execution_files (job_id, name, size_bytes, content)"
            " values ($1, 'out.txt', 2, 'hi')",
            job_id,
        )
    report = await delete_old_executions(pool, settings)
    assert (report.deleted, report.more_left) == (1, False)
    assert await job_ids(pool) == ["recent"]
    assert await pool.fetchval("select array_agg(job_id) from execution_files") == ["recent"]


async def test_unfinished_rows_are_left_to_the_reaper(
    pool: asyncpg.Pool, settings: Settings
) -> None:
    """An old row still building or running is not deleted; an old never-run one is."""
    await row(pool, "old-running", "running", 40, finished=False)
    await row(pool, "old-building", "building", 40, finished=False)
    await row(pool, "old-queued", "queued", 40, finished=False)
    assert (await delete_old_executions(pool, settings)).deleted == 1
    assert await job_ids(pool) == ["old-building", "old-running"]


async def test_retention_follows_the_setting(pool: asyncpg.Pool, settings: Settings) -> None:
    """A shorter execution_retention_days deletes what the default would keep."""
    await row(pool, "two-days", "succeeded", 2, finished=True)
    assert (await delete_old_executions(pool, settings)).deleted == 0
    short = settings.model_copy(update={"execution_retention_days": 1.0})
    assert (await delete_old_executions(pool, short)).deleted == 1


async def test_cache_records_are_kept(
    pool: asyncpg.Pool, redis: ArqRedis, settings: Settings
) -> None:
    """Retention never touches image records or requirement locks, however old."""
    cache = Cache(redis, pool, settings)
    await cache.put_image(image())
    await cache.put_requirements(
        RequirementRecord(
            deps_hash="r" * 64, python_version="3.11", canonical="six", lock="six", pinned=False
        )
    )
    await pool.execute("update image_cache set created_at = now() - interval '400 days'")
    await pool.execute("update requirements set resolved_at = now() - interval '400 days'")
    await row(pool, "old", "succeeded", 400, finished=True)
    await delete_old_executions(pool, settings)
    assert await pool.fetchval("select count(*) from image_cache") == 1
    assert await pool.fetchval("select count(*) from requirements") == 1
