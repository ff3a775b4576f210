"""Text for `berth cache …` and `berth stats`: aligned, sizes and ages readable at a glance.

Every function returns the whole text; the JSON forms are built in ``scheduler.cli``
from the same objects, with full keys and exact numbers.
"""

from __future__ import annotations

from datetime import datetime

from scheduler.cache_admin import CacheStats, Entry, Removed
from scheduler.eviction import EvictionReport
from scheduler.metrics import Counters, MetricsSnapshot, Rate
from shared.humanize import (
    format_age,
    format_bytes,
    format_duration,
    format_ratio,
    pairs,
    shorten,
    table,
)

KEY_CHARS = 12
REQUIREMENTS_WIDTH = 48


def requirements_summary(lines: list[str]) -> str:
    """``numpy==1.26.4, pandas>=2`` from canonical lines (option lines left out)."""
    names = [line for line in lines if line and not line.startswith("-")]
    return ", ".join(names) if names else "(none)"


def entries_text(entries: list[Entry], now: datetime) -> str:
    if not entries:
        return "no cache entries"
    rows = [
        [
            e.image_key[:KEY_CHARS],
            e.runtime,
            format_bytes(e.size_bytes),
            str(e.use_count),
            format_age(e.last_used_at, now),
            e.status,
            shorten(requirements_summary(e.requirements), REQUIREMENTS_WIDTH),
        ]
        for e in entries
    ]
    headers = ["KEY", "RUNTIME", "SIZE", "USES", "LAST USED", "STATUS", "REQUIREMENTS"]
    return table(headers, rows, right=(2, 3))


def _rate(rate: Rate) -> str:
    return f"{format_ratio(rate.ratio)} ({rate.hits} hits / {rate.hits + rate.misses} lookups)"


def _builds(c: Counters) -> str:
    return f"{c.builds} ({format_duration(c.build_seconds) if c.builds else '0s'} building)"


def _evictions(c: Counters) -> str:
    return f"{c.evictions} ({format_bytes(c.evicted_bytes)} freed)"


def cache_stats_text(stats: CacheStats) -> str:
    total = sum(stats.entries.values())
    by_status = ", ".join(f"{n} {status}" for status, n in stats.entries.items())
    return pairs(
        [
            ("entries", f"{total} ({by_status})"),
            ("total size", f"{format_bytes(stats.ready_bytes)} in ready images"),
            ("hit rate", _rate(stats.hit_rate)),
            ("  last 24h", _rate(stats.hit_rate_24h)),
            ("builds", _builds(stats.total)),
            ("  last 24h", _builds(stats.last_24h)),
            ("evictions", _evictions(stats.total)),
            ("  last 24h", _evictions(stats.last_24h)),
        ]
    )


def removed_text(done: Removed, *, what: str) -> str:
    lines = [
        f"{what}: removed {len(done.images)} image(s) from engine {done.engine_id[:KEY_CHARS]}"
        f" ({format_bytes(done.freed_bytes)}), marked {len(done.records)} record(s) evicted"
    ]
    if done.kept:
        kept = ", ".join(k[:KEY_CHARS] for k in done.kept)
        lines.append(f"kept {len(done.kept)} in use or being built: {kept}")
    return "\n".join(lines)


def eviction_text(report: EvictionReport) -> str:
    if report.lease_busy:
        return f"engine {report.engine_id[:KEY_CHARS]} is being swept by another process; try later"
    verb = "would remove" if report.dry_run else "removed"
    freed = sum(r.size_bytes for r in report.removed)
    head = (
        f"{verb} {len(report.removed)} of {report.images} image(s), {format_bytes(freed)}:"
        f" {format_bytes(report.bytes_before)} -> {format_bytes(report.bytes_after)}"
        f" (budget {format_bytes(report.budget_bytes)}, {report.protected} in use or building)"
    )
    if not report.removed:
        return head
    rows = [[r.image_key[:KEY_CHARS], format_bytes(r.size_bytes), r.reason] for r in report.removed]
    text = head + "\n\n" + table(["KEY", "SIZE", "REASON"], rows, right=(1,))
    if report.failed:
        text += f"\n\nthe engine refused {len(report.failed)} image(s) (in use)"
    return text


def snapshot_text(snapshot: MetricsSnapshot, now: datetime, *, live: bool) -> str:
    taken = (
        "now (no scheduler snapshot in Redis yet)"
        if live
        else f"{snapshot.taken_at:%Y-%m-%d %H:%M:%S} UTC ({format_age(snapshot.taken_at, now)})"
    )
    jobs = "  ".join(f"{status} {n}" for status, n in snapshot.jobs_last_hour.items() if n)
    t, d = snapshot.total, snapshot.last_24h
    summary = pairs(
        [
            ("snapshot", taken),
            ("queue", f"{snapshot.queue_depth} job(s) waiting or running"),
            ("jobs, last hour", jobs or "none"),
            ("image hit rate", _rate(snapshot.image_hit_rate)),
            ("  last 24h", _rate(snapshot.image_hit_rate_24h)),
            ("lock hit rate", _rate(snapshot.requirements_hit_rate)),
            ("builds", f"{_builds(t)}; last 24h {_builds(d)}"),
            ("evictions", f"{_evictions(t)}; last 24h {_evictions(d)}"),
        ]
    )
    if not snapshot.hosts:
        return summary + "\n\nno ready images on any host"
    rows = [
        [(h.engine_id or "(unknown)")[:KEY_CHARS], str(h.images), format_bytes(h.size_bytes)]
        for h in snapshot.hosts
    ]
    return summary + "\n\n" + table(["HOST ENGINE", "IMAGES", "SIZE"], rows, right=(1, 2))
