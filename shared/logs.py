"""structlog set-up: JSON lines in production, a console renderer on a terminal.

arq (and asyncio, aiohttp…) log through the stdlib; their records go through the
same processors, so one process writes one format.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

from shared.settings import Settings

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


def configure_logging(settings: Settings, *, stream: Any = None) -> None:
    """Route structlog and stdlib logging to one handler with one renderer."""
    out = stream if stream is not None else sys.stderr
    if settings.log_format == "auto":
        use_json = not (hasattr(out, "isatty") and out.isatty())
    else:
        use_json = settings.log_format == "json"

    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if use_json
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info if use_json else _identity,
            renderer,
        ],
    )
    handler = logging.StreamHandler(out)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(_LEVELS[settings.log_level])
    # arq configures its own handlers when asked; keep its records on ours.
    for name in ("arq", "arq.worker", "arq.jobs", "arq.connections"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True

    structlog.configure(
        processors=[
            *shared,
            structlog.processors.StackInfoRenderer(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )


def _identity(_logger: Any, _name: str, event: Any) -> Any:
    return event
