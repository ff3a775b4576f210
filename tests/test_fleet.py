"""A real fleet: two worker containers from the berth image share this host's engine.

They take a batch of jobs from this run's queue (the host's Redis) and write results
to this run's database (the host's Postgres). One worker container is killed with
SIGKILL while it runs a job; arq runs that job again on the other worker once the
dead worker's in-progress marker expires, and every job ends with exactly one
executions row, succeeded.

The worker containers run as the manifests run them: non-root, read-only root
filesystem with tmpfs scratch, no capabilities, no new privileges, the socket's group
added; short limits keep arq's in-progress expiry (job timeout + 10 s) near three
minutes. Everything the test makes (containers, job containers left by the killed
worker, the images and volumes it created) is removed after.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import socket
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import asyncpg
import pytest
from arq.connections import ArqRedis
from prometheus_client.parser import text_string_to_metric_families

from shared.client import Client
from shared.constants import LABEL_JOB_ID, LABEL_MANAGED
from shared.models import JobSpec
from shared.settings import Settings
from tests.conftest import RUNTIME_IMAGES
from tests.test_worker_image import (
    BUILD_TIMEOUT_S,
    CA_BUNDLE,
    DOCKER_SOCKET,
    build_worker_image,
    engine_available,
)

JOBS = 20
JOB_SLEEP_S = 3
FINAL = ("succeeded", "failed", "timeout", "oom", "error", "cancelled")
# A killed worker's claim on its jobs (arq's in-progress marker, which berth keeps on
# a short renewed TTL) lapses within BERTH_JOB_CLAIM_TTL_S; another worker takes them.
WORKER_ENV = {
    "BERTH_WORKER_CONCURRENCY": "2",
    "BERTH_JOB_CLAIM_TTL_S": "5",
    "BERTH_BUILD_TIMEOUT_S": "120",
    "BERTH_BUILD_WAIT_TIMEOUT_S": "30",
    "BERTH_RESOLVE_TIMEOUT_S": "10",
    "BERTH_MAX_TIMEOUT_S": "20",
    "BERTH_DEFAULT_TIMEOUT_S": "20",
    "BERTH_STUCK_GRACE_S": "10",
    "BERTH_RUNTIME_IMAGES": json.dumps(RUNTIME_IMAGES),
    "BERTH_CA_BUNDLE_PATH": str(CA_BUNDLE),
    "BERTH_LOG_FORMAT": "json",
}
WORKER_SETTINGS = Settings.model_validate(
    {k.removeprefix("BERTH_").lower(): v for k, v in WORKER_ENV.items() if "IMAGES" not in k}
    | {"runtime_images": RUNTIME_IMAGES}
)
IN_PROGRESS_TTL_S = WORKER_SETTINGS.job_claim_ttl_s
WAIT_FOR_RUNNING_S = 120
WAIT_FOR_BATCH_S = int(IN_PROGRESS_TTL_S) + 120

pytestmark = [
    pytest.mark.docker,
    pytest.mark.timeout(BUILD_TIMEOUT_S + WAIT_FOR_RUNNING_S + WAIT_FOR_BATCH_S + 120),
    pytest.mark.skipif(not engine_available(), reason="no Docker engine answers `docker info`"),
]


async def docker(*args: str, timeout_s: float = 120, stderr: bool = False) -> tuple[int, str]:
    """Run the docker CLI: its exit status and stdout (with stderr on failure, or if asked)."""
    process = await asyncio.create_subprocess_exec(
        "docker", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout_s)
    assert process.returncode is not None
    text = out.decode(errors="replace")
    if stderr or process.returncode != 0:
        text += err.decode(errors="replace")
    return process.returncode, text


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Worker:
    hostname: str
    container: str
    metrics_port: int


@dataclass
class Fleet:
    workers: list[Worker]
    job_ids: list[str] = field(default_factory=list)

    def by_hostname(self, worker_name: str) -> Worker:
        (found,) = [w for w in self.workers if worker_name.startswith(f"{w.hostname}:")]
        return found


async def start_worker(image: str, settings: Settings, hostname: str) -> Worker:
    worker = Worker(hostname, f"berth-{hostname}", free_port())
    env = WORKER_ENV | {
        "BERTH_REDIS_URL": settings.redis_url,
        "BERTH_POSTGRES_DSN": settings.postgres_dsn.get_secret_value(),
        "BERTH_QUEUE_NAME": settings.queue_name,
        "BERTH_METRICS_PORT": str(worker.metrics_port),
    }
    options = [
        "--detach", "--name", worker.container, "--hostname", hostname,
        "--network", "host",
        "--read-only", "--tmpfs", "/tmp",
        "--tmpfs", "/var/lib/berth:uid=10001,gid=10001,mode=0755",
        "--tmpfs", "/var/lib/berth/path-caches:uid=10001,gid=10001,mode=0755",
        "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
        "--volume", f"{DOCKER_SOCKET}:{DOCKER_SOCKET}",
        "--group-add", str(DOCKER_SOCKET.stat().st_gid),
        "--volume", f"{CA_BUNDLE}:{CA_BUNDLE}:ro",
    ]  # fmt: skip
    for name, value in env.items():
        options += ["--env", f"{name}={value}"]
    code, out = await docker("run", *options, image, "worker")
    assert code == 0, out
    return worker


async def berth_volumes() -> str:
    return (await docker("volume", "ls", "--quiet", "--filter", f"label={LABEL_MANAGED}=true"))[1]


@pytest.fixture
async def fleet(settings: Settings, redis: ArqRedis, pool: asyncpg.Pool) -> AsyncIterator[Fleet]:
    """Two worker containers on this run's queue and database; all traces removed after."""
    image = await asyncio.to_thread(build_worker_image)
    _, listed = await docker("image", "ls", "--quiet", "--no-trunc", "berth/deps")
    images_before = set(listed.split())
    volumes_before = set((await berth_volumes()).split())
    suffix = secrets.token_hex(3)
    fleet = Fleet([])
    try:
        for name in ("a", "b"):
            fleet.workers.append(await start_worker(image, settings, f"fleet-{suffix}-{name}"))
        yield fleet
    finally:
        for worker in fleet.workers:
            await docker("rm", "--force", "--volumes", worker.container)
        _, rows = await docker(
            "ps", "--all", "--filter", f"label={LABEL_JOB_ID}",
            "--format", f'{{{{.ID}}}} {{{{.Label "{LABEL_JOB_ID}"}}}}',
        )  # fmt: skip
        labelled = [line.split() for line in rows.splitlines()]
        ours = [words[0] for words in labelled if words[1:2] and words[1] in fleet.job_ids]
        if ours:
            await docker("rm", "--force", "--volumes", *ours)  # their /work volumes too
        tags = [r["image_tag"] for r in await pool.fetch("select image_tag from image_cache")]
        for tag in tags:
            code, image_id = await docker("image", "inspect", "--format", "{{.Id}}", tag)
            if code == 0 and image_id.strip() not in images_before:
                await docker("image", "rm", "--force", tag)
        made = set((await berth_volumes()).split()) - volumes_before
        if made:  # the uv cache and tools volumes, if this fleet created them
            await docker("volume", "rm", *sorted(made))


async def diagnosis(fleet: Fleet, pool: asyncpg.Pool) -> str:
    """The rows' statuses and each worker's last log lines, for a failure message."""
    statuses = sorted((r["status"], r["error"] or "") for r in await rows(pool, fleet.job_ids))
    logs = [
        f"--- {w.container}\n"
        + (await docker("logs", "--tail", "20", w.container, stderr=True))[1][-3000:]
        for w in fleet.workers
    ]
    return f"{statuses}\n" + "\n".join(logs)


async def rows(pool: asyncpg.Pool, job_ids: list[str]) -> list[asyncpg.Record]:
    return await pool.fetch(
        "select job_id, status, worker, attempts, exit_code, stdout, error from executions"
        " where job_id = any($1::text[])",
        job_ids,
    )


def scrape(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def test_killing_a_worker_mid_batch_still_finishes_every_job_exactly_once(
    fleet: Fleet, settings: Settings, redis: ArqRedis, pool: asyncpg.Pool
) -> None:
    """SIGKILL one of two worker containers mid-batch: every job ends once, succeeded."""
    client = Client(redis, pool, settings)
    for i in range(JOBS):
        script = f"import time\ntime.sleep({JOB_SLEEP_S})\nprint({i})\n"
        spec = JobSpec(script=script, runtime="python3.11", timeout_s=20)
        fleet.job_ids.append(await client.submit(spec))

    # Mid-batch: some jobs done, and a worker with a job running right now.
    in_flight: list[str] = []
    victim: Worker | None = None
    for _ in range(WAIT_FOR_RUNNING_S * 4):
        current = await rows(pool, fleet.job_ids)
        done = sum(r["status"] == "succeeded" for r in current)
        running = [r for r in current if r["status"] == "running"]
        if done >= 4 and running:
            victim = fleet.by_hostname(running[0]["worker"])
            break
        assert done < JOBS, "the whole batch finished before a worker could be killed"
        await asyncio.sleep(0.25)
    if victim is None:
        pytest.fail(f"no job was seen running: {await diagnosis(fleet, pool)}")
    code, out = await docker("kill", victim.container)
    assert code == 0, out
    current = await rows(pool, fleet.job_ids)
    in_flight = [
        r["job_id"]
        for r in current
        if r["status"] in ("building", "running") and r["worker"].startswith(victim.hostname)
    ]
    (survivor,) = [w for w in fleet.workers if w is not victim]

    for _ in range(WAIT_FOR_BATCH_S):
        current = await rows(pool, fleet.job_ids)
        if len(current) == JOBS and all(r["status"] in FINAL for r in current):
            break
        await asyncio.sleep(1)

    final = {r["job_id"]: r for r in await rows(pool, fleet.job_ids)}
    assert sorted(final) == sorted(fleet.job_ids), "every job has exactly one executions row"
    statuses = {job_id: r["status"] for job_id, r in final.items()}
    if set(statuses.values()) != {"succeeded"}:
        pytest.fail(f"not all succeeded: {await diagnosis(fleet, pool)}")
    for i, job_id in enumerate(fleet.job_ids):
        assert bytes(final[job_id]["stdout"]) == f"{i}\n".encode()
    assert in_flight, "the killed worker had no job in flight"
    for job_id in in_flight:
        assert final[job_id]["attempts"] >= 2, "a job of the killed worker was run again"
        assert final[job_id]["worker"].startswith(f"{survivor.hostname}:")

    # The survivor's metrics endpoint counts the jobs it finished.
    scraped = await asyncio.to_thread(scrape, survivor.metrics_port)
    finished_by_survivor = sum(
        r["worker"].startswith(f"{survivor.hostname}:") for r in final.values()
    )
    assert scraped[("berth_jobs_total", frozenset({("status", "succeeded")}))] == (
        finished_by_survivor
    )
    assert scraped[("berth_job_duration_seconds_count", frozenset())] >= finished_by_survivor
