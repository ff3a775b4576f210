"""Fixtures over the real services: Redis, Postgres and (in docker_fixtures) the engine.

Isolation: one fresh Postgres database per test run (migrated once, truncated
before each test that uses it, dropped at the end) and one Redis database index
per run (flushed before each test and at the end).
"""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import AsyncIterator, Iterator

import asyncpg
import pytest
import redis as sync_redis
from arq.connections import ArqRedis
from pydantic import SecretStr

from shared.connections import connect_redis
from shared.db import create_pool, migrate
from shared.settings import Settings

# Where the services of this machine are (deploy/bootstrap.sh starts them).
ADMIN_DSN = os.environ.get("BERTH_TEST_ADMIN_DSN", "postgresql://berth:berth@127.0.0.1:5432/berth")
REDIS_BASE = os.environ.get("BERTH_TEST_REDIS", "redis://127.0.0.1:6379")
RUNTIME_IMAGES = {"python3.11": "berth-base/python:3.11"}

pytest_plugins = ["tests.docker_fixtures", "tests.jobs_fixtures"]


def _dsn_for(database: str) -> str:
    return ADMIN_DSN.rsplit("/", 1)[0] + "/" + database


@pytest.fixture(scope="session")
def test_database() -> Iterator[str]:
    """A new database for this run, migrated once; dropped at the end."""
    name = f"berth_test_{secrets.token_hex(4)}"

    async def create() -> None:
        conn = await asyncpg.connect(ADMIN_DSN)
        try:
            await conn.execute(f'create database "{name}"')
        finally:
            await conn.close()
        pool = await create_pool(Settings(postgres_dsn=SecretStr(_dsn_for(name))))
        try:
            await migrate(pool)
        finally:
            await pool.close()

    async def drop() -> None:
        conn = await asyncpg.connect(ADMIN_DSN)
        try:
            await conn.execute(f'drop database if exists "{name}" with (force)')
        finally:
            await conn.close()

    asyncio.run(create())
    yield name
    asyncio.run(drop())


@pytest.fixture(scope="session")
def redis_db() -> Iterator[int]:
    """A Redis database index claimed for this run (test runs may overlap), flushed after."""
    claims = sync_redis.Redis.from_url(f"{REDIS_BASE}/0")
    token = secrets.token_hex(8)
    indexes = list(range(1, 16))
    secrets.SystemRandom().shuffle(indexes)
    index = next(
        (i for i in indexes if claims.set(f"berth-test:db-claim:{i}", token, nx=True, ex=3 * 3600)),
        None,
    )
    if index is None:
        claims.close()
        pytest.exit("all 15 Redis test databases are claimed by other test runs", returncode=1)
    client = sync_redis.Redis.from_url(f"{REDIS_BASE}/{index}")
    client.flushdb()
    yield index
    client.flushdb()
    client.close()
    if claims.get(f"berth-test:db-claim:{index}") == token.encode():
        claims.delete(f"berth-test:db-claim:{index}")
    claims.close()


@pytest.fixture
def settings(test_database: str, redis_db: int) -> Settings:
    """Settings pointing at this run's database and Redis index."""
    return Settings(
        redis_url=f"{REDIS_BASE}/{redis_db}",
        postgres_dsn=SecretStr(_dsn_for(test_database)),
        runtime_images=RUNTIME_IMAGES,
        queue_name=f"berth:test-queue:{secrets.token_hex(3)}",
        ca_bundle_path="/etc/ssl/certs/ca-certificates.crt",
        log_format="console",
    )


@pytest.fixture
async def pool(settings: Settings) -> AsyncIterator[asyncpg.Pool]:
    """A pool on this run's database, every table emptied first."""
    pool = await create_pool(settings)
    tables = await pool.fetch(
        "select tablename from pg_tables where schemaname = 'public'"
        " and tablename <> 'berth_migrations'"
    )
    if tables:
        names = ", ".join(f'"{t["tablename"]}"' for t in tables)
        await pool.execute(f"truncate {names} cascade")
    yield pool
    await pool.close()


@pytest.fixture
async def redis(settings: Settings) -> AsyncIterator[ArqRedis]:
    """arq's Redis on this run's database index, flushed first."""
    client = await connect_redis(settings)
    await client.flushdb()
    yield client
    await client.aclose()
