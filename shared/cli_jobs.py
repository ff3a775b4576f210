"""`berth submit`, `berth status`, `berth result`, `berth cancel`."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from shared.client import Client, JobResult
from shared.connections import connect_redis
from shared.db import create_pool
from shared.errors import InvalidJob
from shared.models import JobSpec, Status, parse_size
from shared.pathcache import CacheSpec
from shared.settings import Settings

PHASE_POLL_S = 0.2
EXIT_JOB_ERROR = 3  # the job did not run to an exit code (build error, timeout, oom…)
# Phases in the order a job goes through them (worker.jobs records them).
TIMING_ORDER = ("queue_wait_s", "keys_s", "build_s", "image_s", "run_s", "sandbox_s", "total_s")


@contextlib.asynccontextmanager
async def open_client(settings: Settings) -> AsyncIterator[Client]:
    redis = await connect_redis(settings)
    try:
        pool = await create_pool(settings)
        try:
            yield Client(redis, pool, settings)
        finally:
            await pool.close()
    finally:
        await redis.aclose()


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise InvalidJob(what, f"cannot read {path}: {e.strerror}") from e


def spec_from_args(args: argparse.Namespace) -> JobSpec:
    """Build the JobSpec from command-line arguments, naming any bad one."""
    script = _read(args.script, "script").decode("utf-8", errors="strict")
    files: dict[str, bytes] = {}
    for item in args.file:
        name, _, path = item.partition("=")
        if not path:
            name, path = Path(item).name, item
        files[name] = _read(path, f"--file {item}")
    env: dict[str, str] = {}
    for item in args.env:
        name, sep, value = item.partition("=")
        if not sep:
            raise InvalidJob(f"--env {item}", "use NAME=VALUE")
        env[name] = value
    caches = []
    for item in args.cache:
        try:
            caches.append(CacheSpec.model_validate_json(item))
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "value"
            raise InvalidJob(f"--cache {item}", f"{where}: {first['msg']}") from e
    memory = None
    if args.memory is not None:
        try:
            memory = parse_size(args.memory)
        except ValueError as e:
            raise InvalidJob("--memory", str(e)) from e
    return JobSpec(
        script=script,
        runtime=args.runtime,
        requirements=_read(args.requirements, "requirements").decode() if args.requirements else "",
        files=files,
        args=list(args.arg),
        stdin=_read(args.stdin, "stdin") if args.stdin else None,
        env=env,
        timeout_s=args.timeout,
        memory_bytes=memory,
        cpus=args.cpus,
        network=args.network,
        reuse_result=args.reuse_result,
        idempotency_key=args.key,
        scope=args.scope,
        caches=caches,
        save_caches_on_failure=args.save_caches_on_failure,
    )


async def cmd_submit(args: argparse.Namespace, settings: Settings) -> int:
    spec = spec_from_args(args)
    async with open_client(settings) as client:
        job_id = await client.submit(spec)
        if not args.wait:
            print(job_id)
            return 0
        print(f"job {job_id}", file=sys.stderr)
        result = await _wait_showing_phases(client, job_id, args.wait_timeout)
    return show_result(result, as_json=args.json)


async def _wait_showing_phases(client: Client, job_id: str, timeout_s: float) -> JobResult:
    deadline = time.monotonic() + timeout_s
    last: Status | None = None
    while True:
        status = await client.status(job_id)
        if status != last:
            print(f"  {status}", file=sys.stderr)
            last = status
        if status.final:
            return await client.result(job_id)
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"job {job_id} is still {status} after {timeout_s:g} s; "
                f"`berth result {job_id}` shows it later"
            )
        await asyncio.sleep(PHASE_POLL_S)


def result_dict(result: JobResult) -> dict[str, Any]:
    return {
        "job_id": result.job_id,
        "status": str(result.status),
        "exit_code": result.exit_code,
        "stdout": result.stdout.decode(errors="replace"),
        "stderr": result.stderr.decode(errors="replace"),
        "stdout_truncated": result.stdout_truncated,
        "stderr_truncated": result.stderr_truncated,
        "files": {f.name: f.size_bytes for f in result.files},
        "outputs_truncated": result.outputs_truncated,
        "error": result.error,
        "cache_hit": result.cache_hit,
        "image_key": result.image_key,
        "attempts": result.attempts,
        "reused_from": result.reused_from,
        "timings": result.timings,
        "details": result.details,
    }


def show_result(result: JobResult, *, as_json: bool = False) -> int:
    """Print a result; the exit code is the script's, or 3 when it did not run to one."""
    if as_json:
        print(json.dumps(result_dict(result), indent=2))
    else:
        if result.stdout:
            sys.stdout.buffer.write(result.stdout)
            sys.stdout.flush()
        if result.stderr:
            sys.stderr.buffer.write(result.stderr)
            sys.stderr.flush()
        hit = {True: "hit", False: "miss", None: "-"}[result.cache_hit]
        timings = result.timings or {}
        ordered = sorted(
            timings, key=lambda k: TIMING_ORDER.index(k) if k in TIMING_ORDER else len(TIMING_ORDER)
        )
        shown = ", ".join(f"{k.removesuffix('_s')} {timings[k]:.2f}s" for k in ordered)
        lines = [f"status {result.status}   exit code {result.exit_code}   image cache {hit}"]
        if shown:
            lines.append(f"timings: {shown}")
        notes = [
            n
            for n, flag in (
                ("stdout truncated", result.stdout_truncated),
                ("stderr truncated", result.stderr_truncated),
                ("outputs truncated", result.outputs_truncated),
            )
            if flag
        ]
        if result.files:
            lines.append(
                "files: " + ", ".join(f"{f.name} ({f.size_bytes} B)" for f in result.files)
            )
        if notes:
            lines.append("note: " + ", ".join(notes))
        if result.error:
            lines.append(f"error: {result.error}")
        print("\n".join(f"[berth] {line}" for line in lines), file=sys.stderr)
    if result.status in (Status.SUCCEEDED, Status.FAILED) and result.exit_code is not None:
        return result.exit_code
    return EXIT_JOB_ERROR if result.status.final else 0


async def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    async with open_client(settings) as client:
        status = await client.status(args.job_id)
    print(json.dumps({"job_id": args.job_id, "status": str(status)}) if args.json else status)
    return 0


async def cmd_result(args: argparse.Namespace, settings: Settings) -> int:
    async with open_client(settings) as client:
        result = await client.result(args.job_id, timeout_s=args.wait)
    return show_result(result, as_json=args.json)


async def cmd_cancel(args: argparse.Namespace, settings: Settings) -> int:
    async with open_client(settings) as client:
        cancelled = await client.cancel(args.job_id)
    print("cancelled" if cancelled else "already finished")
    return 0 if cancelled else 1


def register(sub: Any) -> None:
    p = sub.add_parser("submit", help="submit a script to run in a container")
    p.add_argument("script", help="the Python script to run")
    p.add_argument("-r", "--requirements", help="a requirements.txt for the script")
    p.add_argument("--runtime", default="python3.11", help="runtime (default python3.11)")
    p.add_argument(
        "--file",
        action="append",
        default=[],
        metavar="[NAME=]PATH",
        help="an input file, placed in the work dir (repeatable)",
    )
    p.add_argument("--arg", action="append", default=[], help="a script argument (repeatable)")
    p.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="an environment variable (repeatable)",
    )
    p.add_argument("--stdin", metavar="PATH", help="a file whose bytes are the script's stdin")
    p.add_argument("--timeout", type=float, help="wall-clock limit in seconds")
    p.add_argument("--memory", help="memory limit, e.g. 256m or 1g")
    p.add_argument("--cpus", type=float, help="CPU limit, e.g. 0.5")
    p.add_argument("--network", action="store_true", help="allow network (if the fleet does)")
    p.add_argument(
        "--reuse-result",
        action="store_true",
        help="return the stored result of an identical earlier run",
    )
    p.add_argument("--key", help="idempotency key: the same key twice is one job")
    p.add_argument("--scope", default="default", help="path-cache scope (tenant)")
    p.add_argument(
        "--cache",
        action="append",
        default=[],
        metavar="JSON",
        help='a path cache, e.g. \'{"key": "pip-v1", "paths": [".cache/pip"], '
        '"restore_keys": ["pip-"]}\' (repeatable)',
    )
    p.add_argument(
        "--save-caches-on-failure",
        action="store_true",
        help="save path caches even when the script fails",
    )
    p.add_argument("--wait", action="store_true", help="wait and show the result")
    p.add_argument("--wait-timeout", type=float, default=3600.0, help="seconds to wait")
    p.add_argument("--json", action="store_true", help="with --wait: the result as JSON")
    p.set_defaults(handler=cmd_submit)

    p = sub.add_parser("status", help="show a job's status")
    p.add_argument("job_id")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_status)

    p = sub.add_parser("result", help="show a job's result")
    p.add_argument("job_id")
    p.add_argument(
        "--wait",
        type=float,
        default=None,
        metavar="SECONDS",
        help="wait up to this long for the job to finish",
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_result)

    p = sub.add_parser("cancel", help="cancel a queued or running job")
    p.add_argument("job_id")
    p.set_defaults(handler=cmd_cancel)
