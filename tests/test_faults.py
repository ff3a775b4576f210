"""Faults: a worker killed mid-job, a running job cancelled, the engine unreachable."""

from __future__ import annotations

import asyncio
import os
import signal
import sys

import aiodocker
import asyncpg
import pytest

from shared.client import Client
from shared.models import JobSpec, Status
from shared.settings import Settings
from tests.jobs_fixtures import TEST_RUN_LABEL, RunJobs
from worker.main import build_worker

pytestmark = pytest.mark.docker

SLOW = "import time\nprint('start', flush=True)\ntime.sleep(4)\nprint('done')\n"


def worker_env(settings: Settings) -> dict[str, str]:
    """The environment that makes a `berth worker` process use these settings."""
    env = {"PATH": os.environ["PATH"], "BERTH_LOG_FORMAT": "json"}
    for name, value in settings.model_dump(mode="json").items():
        if value is None:
            continue
        if name == "postgres_dsn":
            value = settings.postgres_dsn.get_secret_value()
        env[f"BERTH_{name.upper()}"] = value if isinstance(value, str) else _json(value)
    return env


def _json(value: object) -> str:
    import json

    return json.dumps(value)


async def wait_for_status(pool: asyncpg.Pool, job_id: str, wanted: str, limit_s: float) -> None:
    for _ in range(int(limit_s / 0.1)):
        if await pool.fetchval("select status from executions where job_id = $1", job_id) == wanted:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"job {job_id} never reached {wanted}")


async def test_killed_worker_job_completes_on_another_worker_once(
    client: Client, run_workers: RunJobs, job_settings: Settings, pool: asyncpg.Pool
) -> None:
    """SIGKILL of the worker mid-run: its claim lapses, the job runs again elsewhere, once."""
    settings = job_settings.model_copy(update={"job_claim_ttl_s": 3.0})
    # Build the (empty) dependency image first, so the killed attempt is mid-run.
    await client.submit(JobSpec(script="print(0)\n", runtime="python3.11"))
    await run_workers(1)

    fast = Client(client.redis, client.pool, settings)
    job_id = await fast.submit(JobSpec(script=SLOW, runtime="python3.11", timeout_s=6.0))
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        "from shared.cli import main; main()",
        "worker",
        env=worker_env(settings),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        await wait_for_status(pool, job_id, "running", 60)
    finally:
        proc.send_signal(signal.SIGKILL)
        await proc.wait()

    # The dead worker's claim (arq's in-progress marker) lapses within job_claim_ttl_s.
    worker = build_worker(settings, burst=True, poll_delay=0.2)
    try:
        await asyncio.wait_for(worker.main(), 120)
    finally:
        await worker.close()
    result = await fast.result(job_id)
    assert result.status is Status.SUCCEEDED, result.error
    assert result.stdout == b"start\ndone\n"
    assert result.attempts == 2
    assert await pool.fetchval("select count(*) from executions where job_id = $1", job_id) == 1


async def test_cancel_a_running_job_stops_it_and_removes_its_container(
    client: Client, job_settings: Settings, job_run_id: str
) -> None:
    """cancel() on a running job ends it as cancelled, and its container is gone."""
    job_id = await client.submit(
        JobSpec(
            script="import time\nprint('x', flush=True)\ntime.sleep(60)\n", runtime="python3.11"
        )
    )
    worker = build_worker(job_settings, burst=True, poll_delay=0.05)
    task = asyncio.create_task(worker.main())
    try:
        assert client.pool is not None
        await wait_for_status(client.pool, job_id, "running", 60)
        await asyncio.sleep(0.5)  # the container is started
        assert await client.cancel(job_id) is True
        await asyncio.wait_for(task, 30)
    finally:
        task.cancel()
        await worker.close()
    result = await client.result(job_id)
    assert result.status is Status.CANCELLED
    assert result.error == "cancelled by request"
    docker = aiodocker.Docker(url=job_settings.docker_url)
    try:
        left = await docker.containers.list(
            all=True,
            filters={"label": [f"berth.job_id={job_id}", f"{TEST_RUN_LABEL}={job_run_id}"]},
        )
    finally:
        await docker.close()
    assert left == []


async def test_unreachable_engine_fails_the_job_clearly_without_hanging(
    client: Client, run_workers: RunJobs, job_settings: Settings
) -> None:
    """With the Docker engine unreachable, the job ends as error naming the engine."""
    job_id = await client.submit(JobSpec(script="print(1)\n", runtime="python3.11"))
    broken = job_settings.model_copy(update={"docker_url": "unix:///nonexistent/docker.sock"})
    worker = build_worker(broken, burst=True, poll_delay=0)
    try:
        await asyncio.wait_for(worker.main(), 60)
    finally:
        await worker.close()
    result = await client.result(job_id)
    assert result.status is Status.ERROR
    assert result.error is not None
    assert result.error.startswith("docker at unix:///nonexistent/docker.sock is unreachable")
