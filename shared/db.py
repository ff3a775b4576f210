"""Postgres: connection pools and migrations.

Migrations are the numbered ``.sql`` files in ``migrations/``, applied in order,
each in its own transaction, under a session advisory lock so that two processes
running ``berth migrate`` at once apply each file exactly once. Applied files are
recorded (with their checksum) in ``berth_migrations``.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import structlog

from shared.errors import MigrationError, ServiceUnavailable
from shared.settings import Settings

log = structlog.get_logger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"
MIGRATION_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")
# Any constant works; it only has to be the same in every berth process.
MIGRATION_LOCK_ID = 0x62657274  # "bert"
CONNECT_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def redact_dsn(dsn: str) -> str:
    """The DSN with its password replaced, fit for an error message."""
    return re.sub(r"(://[^:/@]+:)[^@]*@", r"\1***@", dsn)


async def create_pool(settings: Settings, *, min_size: int = 1) -> asyncpg.Pool:
    """A connection pool, or ServiceUnavailable naming the (redacted) DSN and why."""
    dsn = settings.postgres_dsn.get_secret_value()
    try:
        async with asyncio.timeout(CONNECT_TIMEOUT_S):
            pool = await asyncpg.create_pool(
                dsn,
                min_size=min_size,
                max_size=max(min_size, settings.postgres_pool_max),
                command_timeout=60,
            )
    except (OSError, TimeoutError, asyncpg.PostgresError) as e:
        reason = str(e) or type(e).__name__
        raise ServiceUnavailable("postgres", redact_dsn(dsn), reason) from e
    assert pool is not None
    return pool


def load_migrations(directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    """The migration files in order; a misnamed or duplicate number is an error."""
    found: dict[int, Migration] = {}
    for path in sorted(directory.glob("*.sql")):
        match = MIGRATION_NAME.match(path.name)
        if match is None:
            raise MigrationError(path.name, "name must look like 0001_some_name.sql")
        version = int(match.group(1))
        if version in found:
            raise MigrationError(path.name, f"number {version} is used twice")
        found[version] = Migration(version, path.name, path.read_text())
    return [found[v] for v in sorted(found)]


async def migrate(pool: asyncpg.Pool, directory: Path = MIGRATIONS_DIR) -> list[str]:
    """Apply the migrations not applied yet; returns the names applied now."""
    migrations = load_migrations(directory)
    applied_now: list[str] = []
    async with pool.acquire() as conn:
        await conn.execute("select pg_advisory_lock($1)", MIGRATION_LOCK_ID)
        try:
            await conn.execute(
                """
                create table if not exists berth_migrations (
                    version    integer     primary key,
                    name       text        not null,
                    checksum   text        not null,
                    applied_at timestamptz not null default now()
                )
                """
            )
            rows = await conn.fetch("select version, name, checksum from berth_migrations")
            done = {r["version"]: r for r in rows}
            for migration in migrations:
                row = done.get(migration.version)
                if row is not None:
                    if row["checksum"] != migration.checksum:
                        raise MigrationError(
                            migration.name,
                            "already applied, but the file has changed since; "
                            "add a new migration instead of editing an applied one",
                        )
                    continue
                async with conn.transaction():
                    await conn.execute(migration.sql)
                    await conn.execute(
                        "insert into berth_migrations (version, name, checksum)"
                        " values ($1, $2, $3)",
                        migration.version,
                        migration.name,
                        migration.checksum,
                    )
                applied_now.append(migration.name)
                log.info("migration.applied", migration=migration.name)
        finally:
            await conn.execute("select pg_advisory_unlock($1)", MIGRATION_LOCK_ID)
    return applied_now
