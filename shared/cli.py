"""The `berth` command line.

Each subcommand builds the settings once, opens only the services it needs, and
closes them. Any berth error is one line on stderr and a non-zero exit, never a
traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

import structlog
from pydantic import ValidationError

from shared.errors import BerthError
from shared.logs import configure_logging
from shared.settings import Settings

Handler = Callable[[argparse.Namespace, Settings], Coroutine[Any, Any, int]]

EXIT_ERROR = 1
EXIT_USAGE = 2


async def cmd_migrate(args: argparse.Namespace, settings: Settings) -> int:
    from shared.db import create_pool, migrate

    pool = await create_pool(settings)
    try:
        applied = await migrate(pool)
    finally:
        await pool.close()
    print(f"applied {len(applied)} migration(s)" + (f": {', '.join(applied)}" if applied else ""))
    return 0


async def cmd_warm(args: argparse.Namespace, settings: Settings) -> int:
    from shared.connections import connect_redis
    from shared.db import create_pool
    from shared.warm import warm

    pool = await create_pool(settings)
    try:
        redis = await connect_redis(settings)
        try:
            result = await warm(redis, pool, settings, limit=args.limit)
        finally:
            await redis.aclose()
    finally:
        await pool.close()
    print(f"warmed {result.images} image record(s) and {result.requirements} lock(s)")
    return 0


# Feature modules that add their own subcommands: each has
# `register(sub: argparse._SubParsersAction) -> None`, imported when the parser is built.
COMMAND_MODULES: tuple[str, ...] = (
    "shared.cli_jobs",
    "shared.cli_health",
    "shared.cli_paths",
    "worker.main",
    "scheduler.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="berth",
        description="Run scripts in containers built once per dependency set.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).register(sub)

    p = sub.add_parser("migrate", help="apply database migrations (safe to run concurrently)")
    p.set_defaults(handler=cmd_migrate)

    p = sub.add_parser("warm", help="load recent cache records from Postgres into Redis")
    p.add_argument(
        "--limit",
        type=int,
        default=None,
        help="how many records of each kind (default: BERTH_WARM_LIMIT)",
    )
    p.set_defaults(handler=cmd_warm)

    return parser


def main(argv: Sequence[str] | None = None) -> None:
    sys.exit(run(argv))


def run(argv: Sequence[str] | None = None) -> int:
    """Parse, run the subcommand, and map every failure to a one-line message."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = Settings()
    except ValidationError as e:
        first = e.errors()[0]
        field = "BERTH_" + str(first["loc"][0]).upper() if first["loc"] else "settings"
        print(f"berth: invalid setting {field}: {first['msg']}", file=sys.stderr)
        return EXIT_USAGE
    configure_logging(settings)
    if not getattr(args, "service", False):
        # A client command: its output is its answer; only problems go to stderr,
        # and a refused connection is reported once, by us, not by arq's retries.
        logging.getLogger().setLevel(max(logging.WARNING, logging.getLogger().level))
        logging.getLogger("arq.connections").setLevel(logging.CRITICAL)
    handler: Handler = args.handler
    try:
        return asyncio.run(handler(args, settings))
    except BerthError as e:
        print(f"berth: {e}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("berth: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # the last line of defence: one line; the trace only at debug
        structlog.get_logger(__name__).debug("cli.crash", exc_info=True)
        print(f"berth: unexpected error: {type(e).__name__}: {e}", file=sys.stderr)
        return EXIT_ERROR
