"""Health checks: can this process reach what it needs to do its work?

`berth health` runs them for readiness probes, Compose health checks and the
image's smoke test. Each check has its own time bound and never raises: a check
that fails says what it tried and why, in one line.

- ``redis``: a PING on ``BERTH_REDIS_URL``.
- ``postgres``: ``select 1`` on ``BERTH_POSTGRES_DSN``.
- ``migrations``: every migration this code ships is applied (and unchanged). A
  database *ahead* of the code (a newer release migrated it first) passes: the
  schema changes are additive, so old pods keep working during a rolling upgrade.
- ``docker``: the engine at ``BERTH_DOCKER_URL`` answers (`Engine.connect`).
- ``heartbeat``: this host's arq loop (worker or scheduler) ran recently (see
  `heartbeat_key`); a liveness signal, asked for explicitly, never in the default set.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import asyncpg
from redis.asyncio import Redis

from shared.connections import redact_url
from shared.constants import REDIS_PREFIX
from shared.db import load_migrations, redact_dsn
from shared.settings import Settings

CheckName = Literal["redis", "postgres", "migrations", "docker", "heartbeat"]
DEFAULT_CHECKS: tuple[CheckName, ...] = ("redis", "postgres", "migrations", "docker")
ALL_CHECKS: tuple[CheckName, ...] = (*DEFAULT_CHECKS, "heartbeat")
CHECK_TIMEOUT_S = 5.0
# How often a berth arq process should refresh its heartbeat key (arq's
# ``health_check_interval``; at most twice this): liveness probes fail after 4 x 30 s.
HEARTBEAT_INTERVAL_S = 30


def heartbeat_key(queue_name: str, hostname: str) -> str:
    """The key one berth arq process (worker or scheduler) refreshes as its heartbeat.

    Given to arq as ``health_check_key``: arq's loop rewrites it every
    ``health_check_interval`` with a TTL one second longer. arq's default key is one
    per queue, refreshed by whichever worker polls; one per host (the pod or
    container name) makes the heartbeat mean *this* process.
    """
    return f"{REDIS_PREFIX}health:{queue_name}:{hostname}"


@dataclass(frozen=True)
class CheckResult:
    name: CheckName
    ok: bool
    detail: str
    elapsed_s: float

    def line(self) -> str:
        return f"{'ok' if self.ok else 'FAIL':<4} {self.name:<10} {self.detail}"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


async def _bounded(
    name: CheckName, timeout_s: float, target: str, probe: Callable[[], Awaitable[str]]
) -> CheckResult:
    """Run one probe under a deadline; any failure becomes a failed result."""
    started = time.perf_counter()
    try:
        async with asyncio.timeout(timeout_s):
            detail = await probe()
        ok = True
    except TimeoutError:
        ok, detail = False, f"{target}: no answer within {timeout_s:g} s"
    except Exception as e:  # a health check reports; it never raises
        ok, detail = False, f"{target}: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
    return CheckResult(name, ok, detail, round(time.perf_counter() - started, 4))


async def check_redis(settings: Settings, timeout_s: float = CHECK_TIMEOUT_S) -> CheckResult:
    """PING the Redis server."""
    target = redact_url(settings.redis_url)

    async def probe() -> str:
        client = Redis.from_url(
            settings.redis_url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s
        )
        try:
            await client.ping()
        finally:
            await client.aclose()
        return f"{target} answers PING"

    return await _bounded("redis", timeout_s, target, probe)


async def check_postgres(
    settings: Settings, timeout_s: float = CHECK_TIMEOUT_S
) -> tuple[CheckResult, CheckResult]:
    """``select 1``, then compare the applied migrations with the ones shipped."""
    dsn = settings.postgres_dsn.get_secret_value()
    target = redact_dsn(dsn)
    applied: dict[int, tuple[str, str]] | None = None

    async def probe() -> str:
        nonlocal applied
        conn = await asyncpg.connect(dsn, timeout=timeout_s)
        try:
            await conn.fetchval("select 1")
            exists = await conn.fetchval("select to_regclass('berth_migrations') is not null")
            rows = (
                await conn.fetch("select version, name, checksum from berth_migrations")
                if exists
                else []
            )
        finally:
            await conn.close()
        applied = {r["version"]: (r["name"], r["checksum"]) for r in rows}
        return f"{target} answers"

    db = await _bounded("postgres", timeout_s, target, probe)
    if applied is None:
        return db, CheckResult("migrations", False, "not checked: postgres is unreachable", 0.0)
    return db, _compare_migrations(applied)


def _compare_migrations(applied: dict[int, tuple[str, str]]) -> CheckResult:
    shipped = load_migrations()
    pending = [m.name for m in shipped if m.version not in applied]
    changed = [
        m.name for m in shipped if m.version in applied and applied[m.version][1] != m.checksum
    ]
    known = {m.version for m in shipped}
    ahead = sorted(applied[v][0] for v in applied if v not in known)
    if pending:
        detail = f"{len(pending)} pending: {', '.join(pending)} (run `berth migrate`)"
        return CheckResult("migrations", False, detail, 0.0)
    if changed:
        detail = f"applied file(s) changed since: {', '.join(changed)}"
        return CheckResult("migrations", False, detail, 0.0)
    detail = f"{len(shipped)} applied"
    if ahead:
        detail += f"; database is ahead of this release ({', '.join(ahead)})"
    return CheckResult("migrations", True, detail, 0.0)


async def check_docker(settings: Settings, timeout_s: float = CHECK_TIMEOUT_S) -> CheckResult:
    """Connect to the Docker engine and ask its id."""
    from shared.engine import Engine  # only the docker check needs the engine module

    target = settings.docker_url

    async def probe() -> str:
        engine = await Engine.connect(settings)
        try:
            engine_id = await engine.engine_id()
        finally:
            await engine.close()
        return f"{target} answers (engine {engine_id[:12]})"

    return await _bounded("docker", timeout_s, target, probe)


async def check_heartbeat(
    settings: Settings, timeout_s: float = CHECK_TIMEOUT_S, *, hostname: str | None = None
) -> CheckResult:
    """This host's worker refreshed its arq health key before the key expired."""
    host = hostname or socket.gethostname()
    key = heartbeat_key(settings.queue_name, host)

    async def probe() -> str:
        client = Redis.from_url(
            settings.redis_url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s
        )
        try:
            value = await client.get(key)
        finally:
            await client.aclose()
        if value is None:
            raise LookupError(f"no heartbeat at {key}: no arq loop on this host refreshed it")
        text = value.decode(errors="replace") if isinstance(value, bytes) else str(value)
        return f"worker {host}: {text}"

    return await _bounded("heartbeat", timeout_s, key, probe)


async def run_checks(
    settings: Settings,
    names: Sequence[CheckName] = DEFAULT_CHECKS,
    *,
    timeout_s: float = CHECK_TIMEOUT_S,
) -> list[CheckResult]:
    """Run the named checks concurrently; results in the order of ``ALL_CHECKS``."""
    wanted = set(names)
    tasks: list[Awaitable[CheckResult | tuple[CheckResult, CheckResult]]] = []
    if "redis" in wanted:
        tasks.append(check_redis(settings, timeout_s))
    if wanted & {"postgres", "migrations"}:
        tasks.append(check_postgres(settings, timeout_s))
    if "docker" in wanted:
        tasks.append(check_docker(settings, timeout_s))
    if "heartbeat" in wanted:
        tasks.append(check_heartbeat(settings, timeout_s))
    results: list[CheckResult] = []
    for outcome in await asyncio.gather(*tasks):
        results.extend(outcome if isinstance(outcome, tuple) else (outcome,))
    order = {name: i for i, name in enumerate(ALL_CHECKS)}
    return sorted((r for r in results if r.name in wanted), key=lambda r: order[r.name])
