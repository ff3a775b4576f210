"""Path caches: actions/cache semantics for directories of a job's work dir.

A job declares ``caches: [{key, paths, restore_keys}]``. Before the run, each
cache is restored from the job's scope (then the fleet's shared read-only scope,
if one is set): the exact key first, else each restore key in order as a prefix,
newest entry first. After a run that succeeded (or any run, if the job asks), the
paths are saved as a tar+zstd archive, unless the exact key is there already:
entries are immutable.

An entry's identity is (scope, key, version); the version is derived from the
paths and the compression, as actions/cache does, so one key saved with other
paths is another entry. Saving claims the identity with a ``pending`` row before
writing the blob and marks it ``ready`` after, so of two jobs saving one key one
wins and the other skips before uploading; nobody ever reads a half-written entry,
and eviction reaps the leftovers of a writer that died.

Neither restore nor save ever fails a job: a problem is a miss (or a skipped
save) and a log line. Archives stream end to end (store, zstd, tar guard, Docker)
in bounded chunks, so a cache of gigabytes does not grow the worker's memory.
"""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from collections.abc import AsyncIterable, AsyncIterator, Sequence
from typing import Any, Literal, Protocol

import asyncpg
import structlog
from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError
from redis.asyncio import Redis

from shared.archive import ArchiveRejected, TarGuard, compress, decompress
from shared.blobstore import BlobStore, DirectoryBlobStore
from shared.errors import BlobNotFound
from shared.pathcache_admin import (
    TARGET_RATIO,
    _record_quietly,
    delete_entries,
)
from shared.settings import Settings

__all__ = [
    "BlobStore",
    "CacheOutcome",
    "CacheSpec",
    "DirectoryBlobStore",
    "SaveOutcome",
    "cache_version",
    "find_entry",
    "restore_caches",
    "save_caches",
]

log = structlog.get_logger(__name__)

WORK_DIR = "/work"
COMPRESSION = "zstd"
ARCHIVE_FORMAT = 1  # bump when the archive layout changes: old entries become misses
MAX_KEY_CHARS = 512
MAX_PATHS = 16
MAX_PATH_CHARS = 1024
MAX_RESTORE_KEYS = 16
NOBODY = 65534
_WILDCARDS = frozenset("*?[]")
_PATH_HELP = "a path relative to the work dir, like node_modules or .cache/pip"

Result = Literal["exact", "prefix", "miss"]
SaveResult = Literal["saved", "exists", "skipped", "failed"]


def _check_key(field: str, key: str) -> str:
    if not 1 <= len(key) <= MAX_KEY_CHARS:
        raise PydanticCustomError(
            "cache_key", f"{field} must be 1-{MAX_KEY_CHARS} characters, not {len(key)}"
        )
    if "," in key:
        raise PydanticCustomError("cache_key", f"{field} may not contain commas")
    if any(ord(c) < 32 or ord(c) == 127 for c in key):
        raise PydanticCustomError("cache_key", f"{field} may not contain control characters")
    return key


def normalize_path(field: str, raw: str) -> str:
    """``./node_modules/`` -> ``node_modules``; anything that is not inside the work dir fails."""
    parts = [p for p in raw.strip().split("/") if p not in ("", ".")]
    why = None
    if raw.strip().startswith("/") or raw.strip().startswith("~"):
        why = "absolute paths (and ~) are not allowed"
    elif ".." in parts:
        why = "'..' is not allowed"
    elif not parts:
        why = "must name something inside the work dir, not the work dir itself"
    elif len(raw) > MAX_PATH_CHARS:
        why = f"must be at most {MAX_PATH_CHARS} characters"
    elif any(ord(c) < 32 or ord(c) == 127 for c in raw) or "\\" in raw:
        why = "control characters and backslashes are not allowed"
    elif _WILDCARDS & set(raw):
        why = "wildcards are not supported; list the directories or files"
    if why is not None:
        raise PydanticCustomError("cache_path", f"{field} ({raw!r}): {why}; use {_PATH_HELP}")
    return "/".join(parts)


class CacheSpec(BaseModel):
    """One cache of a job: where it lives in the work dir and under which keys."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    key: str
    paths: list[str]
    restore_keys: list[str] = Field(default_factory=list)

    @field_validator("key")
    @classmethod
    def _key(cls, value: str) -> str:
        return _check_key("key", value)

    @field_validator("restore_keys")
    @classmethod
    def _restore_keys(cls, value: list[str]) -> list[str]:
        if len(value) > MAX_RESTORE_KEYS:
            raise PydanticCustomError(
                "cache_restore_keys", f"at most {MAX_RESTORE_KEYS} restore keys, not {len(value)}"
            )
        return [_check_key(f"restore_keys[{i}]", key) for i, key in enumerate(value)]

    @field_validator("paths")
    @classmethod
    def _paths(cls, value: list[str]) -> list[str]:
        if not 1 <= len(value) <= MAX_PATHS:
            raise PydanticCustomError(
                "cache_paths", f"a cache needs 1-{MAX_PATHS} paths, not {len(value)}"
            )
        paths = [normalize_path(f"paths[{i}]", raw) for i, raw in enumerate(value)]
        for i, path in enumerate(paths):
            for other in paths[:i]:
                if path == other or path.startswith(other + "/") or other.startswith(path + "/"):
                    raise PydanticCustomError(
                        "cache_paths", f"paths[{i}] ({path!r}) overlaps {other!r}; list it once"
                    )
        return paths

    @property
    def version(self) -> str:
        return cache_version(self.paths)


def cache_version(paths: Sequence[str], compression: str = COMPRESSION) -> str:
    """What else an entry depends on besides its key: the paths and how they are packed."""
    text = "\n".join([*sorted(paths), f"compression={compression}", f"format={ARCHIVE_FORMAT}"])
    return hashlib.sha256(text.encode()).hexdigest()


class CacheOutcome(BaseModel):
    """How one cache was restored, for the job result (like actions/cache's cache-hit)."""

    key: str
    result: Result
    matched_key: str | None = None
    scope: str | None = None
    bytes: int = 0  # size of the archive restored


class SaveOutcome(BaseModel):
    key: str
    result: SaveResult
    reason: str | None = None
    bytes: int = 0  # size of the archive stored


class CacheBox(Protocol):
    """What caches need of a sandbox (shared.engine's Sandbox has it)."""

    async def put_archive_stream(self, chunks: AsyncIterable[bytes]) -> None: ...

    def get_archive_stream(self, path: str) -> AsyncIterator[bytes]: ...


def job_owner(settings: Settings) -> tuple[int, int]:
    """Numeric ``uid:gid`` of the job user (restored files belong to it); nobody else."""
    user, _, group = settings.job_user.partition(":")
    uid = int(user) if user.isdigit() else NOBODY
    return uid, int(group) if group.isdigit() else uid


def _scopes(settings: Settings, scope: str) -> list[str]:
    shared = settings.path_cache_shared_scope
    return [scope, shared] if shared and shared != scope else [scope]


# --- restore -----------------------------------------------------------------

_FIND = (
    "select * from path_caches where state = 'ready' and version = $1 and scope = any($2::text[])"
    " and {match} order by array_position($2::text[], scope), created_at desc, id desc limit 1"
)


async def find_entry(
    pool: asyncpg.Pool, scopes: list[str], spec: CacheSpec
) -> tuple[asyncpg.Record | None, Result]:
    """The entry a restore uses: exact key, else the newest match of each restore key."""
    row = await pool.fetchrow(_FIND.format(match="key = $3"), spec.version, scopes, spec.key)
    if row is not None:
        return row, "exact"
    for prefix in spec.restore_keys:
        match = "starts_with(key, $3)"
        row = await pool.fetchrow(_FIND.format(match=match), spec.version, scopes, prefix)
        if row is not None:
            return row, "prefix"
    return None, "miss"


async def restore_caches(
    pool: asyncpg.Pool,
    redis: Redis,
    store: BlobStore,
    settings: Settings,
    *,
    scope: str,
    caches: Sequence[CacheSpec],
    box: CacheBox,
) -> list[CacheOutcome]:
    """Restore each cache into the sandbox's work dir; never raises for a cache problem."""
    guard = TarGuard(owner=job_owner(settings), max_bytes=settings.path_cache_max_entry_bytes)
    outcomes = []
    for spec in caches:
        try:
            outcome = await _restore_one(pool, store, settings, scope, spec, box, guard)
        except Exception as e:
            log.warning("path_cache.restore_failed", scope=scope, key=spec.key, error=str(e))
            outcome = CacheOutcome(key=spec.key, result="miss")
        log.info("path_cache.restore", scope=scope, **outcome.model_dump(exclude={"scope"}))
        await _record_quietly(
            redis, scope, f"path_{outcome.result}", path_bytes_restored=outcome.bytes
        )
        outcomes.append(outcome)
    return outcomes


async def _restore_one(
    pool: asyncpg.Pool,
    store: BlobStore,
    settings: Settings,
    scope: str,
    spec: CacheSpec,
    box: CacheBox,
    guard: TarGuard,
) -> CacheOutcome:
    row, result = await find_entry(pool, _scopes(settings, scope), spec)
    miss = CacheOutcome(key=spec.key, result="miss")
    if row is None:
        return miss
    facts: dict[str, Any] = {"scope": row["scope"], "key": spec.key, "matched_key": row["key"]}
    errors: list[BaseException] = []
    guard.new_archive()
    try:
        async with store.read(row["storage_path"]) as chunks:
            await box.put_archive_stream(_watched(guard.sanitize(decompress(chunks)), errors))
    except BlobNotFound:
        await delete_entries(pool, store, [row["id"]])
        log.warning("path_cache.archive_missing", storage_path=row["storage_path"], **facts)
        return miss
    except Exception:
        rejected = next((x for x in errors if isinstance(x, ArchiveRejected)), None)
        if rejected is None:
            raise
        await delete_entries(pool, store, [row["id"]])
        log.warning("path_cache.archive_rejected", error=str(rejected), **facts)
        return miss
    await pool.execute(
        "update path_caches set last_accessed_at = now(), access_count = access_count + 1"
        " where id = $1",
        row["id"],
    )
    return CacheOutcome(
        key=spec.key,
        result=result,
        matched_key=row["key"],
        scope=row["scope"],
        bytes=row["size_bytes"],
    )


async def _watched(
    stream: AsyncIterator[bytes], errors: list[BaseException]
) -> AsyncIterator[bytes]:
    """``stream``, remembering its error: Docker's client may wrap it in its own."""
    try:
        async for chunk in stream:
            yield chunk
    except BaseException as e:
        errors.append(e)
        raise


# --- save --------------------------------------------------------------------


async def save_caches(
    pool: asyncpg.Pool,
    redis: Redis,
    store: BlobStore,
    settings: Settings,
    *,
    scope: str,
    caches: Sequence[CacheSpec],
    job_id: str,
    box: CacheBox,
    succeeded: bool,
) -> list[SaveOutcome]:
    """Save each cache whose exact key is absent; never raises for a cache problem.

    ``succeeded``: the run succeeded, or the job asked to save caches on failure too.
    """
    outcomes = []
    for spec in caches:
        if not succeeded:
            outcome = SaveOutcome(key=spec.key, result="skipped", reason="the job did not succeed")
        else:
            try:
                outcome = await _save_one(pool, store, settings, scope, spec, job_id, box)
            except Exception as e:
                log.warning("path_cache.save_failed", scope=scope, key=spec.key, error=str(e))
                outcome = SaveOutcome(key=spec.key, result="failed", reason=str(e))
        event = {"saved": "path_saved", "failed": "path_save_failed"}.get(outcome.result)
        await _record_quietly(
            redis, scope, event or "path_save_skipped", path_bytes_saved=outcome.bytes
        )
        outcomes.append(outcome)
    return outcomes


async def _save_one(
    pool: asyncpg.Pool,
    store: BlobStore,
    settings: Settings,
    scope: str,
    spec: CacheSpec,
    job_id: str,
    box: CacheBox,
) -> SaveOutcome:
    facts = {"scope": scope, "key": spec.key, "job_id": job_id}
    shared = _scopes(settings, scope)[1:]
    if shared and await pool.fetchval(
        "select 1 from path_caches where state = 'ready' and version = $1 and key = $2"
        " and scope = any($3::text[])",
        spec.version,
        spec.key,
        shared,
    ):
        log.info("path_cache.save_skipped", reason="the shared scope has the key", **facts)
        return SaveOutcome(key=spec.key, result="exists")
    storage_path = f"{_scope_dir(scope)}/{uuid.uuid4().hex}.tar.zst"
    entry_id = await pool.fetchval(
        "insert into path_caches (scope, key, version, paths, state, compression,"
        " storage_path, created_by_job) values ($1, $2, $3, $4, 'pending', $5, $6, $7)"
        " on conflict (scope, key, version) do nothing returning id",
        scope,
        spec.key,
        spec.version,
        spec.paths,
        COMPRESSION,
        storage_path,
        job_id,
    )
    if entry_id is None:
        log.info("path_cache.save_skipped", reason="the key is saved, or being saved", **facts)
        return SaveOutcome(key=spec.key, result="exists")
    guard = TarGuard(owner=job_owner(settings), max_bytes=settings.path_cache_max_entry_bytes)
    budget = min(settings.path_cache_scope_budget_bytes, settings.path_cache_budget_bytes)
    missing: list[str] = []
    done = False
    try:
        size_bytes = await store.write(
            storage_path, compress(_tar_of(box, spec.paths, guard, missing))
        )
        if missing:
            log.info("path_cache.paths_missing", paths=missing, **facts)
        skip = None
        if len(missing) == len(spec.paths):
            skip = "none of the paths exist"
        elif size_bytes > budget * TARGET_RATIO:
            skip = f"the archive ({size_bytes} bytes) is over 90 % of the budget ({budget} bytes)"
        elif not await pool.fetchval(
            "update path_caches set state = 'ready', size_bytes = $2, content_bytes = $3,"
            " created_at = now(), last_accessed_at = now()"
            " where id = $1 and state = 'pending' returning id",
            entry_id,
            size_bytes,
            guard.archive_bytes,
        ):
            skip = "the claim was removed meanwhile"
        if skip is not None:
            log.info("path_cache.save_skipped", reason=skip, **facts)
            return SaveOutcome(key=spec.key, result="skipped", reason=skip)
        done = True
    except ArchiveRejected as e:
        log.warning("path_cache.save_failed", error=str(e), **facts)
        return SaveOutcome(key=spec.key, result="failed", reason=str(e))
    finally:
        if not done:
            await asyncio.shield(delete_entries(pool, store, [entry_id], storage_path))
    log.info("path_cache.saved", bytes=size_bytes, content_bytes=guard.archive_bytes, **facts)
    return SaveOutcome(key=spec.key, result="saved", bytes=size_bytes)


async def _tar_of(
    box: CacheBox, paths: Sequence[str], guard: TarGuard, missing: list[str]
) -> AsyncIterator[bytes]:
    """One tar of every path, names re-rooted from ``docker cp``'s basename to the path.

    A path that does not exist is left out (and added to ``missing``).
    """
    for path in paths:
        source = box.get_archive_stream(f"{WORK_DIR}/{path}")
        try:
            first = await anext(source)
        except FileNotFoundError:
            missing.append(path)
            continue
        base = path.rsplit("/", 1)[-1]
        async for chunk in guard.members(_chain(first, source), rename=(base, path)):
            yield chunk
    yield guard.finish()


async def _chain(first: bytes, rest: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    yield first
    async for chunk in rest:
        yield chunk


def _scope_dir(scope: str) -> str:
    return hashlib.sha256(scope.encode()).hexdigest()[:16]
