"""The `executions` rows a worker writes: one per job id, whatever arq retries.

Every function takes the pool first. The final write (status, outputs, files)
is one transaction, so a reader never sees a half-written result.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import asyncpg

from shared.models import Status

FINAL = tuple(s.value for s in Status if s.final)
# The key columns a job fills in as it learns them; only these may be passed by name.
KEY_COLUMNS = frozenset({"script_hash", "deps_hash", "image_key", "execution_key"})


def _key_columns(columns: dict[str, Any]) -> list[str]:
    unknown = set(columns) - KEY_COLUMNS
    if unknown:
        raise ValueError(f"not key columns of executions: {sorted(unknown)}")
    return list(columns)


@dataclass
class Outcome:
    """Everything the final write records about a job."""

    status: Status
    exit_code: int | None = None
    stdout: bytes = b""
    stderr: bytes = b""
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    outputs_truncated: bool = False
    files: dict[str, bytes] = field(default_factory=dict)
    error: str | None = None
    cache_hit: bool | None = None
    reused_from: str | None = None
    timings: dict[str, float] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)


async def start_attempt(
    pool: asyncpg.Pool,
    job_id: str,
    *,
    runtime: str,
    worker: str,
    attempt: int,
    queued_at: datetime | None,
    timeout_s: float | None,
) -> Status:
    """Create or claim the row for this attempt; returns its status (final = already done)."""
    status = await pool.fetchval(
        """
        insert into executions (job_id, status, runtime, worker, attempts, queued_at,
                                started_at, timeout_s)
        values ($1, 'queued', $2, $3, $4, coalesce($5, now()), now(), $6)
        on conflict (job_id) do update set
            worker = case when executions.status = any($7::text[])
                          then executions.worker else excluded.worker end,
            attempts = case when executions.status = any($7::text[])
                            then executions.attempts else excluded.attempts end,
            started_at = case when executions.status = any($7::text[])
                              then executions.started_at else now() end,
            status = case when executions.status = any($7::text[])
                          then executions.status else 'queued' end
        returning status
        """,
        job_id,
        runtime,
        worker,
        attempt,
        queued_at,
        timeout_s,
        list(FINAL),
    )
    return Status(status)


async def set_phase(
    pool: asyncpg.Pool,
    job_id: str,
    status: Status,
    *,
    deadline_s: float | None = None,
    **columns: Any,
) -> None:
    """Move a running job to building/running, with its deadline and key columns."""
    names = _key_columns(columns)
    sets = "".join(f", {name} = ${i}" for i, name in enumerate(names, start=5))
    deadline = "case when $3::float8 is null then null else now() + make_interval(secs => $3) end"
    sql = f"update executions set status = $2, deadline_at = {deadline}{sets}"  # noqa: S608
    await pool.execute(
        sql + " where job_id = $1 and not (status = any($4::text[]))",
        job_id,
        status.value,
        deadline_s,
        list(FINAL),
        *columns.values(),
    )


async def finish(pool: asyncpg.Pool, job_id: str, outcome: Outcome, **columns: Any) -> None:
    """Write the final state and output files in one transaction."""
    names = _key_columns(columns)
    extra = "".join(f", {name} = ${i}" for i, name in enumerate(names, start=14))
    sql = (
        "update executions set status = $2, exit_code = $3, stdout = $4, stderr = $5,"
        " stdout_truncated = $6, stderr_truncated = $7, outputs_truncated = $8,"
        " error = $9, cache_hit = $10, reused_from = $11, timings = $12::jsonb,"
        " details = $13::jsonb, finished_at = now(), deadline_at = null"
    )
    sql += extra + " where job_id = $1"  # column names come from KEY_COLUMNS only
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute(
            sql,
            job_id,
            outcome.status.value,
            outcome.exit_code,
            outcome.stdout,
            outcome.stderr,
            outcome.stdout_truncated,
            outcome.stderr_truncated,
            outcome.outputs_truncated,
            outcome.error,
            outcome.cache_hit,
            outcome.reused_from,
            json.dumps(outcome.timings),
            json.dumps(outcome.details),
            *columns.values(),
        )
        await conn.execute("delete from execution_files where job_id = $1", job_id)
        if outcome.files:
            await conn.copy_records_to_table(
                "execution_files",
                records=[(job_id, name, len(data), data) for name, data in outcome.files.items()],
                columns=["job_id", "name", "size_bytes", "content"],
            )


async def requeue(pool: asyncpg.Pool, job_id: str) -> None:
    """A job interrupted by a worker shutdown goes back to queued; arq runs it again."""
    await pool.execute(
        "update executions set status = 'queued', deadline_at = null"
        " where job_id = $1 and not (status = any($2::text[]))",
        job_id,
        list(FINAL),
    )


async def reusable(pool: asyncpg.Pool, execution_key: str) -> asyncpg.Record | None:
    """The newest succeeded execution with this key, for opt-in result reuse."""
    return await pool.fetchrow(
        "select * from executions where execution_key = $1 and status = 'succeeded'"
        " order by finished_at desc limit 1",
        execution_key,
    )


async def files_of(pool: asyncpg.Pool, job_id: str) -> dict[str, bytes]:
    rows = await pool.fetch("select name, content from execution_files where job_id = $1", job_id)
    return {r["name"]: r["content"] for r in rows}
