"""End to end: producer → Redis → in-process arq workers → Docker engine → Postgres."""

from __future__ import annotations

import pickle
import shutil
import time
from pathlib import Path

import aiodocker
import asyncpg
import pytest
from arq.connections import ArqRedis
from arq.jobs import Job

from shared.build_recipe import ENVS_DIR
from shared.client import Client
from shared.constants import image_tag
from shared.errors import InvalidJob, InvalidRequirement, QueueFull
from shared.models import JobSpec, Status
from shared.settings import Settings
from tests.jobs_fixtures import Builds, RunJobs, Submit
from tests.memory import peak_rss_growth_kib, reset_peak_rss

pytestmark = pytest.mark.docker

SIX = "six==1.16.0\n"
USES_SIX = "import six\nprint('six', six.__version__)\n"


async def test_script_with_a_real_package_runs_and_returns_output(run_one: Submit) -> None:
    """A script importing a pinned package prints through it; status, exit code, output kept."""
    result = await run_one(USES_SIX, SIX)
    assert result.status is Status.SUCCEEDED, result.error
    assert result.exit_code == 0
    assert result.stdout == b"six 1.16.0\n"
    assert result.cache_hit is False
    assert result.timings is not None
    assert {"queue_wait_s", "keys_s", "run_s", "total_s"} <= set(result.timings)


async def test_same_requirements_reuse_the_image_and_a_change_builds_anew(
    run_one: Submit, builds: Builds
) -> None:
    """The second job with the same set builds nothing; a changed version builds once more."""
    count = builds
    first = await run_one(USES_SIX, SIX)
    second = await run_one("import six\nprint(six.PY3)\n", "SIX == 1.16.0  # same set\n")
    assert await count() == 1
    assert second.cache_hit is True
    assert second.image_key == first.image_key
    assert second.stdout == b"True\n"
    third = await run_one(USES_SIX, "six==1.15.0\n")
    assert await count() == 2
    assert third.stdout == b"six 1.15.0\n"
    assert third.image_key != first.image_key


async def test_reuse_result_returns_stored_result_without_a_container(
    run_one: Submit, pool: asyncpg.Pool
) -> None:
    """reuse_result on an identical execution copies the earlier result, files included."""
    script = (
        "import os\nos.makedirs('out', exist_ok=True)\nopen('out/a.txt','w').write('A')\n"
        "print('ran')\n"
    )
    first = await run_one(script, reuse_result=True)
    second = await run_one(script, reuse_result=True)
    assert second.reused_from == first.job_id
    assert second.stdout == b"ran\n"
    assert [(f.name, f.content) for f in second.files] == [("a.txt", b"A")]
    assert second.details is not None
    assert second.details.get("reused") is True
    third = await run_one(script + "\n", reuse_result=True)
    assert third.reused_from is None


async def test_ten_concurrent_jobs_with_a_new_set_build_once(
    client: Client, run_workers: RunJobs, builds: Builds
) -> None:
    """Ten jobs for one new dependency set on two workers cause exactly one build."""
    ids = [
        await client.submit(
            JobSpec(
                script=f"import idna\nprint({i})\n",
                runtime="python3.11",
                requirements="idna==3.7\n",
            )
        )
        for i in range(10)
    ]
    await run_workers(2, max_jobs=5)
    results = [await client.result(job_id) for job_id in ids]
    assert [r.status for r in results] == [Status.SUCCEEDED] * 10
    assert [r.stdout for r in results] == [f"{i}\n".encode() for i in range(10)]
    assert await builds() == 1
    sources = [r.details["image_source"] if r.details else None for r in results]
    assert sources.count("built") == 1


async def test_flushed_hot_cache_mid_run_falls_back_to_postgres(
    run_one: Submit, redis: ArqRedis
) -> None:
    """With Redis's cache keys gone, the next job finds its image through Postgres."""
    first = await run_one(USES_SIX, SIX)
    for key in await redis.keys("berth:image:*"):
        await redis.delete(key)
    second = await run_one(USES_SIX, SIX)
    assert second.cache_hit is True
    assert second.image_key == first.image_key
    assert second.details is not None
    assert second.details["image_source"] == "postgres"


@pytest.mark.parametrize("lost", ["image", "environment"])
async def test_image_or_environment_removed_behind_the_cache_is_rebuilt(
    run_one: Submit, builds: Builds, job_settings: Settings, lost: str
) -> None:
    """An image deleted from the engine, or its environment from the store, while cached
    is rebuilt, and the job succeeds."""
    first = await run_one(USES_SIX, SIX)
    assert first.image_key is not None
    docker = aiodocker.Docker(url="unix:///var/run/docker.sock")
    try:
        if lost == "image":
            await docker.images.delete(image_tag(first.image_key), force=True)
        else:
            store = await (await docker.volumes.get(job_settings.store_volume)).show()
            shutil.rmtree(Path(store["Mountpoint"]) / ENVS_DIR / first.image_key)
    finally:
        await docker.close()
    second = await run_one(USES_SIX, SIX)
    assert second.status is Status.SUCCEEDED, second.error
    assert second.stdout == b"six 1.16.0\n"
    assert second.details is not None
    assert second.details.get("stale_image_rebuilt") is True
    assert await builds() == 2


async def test_same_idempotency_key_is_one_job(
    client: Client, run_workers: RunJobs, pool: asyncpg.Pool
) -> None:
    """Submitting one idempotency key twice returns one id and runs once."""
    spec = JobSpec(script="print('once')\n", runtime="python3.11", idempotency_key="order-42")
    assert await client.submit(spec) == "order-42"
    assert await client.submit(spec) == "order-42"
    assert await run_workers(1) == 1
    assert await pool.fetchval("select count(*) from executions") == 1
    assert (await client.result("order-42")).stdout == b"once\n"


async def test_queue_over_its_bound_is_refused(client: Client, job_settings: Settings) -> None:
    """With the queue at its bound, submit refuses with the limit named."""
    small = Client(
        client.redis, client.pool, job_settings.model_copy(update={"max_queue_depth": 2})
    )
    for _ in range(2):
        await small.submit(JobSpec(script="print(1)\n", runtime="python3.11"))
    with pytest.raises(QueueFull, match="limit of 2"):
        await small.submit(JobSpec(script="print(1)\n", runtime="python3.11"))


async def test_cancel_a_queued_job(client: Client, run_workers: RunJobs) -> None:
    """A job cancelled before any worker picks it is never run and reads cancelled."""
    job_id = await client.submit(JobSpec(script="print('no')\n", runtime="python3.11"))
    assert await client.cancel(job_id) is True
    assert await run_workers(1) == 0
    result = await client.result(job_id)
    assert result.status is Status.CANCELLED
    assert result.stdout == b""


# --- bad input ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"runtime": "python2.7"}, "runtime: 'python2.7' is not available; allowed: python3.11"),
        ({"files": {"/etc/passwd": b"x"}}, "absolute paths are not allowed"),
        ({"files": {"../up.txt": b"x"}}, "'..', '.' and empty path parts are not allowed"),
        ({"files": {"a" * 300: b"x"}}, "name length must be 1-255"),
        ({"env": {"1BAD": "x"}}, "names are letters, digits and _"),
        ({"env": {"PATH": "/tmp"}}, "is set by berth"),
        ({"script": "x" * (2 * 1024 * 1024)}, "over the limit of 1048576"),
        ({"network": True}, "network: is not allowed on this fleet"),
        ({"timeout_s": 99999.0}, "timeout_s: must be > 0 and at most 3600"),
    ],
)
async def test_bad_job_is_refused_at_submit(
    client: Client, fields: dict[str, object], message: str
) -> None:
    """Each invalid field is refused by submit with a message naming it and what is allowed."""
    spec_fields: dict[str, object] = {"script": "print(1)\n", "runtime": "python3.11"} | fields
    with pytest.raises(InvalidJob) as info:
        await client.submit(JobSpec.model_validate(spec_fields))
    assert message in str(info.value)
    assert await client.redis.zcard(client.settings.queue_name) == 0


async def test_forbidden_requirement_line_is_refused_at_submit(client: Client) -> None:
    """An editable install is refused before it reaches the queue, naming the line."""
    spec = JobSpec(script="print(1)\n", runtime="python3.11", requirements="six\n-e ./local\n")
    with pytest.raises(InvalidRequirement, match="requirements line 2"):
        await client.submit(spec)


async def test_bad_payload_pushed_past_the_client_is_an_error_row(
    redis: ArqRedis, run_workers: RunJobs, client: Client
) -> None:
    """A job enqueued unvalidated is re-validated by the worker: status error, field named."""
    await redis.enqueue_job(
        "run_job",
        {"script": "print(1)", "runtime": "ruby"},
        _job_id="raw-1",
        _queue_name=client.settings.queue_name,
    )
    await run_workers(1)
    result = await client.result("raw-1")
    assert result.status is Status.ERROR
    assert result.error == "runtime: 'ruby' is not available; allowed: python3.11"


async def test_pickle_payload_is_rejected_and_the_worker_survives(
    redis: ArqRedis, run_workers: RunJobs, client: Client
) -> None:
    """Pickle bytes on the queue fail as a job with a clear error; later jobs still run."""
    from arq.constants import job_key_prefix

    queue = client.settings.queue_name
    evil = pickle.dumps({"t": 1, "f": "run_job", "a": [], "k": {}, "et": 0})
    await redis.set(job_key_prefix + "evil", evil)
    await redis.zadd(queue, {"evil": int(time.time() * 1000)})  # arq's score: enqueue ms
    good = await client.submit(JobSpec(script="print('fine')\n", runtime="python3.11"))
    with pytest.raises(Exception, match="1 job failed"):
        await run_workers(1)
    info = await Job(
        "evil", redis, _queue_name=queue, _deserializer=redis.job_deserializer
    ).result_info()
    assert info is not None
    assert info.success is False
    assert info.result == {"error": "DeserializationError", "message": "unable to deserialize job"}
    assert (await client.result(good)).stdout == b"fine\n"


async def test_missing_package_fails_with_uv_message_then_negative_cached(
    run_one: Submit, builds: Builds, redis: ArqRedis
) -> None:
    """A pinned package absent from the index fails with uv's words; the retry does not build."""
    first = await run_one("print(1)\n", "berth-no-such-package-zz==1.0\n")
    assert first.status is Status.ERROR
    assert first.error is not None
    assert "berth-no-such-package-zz" in first.error
    assert "not found" in first.error.lower() or "no solution" in first.error.lower()
    failures = int(await redis.hget("berth:stats", "build_failures") or 0)
    second = await run_one("print(1)\n", "berth-no-such-package-zz==1.0\n")
    assert second.status is Status.ERROR
    assert second.error is not None
    assert "cached failure" in second.error
    assert int(await redis.hget("berth:stats", "build_failures") or 0) == failures


async def test_unpinned_missing_package_fails_resolution_with_uv_message(
    run_one: Submit,
) -> None:
    """An unpinned unknown package fails at resolution with uv's own message."""
    result = await run_one("print(1)\n", "berth-no-such-package-zz\n")
    assert result.status is Status.ERROR
    assert result.error is not None
    assert result.error.startswith("resolving requirements failed")
    assert "berth-no-such-package-zz" in result.error


async def test_infinite_loop_times_out(run_one: Submit) -> None:
    """A script past its timeout is killed: status timeout, the reason in error."""
    result = await run_one("while True:\n    pass\n", timeout_s=2.0)
    assert result.status is Status.TIMEOUT
    assert result.error is not None
    assert "2 s timeout" in result.error


async def test_memory_hog_is_oom(run_one: Submit) -> None:
    """A script over its memory limit is killed: status oom."""
    script = "chunks = []\nwhile True:\n    chunks.append(bytearray(16 * 1024 * 1024))\n"
    result = await run_one(script, memory_bytes=64 * 1024 * 1024)
    assert result.status is Status.OOM, (result.status, result.error, result.stderr)


async def test_fork_bomb_is_contained_by_the_pids_limit(run_one: Submit) -> None:
    """Unbounded forking hits the pids limit; the job ends and the worker carries on."""
    script = (
        "import os, time\n"
        "n = 0\n"
        "try:\n"
        "    while True:\n"
        "        if os.fork() == 0:\n"
        "            time.sleep(30)\n"
        "            os._exit(0)\n"
        "        n += 1\n"
        "except OSError as e:\n"
        "    print('limited after', n, type(e).__name__)\n"
    )
    result = await run_one(script, pids=32, timeout_s=10.0)
    assert result.status is Status.SUCCEEDED, (result.status, result.error, result.stderr)
    assert result.stdout.startswith(b"limited after")
    after = await run_one("print('still here')\n")
    assert after.stdout == b"still here\n"


async def test_output_flood_is_truncated(run_one: Submit, job_settings: Settings) -> None:
    """200 MB on stdout keeps the first max_stdout_bytes, flags it, worker memory flat."""
    script = (
        "import sys\nblock = b'x' * 65536\nfor _ in range(3200):\n"
        "    sys.stdout.buffer.write(block)\n"
    )
    baseline_kib = reset_peak_rss()
    result = await run_one(script)
    growth_kib = peak_rss_growth_kib(baseline_kib)
    assert result.status is Status.SUCCEEDED, result.error
    assert growth_kib < 64 * 1024  # the worker streamed 200 MB and stayed flat
    assert result.stdout_truncated is True
    assert len(result.stdout) == job_settings.max_stdout_bytes


async def test_network_access_fails_inside_the_job(run_one: Submit) -> None:
    """With network off (the default) a connection attempt from the script fails."""
    script = (
        "import socket\n"
        "try:\n"
        "    socket.create_connection(('1.1.1.1', 53), timeout=3)\n"
        "    print('connected')\n"
        "except OSError as e:\n"
        "    print('blocked', type(e).__name__)\n"
    )
    result = await run_one(script)
    assert result.stdout.startswith(b"blocked")


async def test_inputs_args_env_stdin_and_outputs(run_one: Submit) -> None:
    """Input files, args, env and stdin reach the script; files under out/ come back."""
    script = (
        "import os, sys\n"
        "data = open('data/in.txt').read()\n"
        "os.makedirs('out', exist_ok=True)\n"
        "open('out/result.txt', 'w').write(data.upper())\n"
        "print(sys.argv[1:], os.environ['GREETING'], sys.stdin.read(), os.getuid() != 0)\n"
    )
    result = await run_one(
        script,
        files={"data/in.txt": b"hello"},
        args=["a b", "$(x);"],
        env={"GREETING": "hi"},
        stdin=b"from stdin",
    )
    assert result.status is Status.SUCCEEDED, (result.error, result.stderr)
    assert result.stdout == b"['a b', '$(x);'] hi from stdin True\n"
    assert [(f.name, f.content) for f in result.files] == [("result.txt", b"HELLO")]


async def test_nonzero_exit_is_failed_with_stderr(run_one: Submit) -> None:
    """A script exiting 3 is status failed with its exit code and stderr kept."""
    result = await run_one("import sys\nprint('bad', file=sys.stderr)\nsys.exit(3)\n")
    assert result.status is Status.FAILED
    assert result.exit_code == 3
    assert result.stderr == b"bad\n"
