"""The scheduler's crons: schedule, uniqueness across replicas, and each cron's effect."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal
import socket
import sys
import warnings
from datetime import datetime, timedelta
from typing import Any

import asyncpg
import pytest
from arq.connections import ArqRedis
from arq.cron import CronJob
from arq.worker import Worker

from scheduler.main import (
    CRON_KEEP_RESULT_S,
    build_scheduler,
    cron_jobs,
    every,
    scheduler_queue_name,
)
from scheduler.metrics import load_snapshot
from scheduler.refresh import refresh_locks
from shared.cache import Cache, Tier
from shared.health import heartbeat_key
from shared.settings import Settings

RUNS_KEY = "berth:test:cron-runs"


async def counted(ctx: dict[str, Any]) -> dict[str, int]:
    """Stands in for a cron's work: counts its runs in Redis, slowly enough to overlap."""
    await asyncio.sleep(0.3)
    return {"run": int(await ctx["redis"].incr(RUNS_KEY))}


def replica(settings: Settings, when: datetime) -> Worker:
    """One scheduler replica whose retention cron is next due at ``when`` (and counts)."""
    template = next(c for c in cron_jobs(settings) if c.name == "cron:retain")
    job: CronJob = dataclasses.replace(template, coroutine=counted, next_run=when)
    return build_scheduler(
        settings,
        cron_jobs=[job],
        burst=True,
        poll_delay=0.01,
        handle_signals=False,
        on_startup=None,
        on_shutdown=None,
    )


def soon(seconds: float = 0.4) -> datetime:
    """A cron time just ahead, in the local timezone arq schedules in by default."""
    return datetime.now().astimezone() + timedelta(seconds=seconds)


async def close(*workers: Worker) -> None:
    """Close arq workers; arq 0.26 calls redis' deprecated close() (named, not hidden)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Call to deprecated close", DeprecationWarning)
        for worker in workers:
            await worker.close()


async def runs(redis: ArqRedis) -> int:
    return int(await redis.get(RUNS_KEY) or 0)


def test_crons_are_unique_bounded_and_not_at_startup(settings: Settings) -> None:
    """Every cron is unique, has a timeout, keeps its result, never runs at startup."""
    jobs = cron_jobs(settings)
    assert {j.name for j in jobs} == {
        "cron:evict",
        "cron:evict_paths",
        "cron:reap",
        "cron:retain",
        "cron:refresh_lock_files",
        "cron:warm_hot_cache",
        "cron:take_metrics",
    }
    for job in jobs:
        assert job.unique
        assert job.job_id is None
        assert job.timeout_s

        assert job.keep_result_s == CRON_KEEP_RESULT_S
        assert not job.run_at_startup
        assert job.max_tries == 1


def test_every_aligns_intervals_on_the_clock() -> None:
    """Intervals become clock-aligned cron fields, so every replica picks the same times."""
    assert every(15) == {"second": {0, 15, 30, 45}}
    assert every(300) == {"minute": set(range(0, 60, 5)), "second": 0}
    assert every(7200) == {"hour": set(range(0, 24, 2)), "minute": 0, "second": 0}
    assert every(86400 * 2) == {"hour": 0, "minute": 0, "second": 0}


async def test_crons_run_on_their_own_queue(settings: Settings) -> None:
    """The scheduler does not share the job queue, so job workers never pick up a cron."""
    worker = replica(settings, soon())
    assert worker.queue_name == scheduler_queue_name(settings) != settings.queue_name


async def test_two_schedulers_run_a_cron_once(redis: ArqRedis, settings: Settings) -> None:
    """Two replicas due for the same cron run at the same moment: the work is done once."""
    when = soon()
    first, second = replica(settings, when), replica(settings, when)
    try:
        completed = await asyncio.gather(first.run_check(), second.run_check())
    finally:
        await close(first, second)
    assert await runs(redis) == 1
    assert sorted(completed) == [0, 1]


async def test_late_scheduler_does_not_run_it_again(redis: ArqRedis, settings: Settings) -> None:
    """A replica that reaches the same scheduled run after it finished is refused by arq."""
    when = soon(0.1)
    first = replica(settings, when)
    try:
        assert await first.run_check() == 1
    finally:
        await close(first)
    late = replica(settings, when)
    try:
        assert await late.run_check() == 0
    finally:
        await close(late)
    assert await runs(redis) == 1


async def test_the_next_scheduled_time_runs_again(redis: ArqRedis, settings: Settings) -> None:
    """Uniqueness is per scheduled time: the following run of the cron is not refused."""
    for offset in (0.1, 0.2):
        worker = replica(settings, soon(offset))
        try:
            assert await worker.run_check() == 1
        finally:
            await close(worker)
    assert await runs(redis) == 2


async def requirement(
    pool: asyncpg.Pool, deps_hash: str, canonical: str, *, pinned: bool, resolved: str, used: str
) -> None:
    """A requirements row resolved and last used the given intervals ago."""
    await pool.execute(
        "insert into requirements (deps_hash, python_version, canonical, lock, pinned,"
        " resolved_at, last_used_at) values ($1, '3.11', $2, 'six==1.0.0\n', $3,"
        " now() - $4::text::interval, now() - $5::text::interval)",
        deps_hash,
        canonical,
        pinned,
        resolved,
        used,
    )


async def test_lock_refresh_re_resolves_due_unpinned_sets(
    pool: asyncpg.Pool, redis: ArqRedis, settings: Settings
) -> None:
    """Due, recently used unpinned locks are re-resolved (uv, PyPI); others are left alone."""
    await requirement(pool, "due", "six\n", pinned=False, resolved="2 days", used="1 hour")
    await requirement(pool, "fresh", "six\n", pinned=False, resolved="1 hour", used="1 hour")
    await requirement(pool, "pinned", "six==1.0.0\n", pinned=True, resolved="9 days", used="1 hour")
    await requirement(pool, "idle", "six\n", pinned=False, resolved="30 days", used="30 days")
    await requirement(
        pool,
        "broken",
        "no-such-package-berth-test\n",
        pinned=False,
        resolved="2 days",
        used="1 hour",
    )
    before = await pool.fetchval("select last_used_at from requirements where deps_hash = 'due'")
    report = await refresh_locks(pool, redis, settings)
    assert report.refreshed == ["due/3.11"]
    assert report.changed == ["due/3.11"]
    assert [f.split(":")[0] for f in report.failed] == ["broken/3.11"]
    rows = {
        r["deps_hash"]: r
        for r in await pool.fetch(
            "select deps_hash, lock, resolved_at, last_used_at from requirements"
        )
    }
    assert rows["due"]["lock"].startswith("six==1.")
    assert rows["due"]["lock"] != "six==1.0.0\n"
    assert rows["due"]["last_used_at"] == before
    for untouched in ("fresh", "pinned", "idle", "broken"):
        assert rows[untouched]["lock"] == "six==1.0.0\n"
    lookup = await Cache(redis, pool, settings).get_requirements("due", "3.11")
    assert lookup.tier is Tier.REDIS


@pytest.mark.docker
async def test_a_scheduler_runs_every_cron(
    redis: ArqRedis, pool: asyncpg.Pool, settings: Settings
) -> None:
    """The real scheduler (engine, Postgres, Redis) runs each of its crons successfully."""
    scheduler = build_scheduler(settings, burst=True, poll_delay=0.01, handle_signals=False)
    when = soon(0.3)
    for job in scheduler.cron_jobs:
        job.next_run = when
    try:
        # run_check raises if any cron failed; a cron whose next slot falls inside the
        # burst (a minute boundary) may run twice, so at least one run of each.
        assert await scheduler.run_check() >= len(scheduler.cron_jobs)
    finally:
        await close(scheduler)
    snapshot = await load_snapshot(redis)
    assert snapshot is not None
    assert snapshot.queue_depth == 0


@pytest.mark.docker
async def test_berth_scheduler_beats_and_stops_on_sigterm(
    redis: ArqRedis, pool: asyncpg.Pool, settings: Settings
) -> None:
    """`berth scheduler` keeps the heartbeat its liveness probe reads; SIGTERM exits 0."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "BERTH_REDIS_URL": settings.redis_url,
        "BERTH_POSTGRES_DSN": settings.postgres_dsn.get_secret_value(),
        "BERTH_QUEUE_NAME": settings.queue_name,
        "BERTH_RUNTIME_IMAGES": json.dumps(settings.runtime_images),
        "BERTH_LOG_FORMAT": "json",
    }
    process = await asyncio.create_subprocess_exec(
        *(sys.executable, "-c", "from shared.cli import main; main()", "scheduler"),
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    key = heartbeat_key(settings.queue_name, socket.gethostname())
    try:
        async with asyncio.timeout(60):
            while not await redis.exists(key):  # noqa: ASYNC110 (polls Redis)
                await asyncio.sleep(0.1)
    finally:
        process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(60):
            _, stderr = await process.communicate()
    assert process.returncode == 0, stderr.decode()
    assert await redis.exists(key) == 0
