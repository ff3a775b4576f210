"""`berth health`: one line per check, exit 0 only when every check passes.

Readiness probes run it as is (Redis, Postgres, the migrations, the Docker
engine); liveness probes run ``berth health --only heartbeat`` (this host's arq
loop is alive); Compose health checks run both: ``berth health --heartbeat``.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from shared.health import ALL_CHECKS, CHECK_TIMEOUT_S, DEFAULT_CHECKS, CheckName, run_checks
from shared.settings import Settings

EXIT_UNHEALTHY = 1


async def cmd_health(args: argparse.Namespace, settings: Settings) -> int:
    names: list[CheckName] = list(dict.fromkeys(args.only)) if args.only else list(DEFAULT_CHECKS)
    if args.heartbeat and "heartbeat" not in names:
        names.append("heartbeat")
    skip = set(args.skip or ())
    names = [n for n in names if n not in skip]
    results = await run_checks(settings, names, timeout_s=args.timeout)
    healthy = all(r.ok for r in results)
    if args.json:
        print(json.dumps({"ok": healthy, "checks": [r.as_dict() for r in results]}))
    else:
        for result in results:
            print(result.line())
    return 0 if healthy else EXIT_UNHEALTHY


def _positive(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError("must be a positive number of seconds")
    return value


def register(sub: Any) -> None:
    p = sub.add_parser(
        "health",
        help="check Redis, Postgres (and migrations) and the Docker engine; exit 0 if all pass",
    )
    p.add_argument("--json", action="store_true", help="one JSON object instead of lines")
    p.add_argument(
        "--only",
        action="append",
        choices=ALL_CHECKS,
        metavar="CHECK",
        help=f"run only this check (repeatable): {', '.join(ALL_CHECKS)}",
    )
    p.add_argument(
        "--heartbeat",
        action="store_true",
        help="also check this host's arq heartbeat (the worker or scheduler loop is alive)",
    )
    p.add_argument(
        "--skip",
        action="append",
        choices=ALL_CHECKS,
        metavar="CHECK",
        help="leave this check out (repeatable)",
    )
    p.add_argument(
        "--timeout",
        type=_positive,
        default=CHECK_TIMEOUT_S,
        metavar="SECONDS",
        help=f"time bound of each check (default {CHECK_TIMEOUT_S:g})",
    )
    p.set_defaults(handler=cmd_health)
