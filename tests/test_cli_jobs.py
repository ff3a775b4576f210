"""`berth submit / status / result / cancel` as a user runs them: a subprocess each."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import pytest

from shared.client import Client
from shared.models import JobSpec
from shared.settings import Settings
from tests.jobs_fixtures import RunJobs
from tests.test_faults import worker_env
from worker.main import build_worker

pytestmark = pytest.mark.docker


async def berth(settings: Settings, *args: str) -> tuple[int, str, str]:
    """Run the real `berth` entry point with these settings: exit code, stdout, stderr."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        "from shared.cli import main; main()",
        *args,
        env=worker_env(settings),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@pytest.fixture
def script(tmp_path: Path) -> Path:
    path = tmp_path / "job.py"
    path.write_text("import sys\nprint('hello', sys.argv[1])\nsys.exit(4)\n")
    return path


async def test_submit_wait_shows_phases_output_and_exits_with_the_scripts_code(
    job_settings: Settings, script: Path, tmp_path: Path
) -> None:
    """--wait prints the phases, the script's output and cache status; exit code is the script's."""
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("six==1.16.0\n")
    worker = build_worker(job_settings, poll_delay=0.05, handle_signals=False)
    task = asyncio.create_task(worker.main())
    try:
        code, out, err = await berth(
            job_settings, "submit", str(script), "-r", str(requirements), "--arg", "world", "--wait"
        )
    finally:
        task.cancel()
        await worker.close()
    assert code == 4, err
    assert out == "hello world\n"
    lines = err.splitlines()
    assert lines[0].startswith("job ")
    assert "  queued" in lines
    assert "  failed" in lines  # exit 4 is the status failed
    assert "[berth] status failed   exit code 4   image cache miss" in lines
    assert any(line.startswith("[berth] timings: queue_wait") for line in lines)


async def test_status_and_result_json_of_a_finished_job(
    job_settings: Settings, client: Client, run_workers: RunJobs
) -> None:
    """status prints the status; result --json has stdout, exit code and cache flag."""
    job_id = await client.submit(JobSpec(script="print('hi')\n", runtime="python3.11"))
    await run_workers(1)
    code, out, _ = await berth(job_settings, "status", job_id)
    assert (code, out) == (0, "succeeded\n")
    code, out, _ = await berth(job_settings, "result", job_id, "--json")
    data = json.loads(out)
    assert code == 0
    assert (data["status"], data["exit_code"], data["stdout"]) == ("succeeded", 0, "hi\n")
    assert data["cache_hit"] is False


async def test_cancel_a_queued_job_from_the_cli(job_settings: Settings, client: Client) -> None:
    """cancel on a queued job prints cancelled; its status reads cancelled."""
    job_id = await client.submit(JobSpec(script="print(1)\n", runtime="python3.11"))
    assert await berth(job_settings, "cancel", job_id) == (0, "cancelled\n", "")
    code, out, _ = await berth(job_settings, "status", job_id)
    assert (code, out) == (0, "cancelled\n")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["status", "nosuch"], "berth: no job with id 'nosuch'"),
        (
            ["submit", "/nonexistent/job.py"],
            "berth: script: cannot read /nonexistent/job.py: No such file or directory",
        ),
        (
            ["submit", "SCRIPT", "--runtime", "ruby"],
            "berth: runtime: 'ruby' is not available; allowed: python3.11",
        ),
        (["submit", "SCRIPT", "--env", "NOVALUE"], "berth: --env NOVALUE: use NAME=VALUE"),
        (["submit", "SCRIPT", "--memory", "12zz"], "berth: --memory: '12zz' is not a size"),
        (
            ["submit", "SCRIPT", "--file", "../x=SCRIPT"],
            "berth: files['../x']: '..', '.' and empty path parts are not allowed",
        ),
        (["submit", "SCRIPT", "-r", "REQS"], "berth: requirements line 1 ('-e ./local'): "),
        (
            ["submit", "SCRIPT", "--cache", '{"key": "a,b", "paths": ["x"]}'],
            'berth: --cache {"key": "a,b", "paths": ["x"]}: key: ',
        ),
    ],
)
async def test_bad_input_is_one_line_without_traceback(
    job_settings: Settings, script: Path, tmp_path: Path, args: list[str], message: str
) -> None:
    """Each bad invocation prints one line naming the problem, exit 1, nothing queued."""
    requirements = tmp_path / "reqs.txt"
    requirements.write_text("-e ./local\n")
    argv = [
        str(script)
        if a == "SCRIPT"
        else str(requirements)
        if a == "REQS"
        else a.replace("SCRIPT", str(script))
        for a in args
    ]
    code, out, err = await berth(job_settings, *argv)
    assert code == 1
    assert out == ""
    assert err.startswith(message), err
    assert len(err.strip().splitlines()) == 1
    assert "Traceback" not in err
