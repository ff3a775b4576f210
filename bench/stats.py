"""Small statistics over timing samples: medians and percentiles, rounded for reports."""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Mapping, Sequence


def percentile(samples: Sequence[float], pct: float) -> float:
    """The ``pct``-th percentile (linear interpolation between closest ranks)."""
    if not samples:
        raise ValueError("no samples")
    ordered = sorted(samples)
    if len(ordered) == 1:
        return ordered[0]
    rank = (len(ordered) - 1) * pct / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summary(samples: Sequence[float]) -> dict[str, float]:
    """n, min, p50, p95, p99, max and mean of the samples."""
    return {
        "n": len(samples),
        "min": min(samples),
        "p50": percentile(samples, 50),
        "p95": percentile(samples, 95),
        "p99": percentile(samples, 99),
        "max": max(samples),
        "mean": statistics.fmean(samples),
    }


def phase_medians(rows: Iterable[Mapping[str, float]]) -> dict[str, float]:
    """The median of every phase present in the rows (missing phases are skipped)."""
    collected: dict[str, list[float]] = {}
    for row in rows:
        for phase, seconds in row.items():
            if isinstance(seconds, int | float):
                collected.setdefault(phase, []).append(float(seconds))
    return {phase: round(statistics.median(v), 4) for phase, v in sorted(collected.items())}


def ratio(numerator: float, denominator: float) -> float | None:
    return round(numerator / denominator, 3) if denominator else None
