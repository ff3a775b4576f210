"""`berth paths ls|stats|rm|clear`: look at and manage path caches.

Every action prints a table for people or, with ``--json``, one JSON document.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import asyncpg

from shared.blobstore import blob_store
from shared.connections import connect_redis
from shared.db import create_pool
from shared.humanize import format_age, format_bytes, format_ratio, shorten, table
from shared.pathcache_admin import delete_entries, read_counters
from shared.settings import Settings

EXIT_NOTHING = 1
EXIT_USAGE = 2
_ENTRY_COLUMNS = (
    "scope, key, version, paths, size_bytes, content_bytes, compression, storage_path,"
    " created_at, last_accessed_at, access_count, created_by_job"
)


def register(sub: Any) -> None:
    paths = sub.add_parser("paths", help="list, inspect and remove path caches")
    actions = paths.add_subparsers(dest="paths_action", required=True, metavar="ACTION")

    p = actions.add_parser("ls", help="list entries, most recently used first")
    p.add_argument("--scope", help="only this scope")
    p.add_argument("--limit", type=int, default=100, help="at most this many (default 100)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(handler=cmd_ls)

    p = actions.add_parser("stats", help="hits, prefix hits, misses and bytes, per scope")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(handler=cmd_stats)

    p = actions.add_parser("rm", help="remove a key (every version of it) from a scope")
    p.add_argument("scope")
    p.add_argument("key")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(handler=cmd_rm)

    p = actions.add_parser("clear", help="remove every entry of a scope")
    p.add_argument("--scope", required=True)
    p.add_argument("--yes", action="store_true", help="really remove them")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(handler=cmd_clear)


async def cmd_ls(args: argparse.Namespace, settings: Settings) -> int:
    pool = await create_pool(settings)
    try:
        rows = await pool.fetch(
            f"select {_ENTRY_COLUMNS} from path_caches where state = 'ready'"  # noqa: S608
            " and ($1::text is null or scope = $1) order by last_accessed_at desc limit $2",
            args.scope,
            args.limit,
        )
    finally:
        await pool.close()
    entries = [_entry(r) for r in rows]
    if args.json:
        _print_json(entries)
        return 0
    now = datetime.now(UTC)
    print(
        table(
            ("SCOPE", "KEY", "SIZE", "HITS", "LAST USED", "CREATED", "PATHS"),
            [
                (
                    shorten(r["scope"], 24),
                    shorten(r["key"], 48),
                    format_bytes(r["size_bytes"]),
                    str(r["access_count"]),
                    format_age(r["last_accessed_at"], now),
                    format_age(r["created_at"], now),
                    shorten(" ".join(r["paths"]), 40),
                )
                for r in rows
            ],
            right=(2, 3),
        )
        if rows
        else "no path caches" + (f" in scope {args.scope!r}" if args.scope else "")
    )
    return 0


async def cmd_stats(args: argparse.Namespace, settings: Settings) -> int:
    pool = await create_pool(settings)
    try:
        stored = {
            r["scope"]: (r["entries"], r["size_bytes"])
            for r in await pool.fetch(
                "select scope, count(*) as entries, sum(size_bytes)::bigint as size_bytes"
                " from path_caches where state = 'ready' group by scope"
            )
        }
    finally:
        await pool.close()
    redis = await connect_redis(settings)
    try:
        overall, per_scope = await read_counters(redis)
    finally:
        await redis.aclose()
    scopes = {
        scope: _scope_stats(per_scope.get(scope, {}), stored.get(scope, (0, 0)))
        for scope in sorted({*stored, *per_scope})
    }
    total = (sum(n for n, _ in stored.values()), sum(b for _, b in stored.values()))
    report: dict[str, Any] = {
        "overall": _scope_stats(overall, total),
        "scopes": scopes,
        "budget_bytes": settings.path_cache_budget_bytes,
        "scope_budget_bytes": settings.path_cache_scope_budget_bytes,
    }
    if args.json:
        _print_json(report)
        return 0
    rows = [_stats_row(name, s) for name, s in scopes.items()]
    print(table(_STATS_HEADERS, [*rows, _stats_row("(all)", report["overall"])], right=range(1, 9)))
    print(
        f"budget {format_bytes(settings.path_cache_budget_bytes)} overall,"
        f" {format_bytes(settings.path_cache_scope_budget_bytes)} per scope"
    )
    return 0


async def cmd_rm(args: argparse.Namespace, settings: Settings) -> int:
    removed = await _remove(settings, "scope = $1 and key = $2", args.scope, args.key)
    return _report_removal(args, removed, f"no entry with key {args.key!r} in {args.scope!r}")


async def cmd_clear(args: argparse.Namespace, settings: Settings) -> int:
    if not args.yes:
        print(
            f"berth: this removes every path cache of scope {args.scope!r}; add --yes to do it",
            file=sys.stderr,
        )
        return EXIT_USAGE
    removed = await _remove(settings, "scope = $1", args.scope)
    return _report_removal(args, removed, f"scope {args.scope!r} has no path caches", ok=True)


async def _remove(settings: Settings, where: str, *params: str) -> list[asyncpg.Record]:
    pool = await create_pool(settings)
    try:
        query = f"select id from path_caches where {where}"  # noqa: S608
        ids = [r["id"] for r in await pool.fetch(query, *params)]
        return await delete_entries(pool, blob_store(settings), ids) if ids else []
    finally:
        await pool.close()


def _report_removal(
    args: argparse.Namespace, removed: Sequence[asyncpg.Record], none: str, *, ok: bool = False
) -> int:
    freed = sum(r["size_bytes"] for r in removed)
    if args.json:
        entries = [{"scope": r["scope"], "key": r["key"], "version": r["version"]} for r in removed]
        _print_json({"removed": len(removed), "bytes_freed": freed, "entries": entries})
    elif removed:
        noun = "entry" if len(removed) == 1 else "entries"
        print(f"removed {len(removed)} {noun}, {format_bytes(freed)}")
    else:
        print(none, file=sys.stderr)
    return 0 if removed or ok else EXIT_NOTHING


_STATS_HEADERS = (
    "SCOPE",
    "ENTRIES",
    "SIZE",
    "EXACT",
    "PREFIX",
    "MISS",
    "HIT %",
    "RESTORED",
    "SAVED",
)


def _scope_stats(counters: dict[str, int], stored: tuple[int, int]) -> dict[str, Any]:
    exact, prefix, miss = (counters.get(f"path_{r}", 0) for r in ("exact", "prefix", "miss"))
    lookups = exact + prefix + miss
    return {
        "entries": stored[0],
        "size_bytes": stored[1] or 0,
        "exact": exact,
        "prefix": prefix,
        "miss": miss,
        "hit_ratio": (exact + prefix) / lookups if lookups else None,
        "bytes_restored": counters.get("path_bytes_restored", 0),
        "bytes_saved": counters.get("path_bytes_saved", 0),
        "saves": counters.get("path_saved", 0),
        "saves_skipped": counters.get("path_save_skipped", 0),
        "saves_failed": counters.get("path_save_failed", 0),
    }


def _stats_row(name: str, s: dict[str, Any]) -> tuple[str, ...]:
    return (
        shorten(name, 32),
        str(s["entries"]),
        format_bytes(s["size_bytes"]),
        str(s["exact"]),
        str(s["prefix"]),
        str(s["miss"]),
        format_ratio(s["hit_ratio"]),
        format_bytes(s["bytes_restored"]),
        format_bytes(s["bytes_saved"]),
    )


def _entry(row: asyncpg.Record) -> dict[str, Any]:
    entry = dict(row)
    for name in ("created_at", "last_accessed_at"):
        entry[name] = entry[name].isoformat()
    return entry


def _print_json(value: object) -> None:
    print(json.dumps(value, indent=2, sort_keys=True))
