"""The benchmark's own corner of this machine's services, and worker processes in it.

Other sessions may run tests on the same machine, so a run uses only what it made:
a fresh Postgres database ``berth_bench_<id>`` (migrated, dropped after), a Redis
database index claimed the way the test suite claims one (flushed after), its own
queue, store volumes named ``berth-bench-<id>-…``, and the label
``berth.bench_run=<id>`` on every container and image (removed after).

Workers are real ``berth worker`` processes started from the code tree being
measured (``root``), configured only through ``BERTH_*`` variables, as in production.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import redis as sync_redis

BENCH_LABEL = "berth.bench_run"
BASE_IMAGE = "berth-base/python:3.11"
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
CA_BUNDLE_PATH = str(CA_BUNDLE) if CA_BUNDLE.exists() else None
ADMIN_DSN = os.environ.get("BERTH_BENCH_ADMIN_DSN", "postgresql://berth:berth@127.0.0.1:5432/berth")
REDIS_BASE = os.environ.get("BERTH_BENCH_REDIS", "redis://127.0.0.1:6379")
# The same claim keys as tests/conftest.py, so a test run and a bench never share an index.
CLAIM_KEY = "berth-test:db-claim:{}"
CLAIM_TTL_S = 3 * 3600
WORKER_START_TIMEOUT_S = 60.0
WORKER_STOP_TIMEOUT_S = 60.0


def _dsn_for(database: str) -> str:
    return ADMIN_DSN.rsplit("/", 1)[0] + "/" + database


@dataclass
class CommandResult:
    returncode: int
    stdout: bytes
    stderr: bytes
    seconds: float


async def run_command(
    argv: Sequence[str], *, cwd: Path | None = None, timeout_s: float = 1800.0
) -> CommandResult:
    """Run a command (no shell), timing it from spawn to exit."""
    started = time.perf_counter()
    process = await asyncio.create_subprocess_exec(
        *argv, cwd=cwd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        async with asyncio.timeout(timeout_s):
            stdout, stderr = await process.communicate()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode is not None
    return CommandResult(process.returncode, stdout, stderr, time.perf_counter() - started)


@dataclass
class BenchEnv:
    """Where this run's data lives; ``settings_values`` are the BERTH_* settings of it."""

    run_id: str
    root: Path
    results_dir: Path
    redis_index: int
    database: str
    settings_values: dict[str, Any]
    workers: list[WorkerProcess] = field(default_factory=list)

    @classmethod
    async def open(cls, root: Path, results_dir: Path) -> BenchEnv:
        run_id = secrets.token_hex(4)
        await asyncio.to_thread(results_dir.mkdir, parents=True, exist_ok=True)
        index = _claim_redis_index(run_id)
        database = f"berth_bench_{run_id}"
        try:
            conn = await asyncpg.connect(ADMIN_DSN)
            try:
                await conn.execute(f'create database "{database}"')
            finally:
                await conn.close()
            values: dict[str, Any] = {
                "redis_url": f"{REDIS_BASE}/{index}",
                "postgres_dsn": _dsn_for(database),
                "runtime_images": {"python3.11": BASE_IMAGE},
                "queue_name": f"berth:bench-queue:{run_id}",
                "ca_bundle_path": CA_BUNDLE_PATH,
                "extra_labels": {BENCH_LABEL: run_id},
                "store_volume": f"berth-bench-{run_id}-store",
                "eviction_interval_s": 86400,
                "worker_concurrency": 4,
                "build_wait_timeout_s": 1200.0,
                "path_cache_dir": str(results_dir / "path-caches"),
                "log_format": "json",
            }
            env = cls(run_id, root, results_dir, index, database, values)
            from shared.db import create_pool, migrate

            pool = await create_pool(env.settings())
            try:
                await migrate(pool)
            finally:
                await pool.close()
        except BaseException:
            await _drop_database(database)
            _release_redis_index(index, run_id)
            raise
        return env

    def settings(self, **overrides: Any) -> Any:
        """A ``shared.settings.Settings`` for this run (imported from the measured tree)."""
        from pydantic import SecretStr

        from shared.settings import Settings

        values = {**self.settings_values, **overrides}
        values["postgres_dsn"] = SecretStr(values["postgres_dsn"])
        return Settings(**values)

    def worker(self, name: str, **overrides: Any) -> WorkerProcess:
        process = WorkerProcess(self, name, {**self.settings_values, **overrides})
        self.workers.append(process)
        return process

    async def close(self) -> dict[str, int]:
        """Stop workers, remove what the run made; returns what was removed."""
        for worker in self.workers:
            await worker.stop()
        removed = await remove_labelled(f"{BENCH_LABEL}={self.run_id}")
        volumes = await run_command(["docker", "volume", "ls", "-q"])
        names = [
            v
            for v in volumes.stdout.decode().split()
            if v.startswith(f"berth-bench-{self.run_id}-")
        ]
        for name in names:
            await run_command(["docker", "volume", "rm", "-f", name])
        removed["volumes"] = len(names)
        await _drop_database(self.database)
        _release_redis_index(self.redis_index, self.run_id)
        return removed


async def remove_labelled(label: str) -> dict[str, int]:
    """Containers, then images carrying ``label``; children before parents (several passes)."""
    listed = await run_command(["docker", "ps", "-aq", "--filter", f"label={label}"])
    containers = listed.stdout.decode().split()
    if containers:
        await run_command(["docker", "rm", "-fv", *containers])
    images_removed = 0
    for _ in range(6):
        listed = await run_command(
            ["docker", "images", "-aq", "--no-trunc", "--filter", f"label={label}"]
        )
        images = list(dict.fromkeys(listed.stdout.decode().split()))
        if not images:
            break
        for image in images:
            done = await run_command(["docker", "rmi", "-f", image])
            images_removed += done.returncode == 0
    return {"containers": len(containers), "images": images_removed}


async def _drop_database(name: str) -> None:
    conn = await asyncpg.connect(ADMIN_DSN)
    try:
        await conn.execute(f'drop database if exists "{name}" with (force)')
    finally:
        await conn.close()


def _claim_redis_index(token: str) -> int:
    claims = sync_redis.Redis.from_url(f"{REDIS_BASE}/0")
    try:
        indexes = list(range(1, 16))
        secrets.SystemRandom().shuffle(indexes)
        for index in indexes:
            if claims.set(CLAIM_KEY.format(index), f"bench-{token}", nx=True, ex=CLAIM_TTL_S):
                client = sync_redis.Redis.from_url(f"{REDIS_BASE}/{index}")
                client.flushdb()
                client.close()
                return index
    finally:
        claims.close()
    raise RuntimeError("all 15 Redis databases are claimed by test runs; try again later")


def _release_redis_index(index: int, token: str) -> None:
    client = sync_redis.Redis.from_url(f"{REDIS_BASE}/{index}")
    client.flushdb()
    client.close()
    claims = sync_redis.Redis.from_url(f"{REDIS_BASE}/0")
    if claims.get(CLAIM_KEY.format(index)) == f"bench-{token}".encode():
        claims.delete(CLAIM_KEY.format(index))
    claims.close()


def berth_env(values: Mapping[str, Any]) -> dict[str, str]:
    """Settings as the BERTH_* variables a worker process reads (JSON for dicts, lists)."""
    env: dict[str, str] = {}
    for name, value in values.items():
        if value is None:
            continue
        if isinstance(value, dict | list):
            env[f"BERTH_{name.upper()}"] = json.dumps(value)
        else:
            env[f"BERTH_{name.upper()}"] = str(value)
    return env


class WorkerProcess:
    """One ``berth worker`` process of the measured tree, logging JSON to a file."""

    def __init__(self, env: BenchEnv, name: str, values: Mapping[str, Any]) -> None:
        self.env = env
        self.name = name
        self.values = dict(values)
        self.log_path = env.results_dir / f"worker-{name}.log"
        self.process: subprocess.Popen[bytes] | None = None

    async def start(self) -> None:
        environ = {k: v for k, v in os.environ.items() if not k.startswith("BERTH_")}
        environ |= berth_env(self.values)
        environ["PYTHONPATH"] = str(self.env.root)
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(  # noqa: ASYNC220 (returns at once)
            [sys.executable, "-c", "from shared.cli import main; main()", "worker"],
            cwd=self.env.root,
            env=environ,
            stdout=log,
            stderr=log,
        )
        log.close()
        deadline = time.monotonic() + WORKER_START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"worker {self.name} exited: {self._tail()}")
            if b'"worker.started"' in self.log_path.read_bytes():
                return
            await asyncio.sleep(0.1)
        raise RuntimeError(f"worker {self.name} did not start: {self._tail()}")

    def rss_bytes(self) -> int:
        """Resident set size of the worker process (VmRSS)."""
        assert self.process is not None
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    async def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            await asyncio.to_thread(self.process.wait, WORKER_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            await asyncio.to_thread(self.process.wait)

    def _tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-2000:]
