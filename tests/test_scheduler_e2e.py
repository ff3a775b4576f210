"""The scheduler with the real worker: eviction then rebuild, and a killed worker's job reaped."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import warnings
from collections.abc import AsyncIterator

import asyncpg
import pytest
from arq.connections import ArqRedis
from arq.constants import in_progress_key_prefix

from scheduler.eviction import evict_images
from scheduler.reaper import WORKER_LOST, reap_stuck_jobs
from shared.client import Client
from shared.constants import LABEL_IMAGE_KEY, LABEL_JOB_ID, image_tag
from shared.engine import Engine
from shared.errors import EngineError
from shared.models import JobSpec, Status
from shared.settings import Settings
from tests.jobs_fixtures import Builds, Submit
from worker.main import build_worker

pytestmark = pytest.mark.docker

# Image keys are content hashes, so another run on this engine building six==1.16.0 would
# share the key; a marker that always holds makes this run's set (and key) its own.
SIX = f'six==1.16.0; python_full_version != "0.0.{secrets.randbelow(10**9)}"\n'
USES_SIX = "import six\nprint(six.__version__)\n"
WAIT_S = 120.0


@pytest.fixture(name="engine")
async def engine_fixture(job_settings: Settings) -> AsyncIterator[Engine]:
    engine = await Engine.connect(job_settings)
    yield engine
    await engine.close()


async def test_next_job_after_eviction_rebuilds_and_succeeds(
    run_one: Submit,
    builds: Builds,
    engine: Engine,
    pool: asyncpg.Pool,
    redis: ArqRedis,
    job_settings: Settings,
) -> None:
    """A job whose image was evicted rebuilds it and succeeds; the one after hits again."""
    first = await run_one(USES_SIX, SIX)
    assert first.status is Status.SUCCEEDED, first.error
    assert first.image_key is not None
    key = first.image_key
    # The engine is shared with other runs: this sweep sees only this run's key.
    only_this = job_settings.model_copy(update={"extra_labels": {LABEL_IMAGE_KEY: key}})
    try:
        report = await evict_images(engine, pool, redis, only_this, budget_bytes=1)
        assert [(r.image_key, r.reason) for r in report.removed] == [(key, "over budget")]
        assert await engine.image_info(image_tag(key)) is None
        assert (
            await pool.fetchval("select status from image_cache where image_key = $1", key)
            == "evicted"
        )

        second = await run_one(USES_SIX, SIX)
        assert second.status is Status.SUCCEEDED, second.error
        assert second.stdout == b"1.16.0\n"
        assert second.image_key == key
        assert second.cache_hit is False
        assert second.details is not None
        assert second.details["image_source"] == "built"
        assert await builds() == 2

        third = await run_one(USES_SIX, SIX)
        assert third.cache_hit is True
        assert await builds() == 2
    finally:
        with contextlib.suppress(EngineError):
            await engine.remove_image(image_tag(key), force=True)


def worker_process(settings: Settings) -> subprocess.Popen[bytes]:
    """`berth worker` as its own process (so that it can be killed), on these settings."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": os.environ.get("HOME", "/root"),
        "BERTH_REDIS_URL": settings.redis_url,
        "BERTH_POSTGRES_DSN": settings.postgres_dsn.get_secret_value(),
        "BERTH_QUEUE_NAME": settings.queue_name,
        "BERTH_RUNTIME_IMAGES": json.dumps(settings.runtime_images),
        "BERTH_EXTRA_LABELS": json.dumps(settings.extra_labels),
        "BERTH_JOB_MAX_TRIES": str(settings.job_max_tries),
        "BERTH_PATH_CACHE_DIR": str(settings.path_cache_dir),
        "BERTH_LOG_FORMAT": "json",
    }
    if settings.ca_bundle_path is not None:
        env["BERTH_CA_BUNDLE_PATH"] = str(settings.ca_bundle_path)
    return subprocess.Popen(
        [sys.executable, "-c", "from shared.cli import main; main()", "worker"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


async def wait_for_status(pool: asyncpg.Pool, job_id: str, status: str) -> None:
    query = "select status from executions where job_id = $1"
    async with asyncio.timeout(WAIT_S):
        while await pool.fetchval(query, job_id) != status:  # noqa: ASYNC110 (polls Postgres)
            await asyncio.sleep(0.2)


async def remove_job_containers(engine: Engine, job_id: str) -> None:
    for container in await engine.list_berth_containers():
        if container.labels.get(LABEL_JOB_ID) == job_id:
            await engine.remove_container(container.id)


async def test_killed_workers_job_is_reaped_once_after_arq_gives_up(
    client: Client,
    engine: Engine,
    pool: asyncpg.Pool,
    redis: ArqRedis,
    job_settings: Settings,
) -> None:
    """SIGKILL a worker mid-job: left alone while arq may retry, marked error once after."""
    settings = job_settings.model_copy(update={"job_max_tries": 1, "stuck_grace_s": 0.0})
    spec = JobSpec(
        script="import time\ntime.sleep(600)\n",
        runtime="python3.11",
        requirements=SIX,
        timeout_s=900,
    )
    job_id = await client.submit(spec)
    worker = worker_process(settings)
    try:
        await wait_for_status(pool, job_id, "running")
    finally:
        worker.send_signal(signal.SIGKILL)
        worker.wait(timeout=30)
        await remove_job_containers(engine, job_id)
        key = await pool.fetchval("select image_key from executions where job_id = $1", job_id)
        if key is not None:
            with contextlib.suppress(EngineError):
                await engine.remove_image(image_tag(key), force=True)
    # Time passes: the deadline is long gone.
    await pool.execute(
        "update executions set deadline_at = now() - interval '1 hour' where job_id = $1", job_id
    )
    held = await reap_stuck_jobs(pool, redis, settings)
    assert (held.reaped, held.still_held) == ([], 1)  # arq's in-progress marker still stands

    await redis.delete(in_progress_key_prefix + job_id)  # ...until it expires
    queued = await reap_stuck_jobs(pool, redis, settings)
    assert (queued.reaped, queued.still_held) == ([], 1)  # still queued: arq would retry

    # A worker picks it up again; its one try is spent, so arq drops it without running it.
    retry = build_worker(settings, burst=True, poll_delay=0)
    try:
        await retry.async_run()
    finally:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Call to deprecated close", DeprecationWarning)
            await retry.close()
    assert await redis.zscore(settings.queue_name, job_id) is None

    reaped = await reap_stuck_jobs(pool, redis, settings)
    assert reaped.reaped == [job_id]
    result = await client.result(job_id)
    assert (result.status, result.error) == (Status.ERROR, WORKER_LOST)
    again = await asyncio.gather(*(reap_stuck_jobs(pool, redis, settings) for _ in range(3)))
    assert [r.reaped for r in again] == [[], [], []]
