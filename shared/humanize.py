"""Numbers for people: sizes, ages, durations, ratios, and aligned text tables.

Sizes are binary (1 KiB = 1024 bytes), as the settings are. ``parse_size`` reads what
an operator types: ``10G``, ``10GiB`` and ``10gb`` all mean 10 GiB, a bare number is
bytes.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import datetime

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtp]?)(?:i?b)?\s*$", re.IGNORECASE)
_POWERS = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4, "p": 5}


def format_bytes(size_bytes: int | None) -> str:
    """``1536`` -> ``1.5 KiB``; ``None`` (unknown) -> ``-``."""
    if size_bytes is None:
        return "-"
    value = float(size_bytes)
    for unit in _UNITS:
        if abs(value) < 1024 or unit == _UNITS[-1]:
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def parse_size(text: str) -> int:
    """``10G`` -> 10 GiB in bytes; ValueError naming the accepted forms otherwise."""
    match = _SIZE.match(text)
    if match is None:
        raise ValueError(f"{text!r} is not a size; use e.g. 500M, 10G or 2.5GiB")
    number, unit = match.groups()
    return int(float(number) * 1024 ** _POWERS[unit.lower()])


def format_duration(seconds: float | None) -> str:
    """``0.25`` -> ``250ms``, ``95`` -> ``1m35s``, ``90000`` -> ``1d1h``."""
    if seconds is None:
        return "-"
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    if seconds < 60:
        return f"{seconds:.1f}s"
    whole = int(seconds)
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours}h" if hours else f"{days}d"
    if hours:
        return f"{hours}h{minutes}m" if minutes else f"{hours}h"
    return f"{minutes}m{secs}s" if secs else f"{minutes}m"


def format_age(when: datetime | None, now: datetime) -> str:
    """How long ago ``when`` was: ``just now``, ``5m ago``, ``3d ago``; ``-`` if unknown."""
    if when is None:
        return "-"
    seconds = (now - when).total_seconds()
    if seconds < 60:
        return "just now"
    return f"{format_duration(seconds)} ago"


def format_ratio(ratio: float | None) -> str:
    """``0.873`` -> ``87.3%``; ``None`` (nothing counted yet) -> ``-``."""
    return "-" if ratio is None else f"{ratio * 100:.1f}%"


def table(
    headers: Sequence[str], rows: Sequence[Sequence[str]], *, right: Sequence[int] = ()
) -> str:
    """Columns padded to their widest cell (``right``: indexes aligned right), no trailing space."""
    widths = [len(h) for h in headers]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))
    lines = []
    for row in (headers, *rows):
        cells = [
            cell.rjust(widths[i]) if i in right else cell.ljust(widths[i])
            for i, cell in enumerate(row)
        ]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def shorten(text: str, width: int) -> str:
    """``text`` cut to ``width`` characters, ending in ``…`` when cut."""
    return text if len(text) <= width else text[: width - 1] + "…"


def pairs(items: Sequence[tuple[str, str]]) -> str:
    """``name  value`` lines, the values aligned in one column."""
    width = max((len(name) for name, _ in items), default=0)
    return "\n".join(f"{name.ljust(width)}  {value}".rstrip() for name, value in items)
