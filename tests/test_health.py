"""`berth health`: each check against the real services, bounded, one line each."""

from __future__ import annotations

import asyncio
import importlib
import json
import secrets
import socket
from collections.abc import AsyncIterator

import asyncpg
import pytest
from arq.connections import ArqRedis
from pydantic import SecretStr

from shared.cli import run
from shared.db import create_pool, migrate
from shared.health import (
    HEARTBEAT_INTERVAL_S,
    CheckResult,
    check_heartbeat,
    check_postgres,
    check_redis,
    heartbeat_key,
    run_checks,
)
from shared.settings import Settings
from tests.conftest import ADMIN_DSN, _dsn_for


def by_name(results: list[CheckResult]) -> dict[str, CheckResult]:
    return {r.name: r for r in results}


@pytest.fixture
async def empty_database(settings: Settings) -> AsyncIterator[Settings]:
    """Settings on a new, unmigrated database, dropped after the test."""
    name = f"berth_health_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(ADMIN_DSN)
    try:
        await admin.execute(f'create database "{name}"')
        yield settings.model_copy(update={"postgres_dsn": SecretStr(_dsn_for(name))})
    finally:
        await admin.execute(f'drop database if exists "{name}" with (force)')
        await admin.close()


@pytest.mark.docker
async def test_all_default_checks_pass_against_the_real_services(settings: Settings) -> None:
    """Redis, Postgres, migrations and the Docker engine all pass on this machine."""
    results = await run_checks(settings)
    assert [r.name for r in results] == ["redis", "postgres", "migrations", "docker"]
    assert all(r.ok for r in results), [r.line() for r in results]
    assert "engine" in by_name(results)["docker"].detail


async def test_unreachable_redis_fails_only_its_own_check(settings: Settings) -> None:
    """A closed Redis port fails `redis` with its address; Postgres still passes."""
    broken = settings.model_copy(update={"redis_url": "redis://127.0.0.1:1/0"})
    results = by_name(await run_checks(broken, ["redis", "postgres"], timeout_s=3))
    assert not results["redis"].ok
    assert results["redis"].detail.startswith("redis://127.0.0.1:1/0: ")
    assert results["postgres"].ok


async def test_a_server_that_never_answers_fails_within_the_bound(settings: Settings) -> None:
    """A port that accepts but never replies fails the check at its deadline, not later."""

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # hold the connection open, never answer
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        silent_redis = settings.model_copy(update={"redis_url": f"redis://127.0.0.1:{port}/0"})
        result = await check_redis(silent_redis, timeout_s=0.5)
    finally:
        server.close()
    assert not result.ok
    assert "no answer within 0.5 s" in result.detail


async def test_unreachable_postgres_fails_postgres_and_skips_migrations(
    settings: Settings,
) -> None:
    """Without Postgres the migrations check says it could not look, and both fail."""
    broken = settings.model_copy(
        update={"postgres_dsn": SecretStr("postgresql://berth:secret@127.0.0.1:1/berth")}
    )
    db, migrations = await check_postgres(broken, timeout_s=3)
    assert not db.ok
    assert "secret" not in db.detail
    assert "***" in db.detail
    assert not migrations.ok
    assert migrations.detail.startswith("not checked")


async def test_unmigrated_database_reports_the_pending_migrations(
    empty_database: Settings,
) -> None:
    """A reachable database without berth's tables fails `migrations`, naming the files."""
    db, migrations = await check_postgres(empty_database)
    assert db.ok
    assert not migrations.ok
    assert "0001_initial.sql" in migrations.detail
    assert "berth migrate" in migrations.detail


async def test_database_ahead_of_the_code_passes(empty_database: Settings) -> None:
    """A migration this release does not know (a newer release ran it) is not a failure."""
    pool = await create_pool(empty_database)
    try:
        await migrate(pool)
        await pool.execute(
            "insert into berth_migrations (version, name, checksum)"
            " values (9999, '9999_future.sql', 'x')"
        )
    finally:
        await pool.close()
    _, migrations = await check_postgres(empty_database)
    assert migrations.ok
    assert "ahead" in migrations.detail
    assert "9999_future.sql" in migrations.detail


async def test_an_applied_migration_edited_since_fails(empty_database: Settings) -> None:
    """A shipped file whose checksum differs from the applied one fails `migrations`."""
    pool = await create_pool(empty_database)
    try:
        await migrate(pool)
        await pool.execute("update berth_migrations set checksum = 'edited' where version = 1")
    finally:
        await pool.close()
    _, migrations = await check_postgres(empty_database)
    assert not migrations.ok
    assert "changed" in migrations.detail


async def test_heartbeat_passes_only_while_this_hosts_key_lives(
    redis: ArqRedis, settings: Settings
) -> None:
    """The heartbeat check reads this host's arq health key; another host's does not count."""
    await redis.set(heartbeat_key(settings.queue_name, "pod-a"), b"j_complete=3", ex=60)
    alive = await check_heartbeat(settings, hostname="pod-a")
    dead = await check_heartbeat(settings, hostname="pod-b")
    assert alive.ok
    assert "j_complete=3" in alive.detail
    assert not dead.ok
    assert "pod-b" in dead.detail


def test_cli_prints_one_line_per_check_and_exits_zero(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`berth health --only …` prints one ok line per check and exits 0."""
    monkeypatch.setenv("BERTH_REDIS_URL", settings.redis_url)
    monkeypatch.setenv("BERTH_POSTGRES_DSN", settings.postgres_dsn.get_secret_value())
    code = run(["health", "--only", "redis", "--only", "postgres", "--only", "migrations"])
    lines = capsys.readouterr().out.splitlines()
    assert code == 0
    assert [line.split()[:2] for line in lines] == [
        ["ok", "redis"],
        ["ok", "postgres"],
        ["ok", "migrations"],
    ]


def test_cli_json_reports_failure_and_exits_non_zero(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`berth health --json` is one JSON object; one failing check makes the exit 1."""
    monkeypatch.setenv("BERTH_REDIS_URL", "redis://127.0.0.1:1/0")
    monkeypatch.setenv("BERTH_POSTGRES_DSN", settings.postgres_dsn.get_secret_value())
    code = run(["health", "--json", "--skip", "docker", "--timeout", "3"])
    report = json.loads(capsys.readouterr().out)
    assert code == 1
    assert report["ok"] is False
    assert {c["name"]: c["ok"] for c in report["checks"]} == {
        "redis": False,
        "postgres": True,
        "migrations": True,
    }


@pytest.mark.parametrize("builder", ["worker.main:build_worker", "scheduler.main:build_scheduler"])
async def test_worker_and_scheduler_refresh_the_key_the_liveness_probe_reads(
    builder: str, settings: Settings
) -> None:
    """Worker and scheduler give arq this host's heartbeat key, refreshed at least every minute."""
    module_name, function_name = builder.split(":")
    build = getattr(importlib.import_module(module_name), function_name)
    worker = build(settings)
    assert worker.health_check_key == heartbeat_key(settings.queue_name, socket.gethostname())
    # The liveness probes give up after 4 x 30 s; a beat every minute at most leaves slack.
    assert worker.health_check_interval <= 2 * HEARTBEAT_INTERVAL_S
