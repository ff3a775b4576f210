"""Fixtures for end-to-end job tests: a client, in-process burst workers, cleanup.

Every image and container a job test makes carries the label berth.test_run=<id>
(settings.extra_labels); the session sweeps exactly those at the end.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiodocker
import asyncpg
import pytest
from arq.connections import ArqRedis

from shared.client import Client, JobResult
from shared.models import JobSpec
from shared.settings import Settings
from tests.docker_fixtures import remove_images
from worker.main import build_worker

TEST_RUN_LABEL = "berth.test_run"
RUN_ID = secrets.token_hex(4)


@pytest.fixture(scope="session")
def job_run_id() -> Iterator[str]:
    """This session's run id; its images and containers are removed at the end."""
    yield RUN_ID

    async def sweep() -> None:
        docker = aiodocker.Docker(url="unix:///var/run/docker.sock")
        try:
            label = f"{TEST_RUN_LABEL}={RUN_ID}"
            for c in await docker.containers.list(all=True, filters={"label": [label]}):
                await c.delete(force=True, v=True)
            images = await docker.images.list(filters={"label": [label]})
            await remove_images([i["Id"] for i in images], docker.images.delete)
        finally:
            await docker.close()

    asyncio.run(sweep())


@pytest.fixture(scope="session")
def blob_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """This run's path-cache blob store (eviction deletes blobs its database does not know)."""
    return tmp_path_factory.mktemp("path-caches")


@pytest.fixture
def job_settings(settings: Settings, job_run_id: str, blob_dir: Path) -> Settings:
    """Settings for job tests: small limits, fast failure, labelled resources."""
    return settings.model_copy(
        update={
            "extra_labels": {TEST_RUN_LABEL: job_run_id},
            "default_timeout_s": 30.0,
            "default_memory_bytes": 256 * 1024 * 1024,
            "build_wait_timeout_s": 300.0,
            "failed_build_ttl_s": 300,
            "max_stdout_bytes": 64 * 1024,
            "max_stderr_bytes": 64 * 1024,
            "worker_concurrency": 10,
            "path_cache_dir": blob_dir,
        }
    )


@pytest.fixture
async def client(redis: ArqRedis, pool: asyncpg.Pool, job_settings: Settings) -> Client:
    """A producer on this run's queue."""
    return Client(redis, pool, job_settings)


RunJobs = Callable[..., Awaitable[int]]


@pytest.fixture
def run_workers(job_settings: Settings) -> RunJobs:
    """Drain the queue with N in-process burst workers running side by side."""

    async def run(count: int = 1, **overrides: Any) -> int:
        workers = [
            build_worker(job_settings, burst=True, poll_delay=0, **overrides) for _ in range(count)
        ]
        try:
            done = await asyncio.gather(*(w.run_check() for w in workers))
        finally:
            for w in workers:
                await w.close()
        return sum(done)

    return run


Submit = Callable[..., Awaitable[JobResult]]


@pytest.fixture
def run_one(client: Client, run_workers: RunJobs) -> Submit:
    """Submit one job, drain the queue with one worker, return the job's result."""

    async def run(script: str, requirements: str = "", **fields: Any) -> JobResult:
        spec = JobSpec(script=script, runtime="python3.11", requirements=requirements, **fields)
        job_id = await client.submit(spec)
        await run_workers(1)
        return await client.result(job_id)

    return run


Builds = Callable[[], Awaitable[int]]


@pytest.fixture
def builds(redis: ArqRedis) -> Builds:
    """How many images the fleet has built since the test started (Redis is flushed)."""

    async def count() -> int:
        return int(await redis.hget("berth:stats", "builds") or 0)

    return count
