"""The producer side: what an upstream service calls to run a job.

`submit()` validates a JobSpec and enqueues it with arq under a job id (the
idempotency key when given), so the same key twice is one job. `status()` and
`result()` read the `executions` row, and arq for a job no worker has picked up
yet; `cancel()` aborts a queued or running job.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg
from arq.connections import ArqRedis
from arq.constants import in_progress_key_prefix, job_key_prefix
from arq.jobs import Job, JobStatus, SerializationError
from redis.asyncio.client import PubSub
from redis.exceptions import RedisError, WatchError

from shared.constants import CANCEL_REQUEST_TTL_S, cancel_request_key, job_finished_channel
from shared.errors import JobNotFound, QueueFull
from shared.models import JobSpec, Status
from shared.requirements import parse_requirements
from shared.settings import Settings

JOB_FUNCTION = "run_job"
# Growing delays between looks while waiting for a result (a finish notice cuts one short).
RESULT_POLL_S = (0.05, 0.1, 0.2, 0.5)
ABORT_WAIT_S = 30.0  # how long cancel() waits for the worker to confirm


@dataclass(frozen=True)
class OutputFile:
    name: str
    size_bytes: int
    content: bytes


@dataclass(frozen=True)
class JobResult:
    """A job as the caller sees it: its state, and once final, its outputs."""

    job_id: str
    status: Status
    exit_code: int | None = None
    stdout: bytes = b""
    stderr: bytes = b""
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    outputs_truncated: bool = False
    files: tuple[OutputFile, ...] = ()
    error: str | None = None
    cache_hit: bool | None = None
    image_key: str | None = None
    attempts: int = 0
    reused_from: str | None = None
    timings: dict[str, float] | None = None
    details: dict[str, Any] | None = None
    queued_at: datetime | None = None
    finished_at: datetime | None = None


class Client:
    """A producer's handle on the fleet: Redis for the queue, Postgres for results."""

    def __init__(self, redis: ArqRedis, pool: asyncpg.Pool | None, settings: Settings) -> None:
        self.redis = redis
        self.pool = pool
        self.settings = settings

    async def submit(self, spec: JobSpec) -> str:
        """Validate and enqueue; returns the job id (the same one for a repeated key)."""
        spec.check(self.settings)
        parse_requirements(
            spec.requirements,
            allow_index_options=self.settings.allow_index_options,
            max_bytes=self.settings.max_requirements_bytes,
        )
        job_id = spec.idempotency_key or uuid.uuid4().hex
        depth = await self.redis.zcard(self.settings.queue_name)
        if depth >= self.settings.max_queue_depth:
            raise QueueFull(depth, self.settings.max_queue_depth)
        # arq refuses a job id it already holds (queued, running or with a result):
        # that refusal is what makes a repeated idempotency key one job.
        await self.redis.enqueue_job(
            JOB_FUNCTION,
            spec.to_payload(),
            _job_id=job_id,
            _queue_name=self.settings.queue_name,
        )
        return job_id

    def _job(self, job_id: str) -> Job:
        return Job(
            job_id,
            self.redis,
            _queue_name=self.settings.queue_name,
            _deserializer=self.redis.job_deserializer,
        )

    async def status(self, job_id: str) -> Status:
        """The job's current status; JobNotFound if berth has never seen it."""
        result = await self._row(job_id)
        if result is not None:
            return result.status
        arq_status = await self._job(job_id).status()
        if arq_status in (JobStatus.queued, JobStatus.deferred):
            return Status.QUEUED
        if arq_status is JobStatus.in_progress:
            return Status.RUNNING
        if arq_status is JobStatus.complete:
            # Finished in arq without a row: refused before it could run (bad payload,
            # cancelled while queued).
            info = await self._job(job_id).result_info()
            if info is not None and not info.success:
                return Status.CANCELLED if _is_cancel(info.result) else Status.ERROR
        raise JobNotFound(job_id)

    async def result(self, job_id: str, timeout_s: float | None = None) -> JobResult:
        """The job's result; with a timeout, wait up to that long for it to be final.

        While waiting it listens for the worker's notice that the job finished (one
        Redis connection per waiting call) and looks at the row when it comes, so
        a result is seen about when it is written; the polls in between are only
        the safety net for a notice that never comes.
        """
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        attempt = 0
        async with _FinishNotices(self.redis, job_id, listen=bool(timeout_s)) as notices:
            while True:
                row = await self._row(job_id)
                if row is not None and row.status.final:
                    return row
                if row is None:
                    status = await self.status(job_id)  # raises JobNotFound
                    if status.final:
                        return await self._arq_only_result(job_id, status)
                if deadline is None or time.monotonic() >= deadline:
                    return row if row is not None else JobResult(job_id, await self.status(job_id))
                delay = RESULT_POLL_S[min(attempt, len(RESULT_POLL_S) - 1)]
                await notices.wait(min(delay, max(0.0, deadline - time.monotonic())))
                attempt += 1

    async def cancel(self, job_id: str) -> bool:
        """Cancel a queued or running job; False if it had already finished."""
        row = await self._row(job_id)
        if row is not None and row.status.final:
            return False
        job = self._job(job_id)
        info = await job.info()
        # Not picked up yet: take it off the queue ourselves, no worker needed.
        if await self._dequeue_if_waiting(job_id):
            runtime = _payload_runtime(info.args if info is not None else ())
            if self.pool is not None:
                await self.pool.execute(
                    "insert into executions (job_id, status, runtime, error, finished_at)"
                    " values ($1, 'cancelled', $2, 'cancelled before it started', now())"
                    " on conflict (job_id) do nothing",
                    job_id,
                    runtime,
                )
            return True
        arq_status = await job.status()
        if arq_status is JobStatus.not_found and row is None:
            raise JobNotFound(job_id)
        if arq_status is JobStatus.complete:
            return False
        # Running: mark why it stops, then let arq cancel the task on its worker.
        await self.redis.set(cancel_request_key(job_id), b"1", ex=CANCEL_REQUEST_TTL_S)
        try:
            return await job.abort(timeout=ABORT_WAIT_S)
        except SerializationError as e:
            # arq recognises an abort by the CancelledError object in the result;
            # with JSON results it arrives as {"error": "CancelledError", ...}.
            return _is_cancel(e.args[0] if e.args else None)

    async def _dequeue_if_waiting(self, job_id: str) -> bool:
        """Remove a queued job no worker holds, atomically with arq's pick-up.

        arq keeps a running job in the queue set too; it marks it with an
        in-progress key under WATCH. Watching the same key here means either we
        remove the job before any worker takes it, or we see it taken.
        """
        in_progress = in_progress_key_prefix + job_id
        async with self.redis.pipeline(transaction=True) as pipe:
            try:
                await pipe.watch(in_progress)
                if await pipe.exists(in_progress):
                    return False
                pipe.multi()  # type: ignore[no-untyped-call]
                pipe.zrem(self.settings.queue_name, job_id)
                pipe.delete(job_key_prefix + job_id)
                removed, _ = await pipe.execute()
            except WatchError:
                return False
        return bool(removed)

    async def _arq_only_result(self, job_id: str, status: Status) -> JobResult:
        info = await self._job(job_id).result_info()
        error = None if info is None else _error_text(info.result)
        return JobResult(job_id, status, error=error)

    async def _row(self, job_id: str) -> JobResult | None:
        if self.pool is None:
            return None
        row = await self.pool.fetchrow("select * from executions where job_id = $1", job_id)
        if row is None:
            return None
        files: tuple[OutputFile, ...] = ()
        if Status(row["status"]).final:
            file_rows = await self.pool.fetch(
                "select name, size_bytes, content from execution_files where job_id = $1"
                " order by name",
                job_id,
            )
            files = tuple(OutputFile(r["name"], r["size_bytes"], r["content"]) for r in file_rows)
        return JobResult(
            job_id=job_id,
            status=Status(row["status"]),
            exit_code=row["exit_code"],
            stdout=row["stdout"] or b"",
            stderr=row["stderr"] or b"",
            stdout_truncated=row["stdout_truncated"],
            stderr_truncated=row["stderr_truncated"],
            outputs_truncated=row["outputs_truncated"],
            files=files,
            error=row["error"],
            cache_hit=row["cache_hit"],
            image_key=row["image_key"],
            attempts=row["attempts"],
            reused_from=row["reused_from"],
            timings=_json(row["timings"]),
            details=_json(row["details"]),
            queued_at=row["queued_at"],
            finished_at=row["finished_at"],
        )


class _FinishNotices:
    """The worker's "job finished" notices for one job, while a result() waits for it.

    Subscribed before the first look at the row, so a job finishing in between is
    not missed. Without Redis pub/sub (an error), waiting is plain sleeping.
    """

    def __init__(self, redis: ArqRedis, job_id: str, *, listen: bool) -> None:
        self._channel = job_finished_channel(job_id)
        self._pubsub: PubSub | None = redis.pubsub() if listen else None

    async def __aenter__(self) -> _FinishNotices:
        if self._pubsub is not None:
            try:
                await self._pubsub.subscribe(self._channel)
            except RedisError:
                await self._close()
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self._close()

    async def wait(self, timeout_s: float) -> None:
        """Until a notice arrives or ``timeout_s`` passes (at least one event loop turn)."""
        if self._pubsub is None:
            await asyncio.sleep(timeout_s)
            return
        try:
            await self._pubsub.get_message(ignore_subscribe_messages=True, timeout=timeout_s)
        except RedisError:
            await self._close()
            await asyncio.sleep(timeout_s)

    async def _close(self) -> None:
        pubsub, self._pubsub = self._pubsub, None
        if pubsub is not None:
            with contextlib.suppress(RedisError):
                await pubsub.aclose()  # type: ignore[no-untyped-call]


def _payload_runtime(args: Any) -> str:
    if args and isinstance(args[0], dict):
        return str(args[0].get("runtime", "unknown"))[:64]
    return "unknown"


def _json(value: Any) -> Any:
    import json

    return json.loads(value) if isinstance(value, str) else value


def _is_cancel(result: Any) -> bool:
    return isinstance(result, asyncio.CancelledError) or (
        isinstance(result, dict) and result.get("error") == "CancelledError"
    )


def _error_text(result: Any) -> str:
    if isinstance(result, dict) and "error" in result:
        return f"{result['error']}: {result.get('message', '')}".rstrip(": ")
    return str(result)
