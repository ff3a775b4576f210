"""Migrations against a real, empty Postgres database."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest
from pydantic import SecretStr

from shared.db import create_pool, load_migrations, migrate
from shared.errors import MigrationError, ServiceUnavailable
from shared.settings import Settings
from tests.conftest import ADMIN_DSN, _dsn_for


@pytest.fixture
async def empty_db() -> AsyncIterator[Settings]:
    """A brand-new database with no tables at all."""
    name = f"berth_mig_{secrets.token_hex(4)}"
    conn = await asyncpg.connect(ADMIN_DSN)
    await conn.execute(f'create database "{name}"')
    await conn.close()
    yield Settings(postgres_dsn=SecretStr(_dsn_for(name)))
    conn = await asyncpg.connect(ADMIN_DSN)
    await conn.execute(f'drop database "{name}" with (force)')
    await conn.close()


async def _tables(pool: asyncpg.Pool) -> set[str]:
    rows = await pool.fetch("select tablename from pg_tables where schemaname = 'public'")
    return {r["tablename"] for r in rows}


async def test_migrate_from_empty_then_again(empty_db: Settings) -> None:
    """The first run applies every file; the second applies none and changes nothing."""
    pool = await create_pool(empty_db)
    try:
        applied = await migrate(pool)
        assert applied == [m.name for m in load_migrations()]
        assert {"requirements", "image_cache", "executions", "berth_migrations"} <= await _tables(
            pool
        )
        assert await migrate(pool) == []
        count = await pool.fetchval("select count(*) from berth_migrations")
        assert count == len(applied)
    finally:
        await pool.close()


async def test_concurrent_migrations_apply_each_file_once(empty_db: Settings) -> None:
    """Four processes migrating at once apply each file exactly once, without errors."""
    pools = [await create_pool(empty_db) for _ in range(4)]
    try:
        results = await asyncio.gather(*(migrate(p) for p in pools))
        applied = [name for result in results for name in result]
        assert sorted(applied) == [m.name for m in load_migrations()]
    finally:
        for p in pools:
            await p.close()


async def test_edited_applied_migration_is_refused(empty_db: Settings, tmp_path: Path) -> None:
    """A migration changed after it was applied is an error naming the file."""
    (tmp_path / "0001_first.sql").write_text("create table t1 (id int);")
    pool = await create_pool(empty_db)
    try:
        await migrate(pool, tmp_path)
        (tmp_path / "0001_first.sql").write_text("create table t1 (id bigint);")
        with pytest.raises(MigrationError, match=r"0001_first\.sql: already applied"):
            await migrate(pool, tmp_path)
    finally:
        await pool.close()


async def test_failed_migration_leaves_nothing_half_applied(
    empty_db: Settings, tmp_path: Path
) -> None:
    """A migration that fails midway is rolled back and not recorded."""
    (tmp_path / "0001_ok.sql").write_text("create table ok (id int);")
    (tmp_path / "0002_bad.sql").write_text("create table half (id int); select 1/0;")
    pool = await create_pool(empty_db)
    try:
        with pytest.raises(asyncpg.DivisionByZeroError):
            await migrate(pool, tmp_path)
        tables = await _tables(pool)
        assert "ok" in tables
        assert "half" not in tables
        versions = await pool.fetch("select version from berth_migrations")
        assert [r["version"] for r in versions] == [1]
    finally:
        await pool.close()


def test_misnamed_migration_file_is_rejected(tmp_path: Path) -> None:
    """A file not named NNNN_name.sql is refused with the rule it breaks."""
    (tmp_path / "first.sql").write_text("select 1;")
    with pytest.raises(MigrationError, match=r"must look like 0001_some_name\.sql"):
        load_migrations(tmp_path)


async def test_unreachable_postgres_names_the_target_without_password() -> None:
    """Connecting to a closed port fails fast with the DSN, password redacted."""
    settings = Settings(postgres_dsn=SecretStr("postgresql://berth:hunter2@127.0.0.1:1/berth"))
    with pytest.raises(ServiceUnavailable) as info:
        await create_pool(settings)
    message = str(info.value)
    assert message.startswith("postgres at postgresql://berth:***@127.0.0.1:1/berth")
    assert "hunter2" not in message
