"""The scheduler: an arq worker that runs berth's maintenance crons (`berth scheduler`).

Each cron is a thin wrapper that pulls its dependencies from the typed context and
calls a plain async function (eviction, reaping, retention, refreshes, metrics), which
logs one line saying what it did. Crons are ``unique``: arq gives a cron run the id
``<name>:<scheduled time in ms>`` and refuses to enqueue an id it already holds, so
several scheduler replicas run each scheduled run once. Two details make that hold:

- the result is kept (``CRON_KEEP_RESULT_S``), so a replica that enqueues late, after
  another has finished the run, is refused too (with ``keep_result=0`` arq would
  accept it and run it again once the in-progress marker expires);
- no cron runs at startup (``run_at_startup`` ids use each process's own clock).

The crons live on their own queue, ``<queue_name>:scheduler``: a job worker, which
does not know these functions, never picks one up.
"""

from __future__ import annotations

import asyncio
import socket
from dataclasses import asdict
from typing import Any, TypedDict

import asyncpg
import structlog
from arq.connections import ArqRedis
from arq.cron import CronJob, cron
from arq.worker import Worker

from scheduler.eviction import SWEEP_TIMEOUT_S, evict_images, record_eviction_metrics
from scheduler.metrics import snapshot_metrics
from scheduler.reaper import reap_stuck_jobs
from scheduler.refresh import (
    LOCK_REFRESH_INTERVAL_S,
    LOCK_REFRESH_TIMEOUT_S,
    refresh_hot_cache,
    refresh_locks,
)
from scheduler.retention import delete_old_executions
from shared.blobstore import blob_store
from shared.connections import deserialize_job, redis_settings, serialize_job
from shared.db import create_pool
from shared.engine import Engine
from shared.health import HEARTBEAT_INTERVAL_S, heartbeat_key
from shared.metrics import Metrics, MetricsServer, start_metrics_server
from shared.pathcache_admin import evict_path_caches
from shared.settings import Settings

log = structlog.get_logger(__name__)

CRON_KEEP_RESULT_S = 3600.0
REAP_INTERVAL_S = 60
RETENTION_INTERVAL_S = 3600
HOT_CACHE_INTERVAL_S = 600


class SchedulerContext(TypedDict, total=False):
    """arq's ctx for the scheduler: filled in ``on_startup``, closed in ``on_shutdown``."""

    redis: ArqRedis
    settings: Settings
    pool: asyncpg.Pool
    engine: Engine
    metrics: Metrics
    metrics_server: MetricsServer


def scheduler_queue_name(settings: Settings) -> str:
    return f"{settings.queue_name}:scheduler"


async def on_startup(ctx: SchedulerContext) -> None:
    settings = ctx["settings"]
    ctx["metrics"] = Metrics("scheduler")
    ctx["pool"] = await create_pool(settings)
    ctx["engine"] = await Engine.connect(settings)
    if settings.metrics_port is not None:
        ctx["metrics_server"] = start_metrics_server(settings.metrics_port, ctx["metrics"])
    log.info(
        "scheduler.started",
        queue=scheduler_queue_name(settings),
        engine_id=(await ctx["engine"].engine_id())[:12],
        metrics_port=settings.metrics_port,
    )


async def on_shutdown(ctx: SchedulerContext) -> None:
    if "metrics_server" in ctx:
        ctx["metrics_server"].stop()
    if "engine" in ctx:
        await ctx["engine"].close()
    if "pool" in ctx:
        await ctx["pool"].close()


# --- the crons: thin, each returns a JSON summary (kept as its arq result) -------------


async def evict(ctx: SchedulerContext) -> dict[str, Any]:
    """Sweep this host's engine (other hosts: each worker's eviction_loop)."""
    report = await evict_images(ctx["engine"], ctx["pool"], ctx["redis"], ctx["settings"])
    if "metrics" in ctx:
        record_eviction_metrics(ctx["metrics"], report)
    return {"removed": len(report.removed), "lease_busy": report.lease_busy}


async def evict_paths(ctx: SchedulerContext) -> dict[str, Any]:
    """Path caches live in one shared blob store: one sweep for the whole fleet."""
    settings = ctx["settings"]
    report = await evict_path_caches(ctx["pool"], blob_store(settings), settings)
    return report.as_dict()


async def reap(ctx: SchedulerContext) -> dict[str, Any]:
    report = await reap_stuck_jobs(ctx["pool"], ctx["redis"], ctx["settings"])
    return {"reaped": report.reaped}


async def retain(ctx: SchedulerContext) -> dict[str, Any]:
    return asdict(await delete_old_executions(ctx["pool"], ctx["settings"]))


async def refresh_lock_files(ctx: SchedulerContext) -> dict[str, Any]:
    return asdict(await refresh_locks(ctx["pool"], ctx["redis"], ctx["settings"]))


async def warm_hot_cache(ctx: SchedulerContext) -> dict[str, Any]:
    return asdict(await refresh_hot_cache(ctx["pool"], ctx["redis"], ctx["settings"]))


async def take_metrics(ctx: SchedulerContext) -> dict[str, Any]:
    snapshot = await snapshot_metrics(ctx["pool"], ctx["redis"], ctx["settings"])
    if "metrics" in ctx:
        ctx["metrics"].set_queue_depth(snapshot.queue_depth)
        ctx["metrics"].set_image_cache(
            total_bytes=sum(h.size_bytes for h in snapshot.hosts),
            images=sum(h.images for h in snapshot.hosts),
            budget_bytes=ctx["settings"].image_budget_bytes,
        )
    return {"taken_at": snapshot.taken_at.isoformat()}


def every(interval_s: int) -> dict[str, Any]:
    """arq cron fields firing every ``interval_s``, aligned on the clock (so replicas agree).

    Intervals that do not divide the minute (hour, day) fire at the nearest coarser
    alignment: 90 s fires every minute, 7200 s every two hours.
    """
    if interval_s < 60:
        return {"second": set(range(0, 60, max(1, interval_s)))}
    if interval_s < 3600:
        return {"minute": set(range(0, 60, interval_s // 60)), "second": 0}
    if interval_s < 86400:
        return {"hour": set(range(0, 24, interval_s // 3600)), "minute": 0, "second": 0}
    return {"hour": 0, "minute": 0, "second": 0}


def cron_jobs(settings: Settings) -> list[CronJob]:
    """The scheduler's crons: unique, each with a timeout and a kept result."""
    schedule: list[tuple[Any, int, float]] = [
        (evict, settings.eviction_interval_s, SWEEP_TIMEOUT_S + 30),
        (evict_paths, settings.eviction_interval_s, SWEEP_TIMEOUT_S + 30),
        (reap, REAP_INTERVAL_S, 120.0),
        (retain, RETENTION_INTERVAL_S, 900.0),
        (refresh_lock_files, LOCK_REFRESH_INTERVAL_S, LOCK_REFRESH_TIMEOUT_S),
        (warm_hot_cache, HOT_CACHE_INTERVAL_S, 120.0),
        (take_metrics, settings.metrics_interval_s, 60.0),
    ]
    return [
        cron(
            function,
            **every(interval_s),
            unique=True,
            timeout=timeout_s,
            keep_result=CRON_KEEP_RESULT_S,
            max_tries=1,
        )
        for function, interval_s, timeout_s in schedule
    ]


def build_scheduler(settings: Settings, **overrides: Any) -> Worker:
    """An arq Worker running the crons on the scheduler's queue.

    Tests override ``cron_jobs``, ``burst``, ``poll_delay``, ``on_startup``…
    """
    options: dict[str, Any] = {
        "cron_jobs": cron_jobs(settings),
        "queue_name": scheduler_queue_name(settings),
        "redis_settings": redis_settings(settings),
        "job_serializer": serialize_job,
        "job_deserializer": deserialize_job,
        "on_startup": on_startup,
        "on_shutdown": on_shutdown,
        "ctx": {"settings": settings},
        # The liveness probe (`berth health --only heartbeat`) reads this host's key.
        "health_check_key": heartbeat_key(settings.queue_name, socket.gethostname()),
        "health_check_interval": HEARTBEAT_INTERVAL_S,
        "keep_result": CRON_KEEP_RESULT_S,
        "max_tries": 1,
    }
    options.update(overrides)
    return Worker(**options)


async def run_scheduler(settings: Settings) -> None:
    """Run until SIGINT/SIGTERM (arq cancels its main task), then close everything."""
    worker = build_scheduler(settings)
    try:
        await worker.async_run()
    except asyncio.CancelledError:
        log.info("scheduler.stopping")
    finally:
        await worker.close()
