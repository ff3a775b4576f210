"""`berth scheduler`, `berth cache ls|stats|rm|clear|prune` and `berth stats`.

Each command opens only what it needs (Redis, Postgres, the Docker engine of
``docker_url`` for commands that remove images) and closes it. ``--json`` prints one
JSON document with full keys and exact numbers for scripts.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg
from arq.connections import ArqRedis

from scheduler import cache_admin, render
from scheduler.eviction import evict_images
from scheduler.main import run_scheduler
from scheduler.metrics import load_snapshot, take_snapshot
from shared.connections import connect_redis
from shared.db import create_pool
from shared.engine import Engine
from shared.humanize import parse_size
from shared.settings import Settings

EXIT_USAGE = 2


@dataclass
class Services:
    redis: ArqRedis
    pool: asyncpg.Pool
    engine: Engine | None


@asynccontextmanager
async def services(settings: Settings, *, engine: bool = False) -> AsyncIterator[Services]:
    async with AsyncExitStack() as stack:
        redis = await connect_redis(settings)
        stack.push_async_callback(redis.aclose)
        pool = await create_pool(settings)
        stack.push_async_callback(pool.close)
        docker: Engine | None = None
        if engine:
            docker = await Engine.connect(settings)
            stack.push_async_callback(docker.close)
        yield Services(redis, pool, docker)


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, default=_json_default))


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _now() -> datetime:
    return datetime.now(UTC)


async def cmd_scheduler(args: argparse.Namespace, settings: Settings) -> int:
    await run_scheduler(settings)
    return 0


async def cmd_cache_ls(args: argparse.Namespace, settings: Settings) -> int:
    async with services(settings) as s:
        entries = await cache_admin.list_entries(s.pool, runtime=args.runtime, sort=args.sort)
    if args.json:
        _print_json([asdict(e) for e in entries])
    else:
        print(render.entries_text(entries, _now()))
    return 0


async def cmd_cache_stats(args: argparse.Namespace, settings: Settings) -> int:
    async with services(settings) as s:
        stats = await cache_admin.cache_stats(s.pool, s.redis)
    if args.json:
        _print_json(
            asdict(stats)
            | {
                "hit_rate": stats.hit_rate.model_dump(),
                "hit_rate_24h": stats.hit_rate_24h.model_dump(),
                "total": stats.total.model_dump(),
                "last_24h": stats.last_24h.model_dump(),
            }
        )
    else:
        print(render.cache_stats_text(stats))
    return 0


async def cmd_cache_rm(args: argparse.Namespace, settings: Settings) -> int:
    async with services(settings) as s:
        key = await cache_admin.find_key(s.pool, args.key)
        engine = await Engine.connect(settings)
        try:
            done = await cache_admin.remove_entry(engine, s.pool, s.redis, settings, key)
        finally:
            await engine.close()
    if args.json:
        _print_json(asdict(done))
    else:
        print(render.removed_text(done, what=f"rm {key[:12]}"))
    return 0


async def cmd_cache_clear(args: argparse.Namespace, settings: Settings) -> int:
    if not args.yes:
        print(
            "berth: cache clear removes every berth image on this engine and marks every"
            " record evicted (all next jobs rebuild); run it again with --yes",
            file=sys.stderr,
        )
        return EXIT_USAGE
    async with services(settings, engine=True) as s:
        assert s.engine is not None
        done = await cache_admin.clear_all(s.engine, s.pool, s.redis, settings)
    if args.json:
        _print_json(asdict(done))
    else:
        print(render.removed_text(done, what="clear"))
    return 0


async def cmd_cache_prune(args: argparse.Namespace, settings: Settings) -> int:
    async with services(settings, engine=True) as s:
        assert s.engine is not None
        report = await evict_images(
            s.engine,
            s.pool,
            s.redis,
            settings,
            budget_bytes=args.max_size,
            unused_days=args.unused_days,
            dry_run=args.dry_run,
        )
    if args.json:
        _print_json(report.as_dict())
    else:
        print(render.eviction_text(report))
    return 1 if report.lease_busy else 0


async def cmd_stats(args: argparse.Namespace, settings: Settings) -> int:
    async with services(settings) as s:
        snapshot = await load_snapshot(s.redis)
        live = snapshot is None
        if snapshot is None:
            snapshot = await take_snapshot(s.pool, s.redis, settings)
    if args.json:
        print(json.dumps(snapshot.model_dump(mode="json") | {"live": live}, indent=2))
    else:
        print(render.snapshot_text(snapshot, _now(), live=live))
    return 0


def _size(text: str) -> int:
    try:
        value = parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from e
    if value <= 0:
        raise argparse.ArgumentTypeError("must be more than 0 bytes")
    return value


def _days(text: str) -> float:
    try:
        value = float(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of days") from e
    if value <= 0:
        raise argparse.ArgumentTypeError("must be more than 0 days")
    return value


def _json_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print JSON (for scripts)")


def register(sub: Any) -> None:
    p = sub.add_parser("scheduler", help="run the scheduler: eviction, reaping, retention, metrics")
    p.set_defaults(handler=cmd_scheduler, service=True)

    p = sub.add_parser("stats", help="the fleet's metrics snapshot (queue, jobs, cache, hosts)")
    _json_flag(p)
    p.set_defaults(handler=cmd_stats)

    cache = sub.add_parser("cache", help="list, inspect and remove cached dependency images")
    actions = cache.add_subparsers(dest="cache_command", required=True, metavar="ACTION")

    p = actions.add_parser("ls", help="list cache entries")
    p.add_argument("--runtime", metavar="R", help="only this runtime, e.g. python3.11")
    p.add_argument(
        "--sort",
        choices=("last-used", "size", "uses"),
        default="last-used",
        help="order, largest or most recent first (default: last-used)",
    )
    _json_flag(p)
    p.set_defaults(handler=cmd_cache_ls)

    p = actions.add_parser("stats", help="entries, total size, hit rate, builds, evictions")
    _json_flag(p)
    p.set_defaults(handler=cmd_cache_stats)

    p = actions.add_parser("rm", help="remove one entry's image and mark its record evicted")
    p.add_argument("key", metavar="KEY_OR_UNIQUE_PREFIX", help="an image key or a unique prefix")
    _json_flag(p)
    p.set_defaults(handler=cmd_cache_rm)

    p = actions.add_parser("clear", help="remove every cached image (asks for --yes)")
    p.add_argument("--yes", action="store_true", help="really remove everything")
    _json_flag(p)
    p.set_defaults(handler=cmd_cache_clear)

    p = actions.add_parser("prune", help="evict now: unused images, then LRU down to a size")
    p.add_argument(
        "--max-size",
        type=_size,
        default=None,
        metavar="SIZE",
        help="size budget, e.g. 10G (default: BERTH_IMAGE_BUDGET_BYTES); over it, least"
        " recently used images go until 90%% of it is left",
    )
    p.add_argument(
        "--unused-days",
        type=_days,
        default=None,
        metavar="DAYS",
        help="remove images unused this long (default: BERTH_IMAGE_UNUSED_DAYS)",
    )
    p.add_argument("--dry-run", action="store_true", help="show what would go, remove nothing")
    _json_flag(p)
    p.set_defaults(handler=cmd_cache_prune)
