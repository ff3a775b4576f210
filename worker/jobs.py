"""One job, start to finish: validate, key, get the image, run, record.

`execute()` is a plain async function: it receives everything it needs and
returns the small summary arq keeps as its result. Outputs go to Postgres only.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg
import structlog
from arq.constants import in_progress_key_prefix
from redis.asyncio import Redis
from redis.exceptions import RedisError

from shared.blobstore import BlobStore
from shared.cache import Cache
from shared.constants import cancel_request_key, job_finished_channel
from shared.engine import Engine
from shared.errors import BerthError, BuildFailed, ImageMissing, InvalidJob, ServiceUnavailable
from shared.hashing import execution_key, script_hash
from shared.metrics import CacheResult, Metrics
from shared.models import OUTPUT_DIR, SCRIPT_NAME, JobSpec, Status
from shared.pathcache import restore_caches, save_caches
from shared.sandbox import SandboxLimits
from shared.settings import Settings
from worker import records
from worker.images import ImageResolver, Keys, ReadyImage
from worker.records import Outcome

log = structlog.get_logger(__name__)

PYTHON = "/opt/venv/bin/python"


class EngineLink:
    """The worker's engine session, opened on first use and after a failure.

    A worker starts and stays up while its engine is down: each job then fails
    with the engine's error instead of the worker crash-looping, and the next
    job after the engine is back reconnects.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._engine: Engine | None = None
        self._lock = asyncio.Lock()

    async def get(self) -> Engine:
        async with self._lock:
            if self._engine is None:
                self._engine = await Engine.connect(self.settings)
            return self._engine

    async def reset(self) -> None:
        """Drop the session after the engine stopped answering; the next get() reopens."""
        async with self._lock:
            engine, self._engine = self._engine, None
        if engine is not None:
            await engine.close()

    async def close(self) -> None:
        await self.reset()


@dataclass(frozen=True)
class Deps:
    """What a job needs from its worker."""

    settings: Settings
    redis: Redis
    pool: asyncpg.Pool
    engines: EngineLink
    cache: Cache
    blobs: BlobStore
    worker_name: str
    metrics: Metrics


async def execute(
    deps: Deps, payload: Any, *, job_id: str, attempt: int, enqueued_at: datetime | None
) -> dict[str, Any]:
    """Run one job and record it; returns arq's small summary."""
    started = time.perf_counter()
    queue_wait_s = (
        max(0.0, time.time() - enqueued_at.timestamp()) if enqueued_at is not None else 0.0
    )
    runtime = payload.get("runtime") if isinstance(payload, dict) else None
    status = await records.start_attempt(
        deps.pool,
        job_id,
        runtime=str(runtime or "unknown")[:64],
        worker=deps.worker_name,
        attempt=attempt,
        queued_at=enqueued_at,
        timeout_s=payload.get("timeout_s") if isinstance(payload, dict) else None,
    )
    if status.final:
        log.info("job.already_final", job_id=job_id, status=str(status))
        return {"job_id": job_id, "status": str(status)}

    timings: dict[str, float] = {"queue_wait_s": round(queue_wait_s, 4)}
    keys: Keys | None = None
    columns: dict[str, Any] = {}
    claim = asyncio.create_task(_hold_claim(deps.redis, job_id, deps.settings.job_claim_ttl_s))
    try:
        spec = JobSpec.from_payload(payload, deps.settings)
        columns["script_hash"] = script_hash(spec.script)
        t0 = time.perf_counter()
        engine = await deps.engines.get()
        resolver = ImageResolver(deps.cache, engine, deps.redis, deps.settings)
        keys = await resolver.keys(spec.runtime, spec.requirements)
        deps.metrics.record_cache_lookup("requirements", "hit" if keys.lock_cached else "miss")
        timings["keys_s"] = round(time.perf_counter() - t0, 4)
        columns |= {
            "deps_hash": keys.deps_hash,
            "image_key": keys.image_key,
            "execution_key": _execution_key(spec, columns["script_hash"], keys),
        }
        outcome = await _reuse(deps, spec, columns["execution_key"])
        if outcome is None:
            outcome = await _build_and_run(
                deps, engine, resolver, spec, keys, job_id, timings, columns
            )
    except asyncio.CancelledError:
        await asyncio.shield(_interrupted(deps, job_id, columns))
        raise
    except BerthError as e:
        if isinstance(e, ServiceUnavailable) and e.service == "docker":
            await deps.engines.reset()
        if isinstance(e, BuildFailed) and not e.cached:
            deps.metrics.record_build("failed", time.perf_counter() - started)
        outcome = Outcome(Status.ERROR, error=str(e), details={"error_kind": type(e).__name__})
        if isinstance(e, InvalidJob):
            outcome.details["field"] = e.field
    except Exception as e:  # our side failed: record it, never lose the job silently
        log.exception("job.crash", job_id=job_id)
        outcome = Outcome(Status.ERROR, error=f"internal error: {type(e).__name__}: {e}")
    finally:
        claim.cancel()

    timings["total_s"] = round(time.perf_counter() - started, 4)
    outcome.timings = timings | outcome.timings
    await asyncio.shield(records.finish(deps.pool, job_id, outcome, **columns))
    if keys is not None and outcome.cache_hit is not None:
        await deps.cache.touch_image(keys.image_key)
    _record_metrics(deps.metrics, outcome, timings)
    log.info(
        "job.done",
        job_id=job_id,
        status=str(outcome.status),
        exit_code=outcome.exit_code,
        cache_hit=outcome.cache_hit,
        image_key=(keys.image_key[:12] if keys else None),
        attempt=attempt,
        **timings,
    )
    return {
        "job_id": job_id,
        "status": str(outcome.status),
        "exit_code": outcome.exit_code,
        "cache_hit": outcome.cache_hit,
    }


async def _hold_claim(redis: Redis, job_id: str, ttl_s: float) -> None:
    """Keep arq's in-progress marker on a short, renewed TTL while the job runs.

    arq sets it for the whole job timeout, so a worker killed without warning would
    hold its job that long. Renewed here every third of ``ttl_s``, it lapses within
    ``ttl_s`` of a worker's death, and another worker picks the job up.
    """
    key = in_progress_key_prefix + job_id
    while True:
        await redis.pexpire(key, int(ttl_s * 1000))
        await asyncio.sleep(ttl_s / 3)


def _record_metrics(metrics: Metrics, outcome: Outcome, timings: dict[str, float]) -> None:
    # A reused result looked up no image: it is not an image-cache hit or miss.
    image_hit = None if outcome.reused_from is not None else outcome.cache_hit
    metrics.record_job(outcome.status, timings["total_s"], timings.get("queue_wait_s"), image_hit)
    if outcome.details.get("image_source") == "built":
        metrics.record_build("succeeded", timings.get("build_s", 0.0))
    path_results: dict[str, CacheResult] = {"exact": "hit", "prefix": "prefix_hit"}
    for restored in outcome.details.get("caches", []):
        metrics.record_cache_lookup("path", path_results.get(restored["result"], "miss"))


async def announce_finished(redis: Redis, job_id: str, summary: dict[str, Any]) -> None:
    """Wake whoever waits in Client.result(): the job's row is final (or was already).

    A lost notice costs the waiter its next poll, never the result.
    """
    try:
        await redis.publish(job_finished_channel(job_id), str(summary.get("status", "")))
    except RedisError as e:
        log.warning("job.announce_failed", job_id=job_id, error=str(e))


def _execution_key(spec: JobSpec, sh: str, keys: Keys) -> str:
    return execution_key(
        script_hash=sh,
        image_key=keys.image_key,
        inputs=spec.files,
        args=spec.args,
        stdin=spec.stdin,
        env=spec.env,
    )


async def _reuse(deps: Deps, spec: JobSpec, ek: str) -> Outcome | None:
    """With reuse_result, the stored result of an identical execution; no container."""
    if not spec.reuse_result:
        return None
    row = await records.reusable(deps.pool, ek)
    if row is None:
        return None
    return Outcome(
        Status.SUCCEEDED,
        exit_code=row["exit_code"],
        stdout=row["stdout"] or b"",
        stderr=row["stderr"] or b"",
        stdout_truncated=row["stdout_truncated"],
        stderr_truncated=row["stderr_truncated"],
        outputs_truncated=row["outputs_truncated"],
        files=await records.files_of(deps.pool, row["job_id"]),
        cache_hit=True,
        reused_from=row["job_id"],
        details={"reused": True},
    )


async def _build_and_run(
    deps: Deps,
    engine: Engine,
    resolver: ImageResolver,
    spec: JobSpec,
    keys: Keys,
    job_id: str,
    timings: dict[str, float],
    columns: dict[str, Any],
) -> Outcome:
    settings = deps.settings

    async def mark_building() -> None:
        await records.set_phase(
            deps.pool,
            job_id,
            Status.BUILDING,
            deadline_s=settings.build_wait_timeout_s + settings.build_timeout_s,
            **columns,
        )

    t0 = time.perf_counter()
    image = await resolver.ready(keys, job_id=job_id, on_build=mark_building)
    image_s = time.perf_counter() - t0
    try:
        outcome = await _run(deps, engine, spec, image, job_id, timings, columns)
    except ImageMissing:
        # The record outlived its image (removed behind the cache's back): rebuild once.
        await resolver.drop_stale(keys.image_key)
        t0 = time.perf_counter()
        image = await resolver.ready(keys, job_id=job_id, on_build=mark_building)
        image_s += time.perf_counter() - t0
        outcome = await _run(deps, engine, spec, image, job_id, timings, columns)
        outcome.details["stale_image_rebuilt"] = True
    timings["image_s"] = round(image_s, 4)
    if image.build_s:
        timings["build_s"] = round(image.build_s, 4)
    outcome.cache_hit = image.cache_hit
    outcome.details["image_source"] = image.tier
    if image.parent_key is not None:
        outcome.details["parent_image_key"] = image.parent_key
    return outcome


async def _run(
    deps: Deps,
    engine: Engine,
    spec: JobSpec,
    image: ReadyImage,
    job_id: str,
    timings: dict[str, float],
    columns: dict[str, Any],
) -> Outcome:
    settings = deps.settings
    effective = spec.limits(settings)
    await records.set_phase(
        deps.pool, job_id, Status.RUNNING, deadline_s=effective["timeout_s"], **columns
    )
    limits = SandboxLimits(
        timeout_s=effective["timeout_s"],
        memory_bytes=effective["memory_bytes"],
        cpus=effective["cpus"],
        pids=effective["pids"],
        network=effective["network"],
        user=settings.job_user,
        max_stdout_bytes=settings.max_stdout_bytes,
        max_stderr_bytes=settings.max_stderr_bytes,
    )
    t0 = time.perf_counter()
    details: dict[str, Any] = {}
    async with engine.sandbox(
        image=image.tag, job_id=job_id, image_key=image.image_key, limits=limits, env=spec.env
    ) as box:
        await box.put_files({SCRIPT_NAME: spec.script.encode(), **spec.files})
        if spec.caches:
            restored = await restore_caches(
                deps.pool,
                deps.redis,
                deps.blobs,
                settings,
                scope=spec.scope,
                caches=spec.caches,
                box=box,
            )
            details["caches"] = [r.model_dump(mode="json") for r in restored]
        t_run = time.perf_counter()
        result = await box.run([PYTHON, f"/work/{SCRIPT_NAME}", *spec.args], stdin=spec.stdin)
        timings["run_s"] = round(time.perf_counter() - t_run, 4)
        files, files_truncated = await box.collect_outputs(
            OUTPUT_DIR, max_files=settings.max_output_files, max_bytes=settings.max_output_bytes
        )
        status = _status_of(
            result.exit_code, timed_out=result.timed_out, oom_killed=result.oom_killed
        )
        if spec.caches:
            saved = await save_caches(
                deps.pool,
                deps.redis,
                deps.blobs,
                settings,
                scope=spec.scope,
                caches=spec.caches,
                job_id=job_id,
                box=box,
                succeeded=status is Status.SUCCEEDED or spec.save_caches_on_failure,
            )
            details["cache_saves"] = [s.model_dump(mode="json") for s in saved]
    timings["sandbox_s"] = round(time.perf_counter() - t0, 4)
    error = None
    if status is Status.TIMEOUT:
        error = f"the script ran past its {effective['timeout_s']:g} s timeout and was killed"
    elif status is Status.OOM:
        error = f"the script used more than its {effective['memory_bytes']} bytes of memory"
    return Outcome(
        status,
        exit_code=result.exit_code,
        stdout=result.stdout,
        stderr=result.stderr,
        stdout_truncated=result.stdout_truncated,
        stderr_truncated=result.stderr_truncated,
        outputs_truncated=files_truncated,
        files=files,
        error=error,
        details=details,
    )


def _status_of(exit_code: int | None, *, timed_out: bool, oom_killed: bool) -> Status:
    if timed_out:
        return Status.TIMEOUT
    if oom_killed:
        return Status.OOM
    return Status.SUCCEEDED if exit_code == 0 else Status.FAILED


async def _interrupted(deps: Deps, job_id: str, columns: dict[str, Any]) -> None:
    """Cancelled: by an abort (final) or by a worker shutdown (arq runs it again)."""
    aborted = bool(await deps.redis.exists(cancel_request_key(job_id)))
    if aborted:
        await records.finish(
            deps.pool, job_id, Outcome(Status.CANCELLED, error="cancelled by request"), **columns
        )
        log.info("job.done", job_id=job_id, status="cancelled")
    else:
        await records.requeue(deps.pool, job_id)
        log.info("job.requeued", job_id=job_id, reason="worker shutting down")
