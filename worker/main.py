"""The arq worker: its context, start-up and shutdown, and `berth worker`.

Settings are built once by the entrypoint and handed to `build_worker()`, which
opens nothing itself: `on_startup` opens Redis (arq's), Postgres and the Docker
engine into a typed context, and `on_shutdown` closes them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import socket
from typing import Any, TypedDict, cast

import asyncpg
import structlog
from arq import Worker, func
from arq.connections import ArqRedis
from arq.typing import WorkerCoroutine

from scheduler.eviction import CONTAINER_SWEEP_MARGIN_S, eviction_loop
from shared.blobstore import DirectoryBlobStore
from shared.cache import Cache
from shared.client import JOB_FUNCTION
from shared.connections import deserialize_job, redis_settings, serialize_job
from shared.db import create_pool
from shared.errors import ServiceUnavailable
from shared.health import HEARTBEAT_INTERVAL_S, heartbeat_key
from shared.metrics import Metrics, MetricsServer, start_metrics_server
from shared.settings import Settings
from worker.jobs import Deps, EngineLink, announce_finished, execute

log = structlog.get_logger(__name__)


class WorkerContext(TypedDict, total=False):
    """arq's ctx as berth fills it in on_startup."""

    settings: Settings
    redis: ArqRedis
    pool: asyncpg.Pool
    deps: Deps
    housekeeping: asyncio.Task[None]
    metrics_server: MetricsServer
    job_id: str
    job_try: int
    enqueue_time: Any


async def run_job(arq_ctx: dict[str, Any], payload: Any) -> dict[str, Any]:
    """arq's entry for a berth job: thin, everything happens in worker.jobs."""
    ctx = cast(WorkerContext, arq_ctx)
    summary = await execute(
        ctx["deps"],
        payload,
        job_id=ctx["job_id"],
        attempt=ctx["job_try"],
        enqueued_at=ctx.get("enqueue_time"),
    )
    await announce_finished(ctx["redis"], ctx["job_id"], summary)
    return summary


async def on_startup(arq_ctx: dict[str, Any]) -> None:
    ctx = cast(WorkerContext, arq_ctx)
    settings = ctx["settings"]
    pool = await create_pool(settings)
    engines = EngineLink(settings)
    metrics = Metrics("worker")
    if settings.metrics_port is not None:
        ctx["metrics_server"] = start_metrics_server(settings.metrics_port, metrics)
    ctx["pool"] = pool
    ctx["deps"] = Deps(
        settings=settings,
        redis=ctx["redis"],
        pool=pool,
        engines=engines,
        cache=Cache(ctx["redis"], pool, settings),
        blobs=DirectoryBlobStore(settings.path_cache_dir),
        worker_name=f"{socket.gethostname()}:{os.getpid()}",
        metrics=metrics,
    )
    try:
        engine_id: str | None = await (await engines.get()).engine_id()
    except ServiceUnavailable as e:
        # Keep serving: each job reports the engine's state until it is back.
        log.error("worker.engine_unreachable", error=str(e))
        engine_id = None
    # Each host's engine is swept by its own workers, taking turns under a lease.
    ctx["housekeeping"] = asyncio.create_task(
        eviction_loop(
            engines.get,
            pool,
            ctx["redis"],
            settings,
            container_max_age_s=settings.job_timeout_s() + CONTAINER_SWEEP_MARGIN_S,
            metrics=metrics,
        )
    )
    log.info(
        "worker.started",
        queue=settings.queue_name,
        concurrency=settings.worker_concurrency,
        engine=engine_id,
    )


async def on_shutdown(arq_ctx: dict[str, Any]) -> None:
    ctx = cast(WorkerContext, arq_ctx)
    if "housekeeping" in ctx:
        ctx["housekeeping"].cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await ctx["housekeeping"]
    if "metrics_server" in ctx:
        ctx["metrics_server"].stop()
    if "deps" in ctx:
        await ctx["deps"].engines.close()
    if "pool" in ctx:
        await ctx["pool"].close()
    log.info("worker.stopped")


def build_worker(settings: Settings, *, burst: bool = False, **overrides: Any) -> Worker:
    """An arq Worker for berth jobs; tests pass burst=True, poll_delay=0."""
    options: dict[str, Any] = {
        "functions": [
            func(
                cast(WorkerCoroutine, run_job), name=JOB_FUNCTION, max_tries=settings.job_max_tries
            )
        ],
        "queue_name": settings.queue_name,
        "redis_settings": redis_settings(settings),
        "job_serializer": serialize_job,
        "job_deserializer": deserialize_job,
        "on_startup": on_startup,
        "on_shutdown": on_shutdown,
        "ctx": {"settings": settings},
        "max_jobs": settings.worker_concurrency,
        "poll_delay": settings.poll_delay_s,
        "job_timeout": settings.job_timeout_s(),
        "keep_result": settings.result_ttl_s,
        "max_tries": settings.job_max_tries,
        "allow_abort_jobs": True,
        # One heartbeat key per process: the liveness probe checks this one's loop.
        "health_check_key": heartbeat_key(settings.queue_name, socket.gethostname()),
        "health_check_interval": HEARTBEAT_INTERVAL_S,
        "burst": burst,
        "handle_signals": not burst,
    }
    options.update(overrides)
    return Worker(**options)


async def cmd_worker(args: argparse.Namespace, settings: Settings) -> int:
    worker = build_worker(settings, burst=args.burst)
    try:
        await worker.async_run()
    finally:
        await worker.close()
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("worker", help="run a worker: pull jobs from the queue and run them")
    p.add_argument("--burst", action="store_true", help="stop when the queue is empty")
    p.set_defaults(handler=cmd_worker, service=True)
