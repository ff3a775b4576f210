"""Prometheus metrics for operators: what the fleet did, how fast, and what is waiting.

Each process (a worker, the scheduler) builds one `Metrics` in its startup, keeps it
in its context, and serves it with `start_metrics_server(settings.metrics_port, …)`.
The metric objects live in the instance's own registry, never in a module-level
global, so tests build as many as they like.

Who records what:

- worker: `record_job` once per finished job (status, run time, queue wait, image
  cache hit), `record_cache_lookup` for requirement-lock and path-cache lookups,
  `record_build` once per image build it ran.
- scheduler: `set_queue_depth` on each metrics tick (the series KEDA scales the
  workers on) and `set_image_cache` (totals, budget, bytes per engine), both from
  its metrics snapshot; `record_evictions` after each sweep (workers sweep their
  own engine too, and record theirs).

Counters start at zero for every label value a process can record, so a rate is
defined (and an alert can fire) before the first event of a kind.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
    start_http_server,
)
from redis.asyncio import Redis

from shared.models import Status

Role = Literal["worker", "scheduler"]
CacheKind = Literal["image", "requirements", "path"]
CacheResult = Literal["hit", "miss", "prefix_hit"]
BuildResult = Literal["succeeded", "failed"]
EvictionKind = Literal["image", "path_cache"]

FINAL_STATUSES: tuple[str, ...] = tuple(status.value for status in Status if status.final)
CACHE_KINDS: tuple[CacheKind, ...] = ("image", "requirements", "path")
CACHE_RESULTS: tuple[CacheResult, ...] = ("hit", "miss", "prefix_hit")
BUILD_RESULTS: tuple[BuildResult, ...] = ("succeeded", "failed")
EVICTION_KINDS: tuple[EvictionKind, ...] = ("image", "path_cache")
# Why an entry went; scheduler.eviction says "over budget", a label says over_budget.
EVICTION_REASONS = ("unused", "over_budget", "expired", "cleared")

# Buckets in seconds: jobs run from well under a second to the one-hour cap; builds
# take seconds to the 15-minute build timeout; queue waits should stay small.
JOB_DURATION_BUCKETS_S = (0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
QUEUE_WAIT_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 900, 3600)
BUILD_DURATION_BUCKETS_S = (1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 900, 1800)

PREFIX = "berth"


class Metrics:
    """The metric objects of one berth process, in a registry of their own."""

    def __init__(
        self, role: Role, *, version: str = "", registry: CollectorRegistry | None = None
    ) -> None:
        self.role = role
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        Info(f"{PREFIX}_process", "The berth process serving these metrics.", registry=r).info(
            {"role": role, "version": version}
        )

        self.jobs = Counter(
            f"{PREFIX}_jobs", "Jobs finished, by final status.", ["status"], registry=r
        )
        self.job_duration = Histogram(
            f"{PREFIX}_job_duration_seconds",
            "Time from a worker picking a job up to its result being written.",
            buckets=JOB_DURATION_BUCKETS_S,
            registry=r,
        )
        self.queue_wait = Histogram(
            f"{PREFIX}_queue_wait_seconds",
            "Time a job spent in the queue before a worker picked it up.",
            buckets=QUEUE_WAIT_BUCKETS_S,
            registry=r,
        )
        self.cache_lookups = Counter(
            f"{PREFIX}_cache_lookups",
            "Cache lookups: image records, requirement locks, path caches.",
            ["kind", "result"],
            registry=r,
        )
        self.builds = Counter(
            f"{PREFIX}_builds", "Image builds run by this process.", ["result"], registry=r
        )
        self.build_duration = Histogram(
            f"{PREFIX}_build_duration_seconds",
            "Wall time of one image build (resolve excluded).",
            buckets=BUILD_DURATION_BUCKETS_S,
            registry=r,
        )
        self.image_bytes = Gauge(
            f"{PREFIX}_image_bytes", "Bytes of the ready dependency images, fleet-wide.", registry=r
        )
        self.images = Gauge(f"{PREFIX}_images", "Ready dependency images, fleet-wide.", registry=r)
        self.engine_image_bytes = Gauge(
            f"{PREFIX}_engine_image_bytes",
            "Bytes of the ready dependency images on one Docker engine (its budget's scope).",
            ["engine"],
            registry=r,
        )
        self.image_budget_bytes = Gauge(
            f"{PREFIX}_image_budget_bytes",
            "The per-engine image budget eviction keeps to (BERTH_IMAGE_BUDGET_BYTES).",
            registry=r,
        )
        self.evictions = Counter(
            f"{PREFIX}_evictions",
            "Cache entries evicted, by kind and reason.",
            ["kind", "reason"],
            registry=r,
        )
        self.queue_depth = Gauge(
            f"{PREFIX}_queue_depth",
            "Jobs in arq's queue (waiting, deferred or running): the autoscaling signal.",
            registry=r,
        )
        self.queue_depth_updated = Gauge(
            f"{PREFIX}_queue_depth_updated_timestamp_seconds",
            "When berth_queue_depth was last measured (Unix time).",
            registry=r,
        )

        # Every series a process can emit exists from the start, at zero.
        if role == "worker":
            for status in FINAL_STATUSES:
                self.jobs.labels(status)
            for result in BUILD_RESULTS:
                self.builds.labels(result)
            for kind in CACHE_KINDS:
                for cache_result in CACHE_RESULTS:
                    if cache_result != "prefix_hit" or kind == "path":
                        self.cache_lookups.labels(kind, cache_result)
        for eviction_kind in EVICTION_KINDS:
            for reason in EVICTION_REASONS:
                self.evictions.labels(eviction_kind, reason)

    # --- worker -------------------------------------------------------------

    def record_job(
        self,
        status: Status | str,
        duration_s: float,
        queue_wait_s: float | None = None,
        cache_hit: bool | None = None,
    ) -> None:
        """One finished job: its final status, run time, queue wait and image-cache hit.

        ``status`` is a final status (``shared.models.Status`` members are accepted as
        they are). ``cache_hit`` is None when the job ended before its image was looked
        up (an invalid spec, a reused result); otherwise it counts as one image lookup,
        so image lookups are recorded here and nowhere else.
        """
        label = str(status)
        if label not in FINAL_STATUSES:
            raise ValueError(f"status {label!r} is not one of {', '.join(FINAL_STATUSES)}")
        self.jobs.labels(label).inc()
        self.job_duration.observe(max(0.0, duration_s))
        if queue_wait_s is not None:
            self.queue_wait.observe(max(0.0, queue_wait_s))
        if cache_hit is not None:
            self.cache_lookups.labels("image", "hit" if cache_hit else "miss").inc()

    def record_cache_lookup(self, kind: CacheKind, result: CacheResult) -> None:
        """A requirements-lock or path-cache lookup (image lookups come with `record_job`)."""
        if kind not in CACHE_KINDS or result not in CACHE_RESULTS:
            raise ValueError(f"unknown cache lookup {kind!r}/{result!r}")
        self.cache_lookups.labels(kind, result).inc()

    def record_build(self, result: BuildResult, duration_s: float) -> None:
        """One image build this process ran (a worker that waited on another's lease: none)."""
        if result not in BUILD_RESULTS:
            raise ValueError(f"build result {result!r} is not one of {', '.join(BUILD_RESULTS)}")
        self.builds.labels(result).inc()
        self.build_duration.observe(max(0.0, duration_s))

    # --- scheduler (and workers' own eviction sweeps) -------------------------

    def record_evictions(self, count: int, *, kind: EvictionKind, reason: str) -> None:
        """Entries removed by one sweep; ``reason`` such as "unused" or "over budget"."""
        label = reason.strip().replace(" ", "_")
        if kind not in EVICTION_KINDS or label not in EVICTION_REASONS:
            raise ValueError(f"unknown eviction {kind!r}/{reason!r}")
        if count > 0:
            self.evictions.labels(kind, label).inc(count)

    def set_image_cache(
        self,
        *,
        total_bytes: int,
        images: int,
        budget_bytes: int,
        per_engine: Mapping[str, int] | None = None,
    ) -> None:
        """The ready images (count and bytes), the per-engine budget, and bytes per engine.

        ``per_engine`` maps an engine id to its images' bytes; it replaces the previous
        values, so an engine without images any more drops out. The budget applies per
        engine, so the over-budget alert reads ``berth_engine_image_bytes``.
        """
        self.image_bytes.set(total_bytes)
        self.images.set(images)
        self.image_budget_bytes.set(budget_bytes)
        if per_engine is not None:
            self.engine_image_bytes.clear()
            for engine, size_bytes in per_engine.items():
                self.engine_image_bytes.labels(engine[:12]).set(size_bytes)

    def set_queue_depth(self, depth: int, *, now_s: float | None = None) -> None:
        """Jobs in arq's queue right now (see `read_queue_depth`); KEDA scales on it."""
        self.queue_depth.set(depth)
        self.queue_depth_updated.set(time.time() if now_s is None else now_s)

    def render(self) -> bytes:
        """The registry in Prometheus' text format (what the endpoint serves)."""
        return generate_latest(self.registry)


async def read_queue_depth(redis: Redis, queue_name: str) -> int:
    """Jobs in arq's queue: the members of its sorted set.

    arq keeps a job in the queue's sorted set from enqueue until it finishes (the
    score is the time it may start), so this counts jobs waiting, deferred for a
    retry, and running: the work the fleet has in hand. KEDA's Redis *list* scaler
    cannot read a sorted set; this gauge is what the worker autoscaler uses instead.
    """
    return int(await redis.zcard(queue_name))


@dataclass
class MetricsServer:
    """The HTTP endpoint serving one registry at ``/metrics`` (and at ``/``)."""

    server: WSGIServer
    thread: threading.Thread

    @property
    def port(self) -> int:
        return int(self.server.server_port)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def start_metrics_server(port: int, metrics: Metrics, *, addr: str = "0.0.0.0") -> MetricsServer:  # noqa: S104
    """Serve ``metrics`` on ``addr:port`` from a daemon thread; port 0 picks a free one.

    A thread, not the event loop: a scrape still answers while a job blocks the loop,
    and a hung loop shows up in the liveness probe rather than in missing metrics.
    """
    server, thread = start_http_server(port, addr=addr, registry=metrics.registry)
    return MetricsServer(server, thread)
