"""Image eviction: keep one Docker engine's berth images under a size budget.

A sweep looks only at the images of the engine it is given that carry berth's labels
(``berth.managed`` and a ``berth.image_key``). It removes, in this order:

1. images unused for ``image_unused_days`` (last use from ``image_cache``);
2. while the total is over ``image_budget_bytes``, the least recently used, down to
   90 % of the budget (``scheduler.eviction_plan``).

An image with no ready record (a leftover, or one whose record was evicted elsewhere)
counts as the oldest, its age taken from its creation. An image whose key a
container on this engine uses, or whose key has a live build lease, is never
removed; nor does the engine remove an image a container uses (no force).

After a removal the record becomes ``evicted`` (kept for history) and its Redis copy
is dropped, so the next job rebuilds instead of failing; a record that belongs to
another engine is left alone (that engine still has its copy). Then the store's
environments that no image, container or build of the engine needs are removed
(``prune_environments``): an image's size is its environment's.

Several hosts: each engine is swept by whoever holds ``berth:lease:evict:<engine_id>``;
the scheduler sweeps its own engine and every worker runs ``eviction_loop`` for its
own, so every host with workers is swept, one sweeper per engine at a time.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import structlog
from redis.asyncio import Redis

from scheduler.eviction_plan import Candidate, Removal, plan_eviction
from shared.cache import Cache, count
from shared.constants import LABEL_IMAGE_KEY, build_lease_key, eviction_lease_key
from shared.engine import ENV_GRACE_S, Engine, ImageInfo
from shared.errors import EngineError
from shared.lease import Lease
from shared.metrics import Metrics
from shared.settings import Settings

log = structlog.get_logger(__name__)

SWEEP_TIMEOUT_S = 600.0
# Added to the longest a job may live before its leftovers (containers, an
# environment moved aside while in use) are removed.
CONTAINER_SWEEP_MARGIN_S = 300.0
EVICTION_LEASE_TTL_S = 60.0  # renewed while the sweep runs


@dataclass
class EvictionReport:
    """What a sweep saw and did; ``as_dict()`` is the log line and the JSON output."""

    engine_id: str
    dry_run: bool = False
    lease_busy: bool = False
    images: int = 0
    bytes_before: int = 0
    bytes_after: int = 0
    budget_bytes: int = 0
    protected: int = 0
    removed: list[Removal] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    environments_removed: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


async def evict_images(
    engine: Engine,
    pool: asyncpg.Pool,
    redis: Redis,
    settings: Settings,
    *,
    budget_bytes: int | None = None,
    unused_days: float | None = None,
    dry_run: bool = False,
) -> EvictionReport:
    """One sweep of ``engine`` under its lease (settings' budget and age unless given)."""
    engine_id = await engine.engine_id()
    budget = settings.image_budget_bytes if budget_bytes is None else budget_bytes
    days = settings.image_unused_days if unused_days is None else unused_days
    report = EvictionReport(engine_id=engine_id, dry_run=dry_run, budget_bytes=budget)
    lease = Lease(redis, eviction_lease_key(engine_id), EVICTION_LEASE_TTL_S)
    if not await lease.acquire():
        report.lease_busy = True
    else:
        async with lease.renewing(), asyncio.timeout(SWEEP_TIMEOUT_S):
            await _sweep(engine, pool, redis, settings, report, days)
    log.info(
        "scheduler.evict",
        engine_id=engine_id[:12],
        dry_run=dry_run,
        lease_busy=report.lease_busy,
        images=report.images,
        removed=len(report.removed),
        freed_bytes=sum(r.size_bytes for r in report.removed),
        bytes_after=report.bytes_after,
        budget_bytes=budget,
        protected=report.protected,
        failed=len(report.failed),
        environments_removed=report.environments_removed,
    )
    return report


async def _sweep(
    engine: Engine,
    pool: asyncpg.Pool,
    redis: Redis,
    settings: Settings,
    report: EvictionReport,
    days: float,
) -> None:
    images = await berth_images(engine, settings)
    keys = sorted({i.labels[LABEL_IMAGE_KEY] for i in images})
    # Leases before records: a build that releases its lease has written its record.
    protected = await _building(redis, keys) | await engine.image_keys_in_use()
    rows = await pool.fetch(
        "select image_key, status, engine_id, image_id, last_used_at"
        " from image_cache where image_key = any($1::text[])",
        keys,
    )
    records = {r["image_key"]: r for r in rows}
    candidates = [_candidate(i, records.get(i.labels[LABEL_IMAGE_KEY]), report) for i in images]
    report.images = len(candidates)
    report.bytes_before = sum(c.size_bytes for c in candidates)
    report.protected = sum(1 for c in candidates if c.image_key in protected)
    plan = plan_eviction(
        candidates,
        budget_bytes=report.budget_bytes,
        unused_before=datetime.now(UTC) - timedelta(days=days),
        protected=protected,
    )
    by_id = {c.image_id: c for c in candidates}
    cache = Cache(redis, pool, settings)
    for removal in plan:
        if report.dry_run:
            report.removed.append(removal)
            continue
        image = by_id[removal.image_id]
        if not await remove_berth_image(engine, image.image_id, image.tags):
            report.failed.append(removal.image_id)
            continue
        report.removed.append(removal)
        record = records.get(removal.image_key)
        if record is not None and _owns(record, report.engine_id, removal.image_id):
            reason = f"evicted from {report.engine_id[:12]}: {removal.reason}"
            await cache.forget_image(removal.image_key, status="evicted", reason=reason)
    report.bytes_after = report.bytes_before - sum(r.size_bytes for r in report.removed)
    if report.removed and not report.dry_run:
        await count(redis, "evictions", len(report.removed))
        await count(redis, "evicted_bytes", sum(r.size_bytes for r in report.removed))
    if not report.dry_run:
        report.environments_removed = len(await prune_environments(engine, settings))


async def prune_environments(
    engine: Engine, settings: Settings, *, grace_s: float = ENV_GRACE_S
) -> list[str]:
    """Remove the store's environments that no image, container or build needs.

    Kept: the key of every berth image on the engine (any deployment's: they may
    share the store volume) and of every container (a job's, or a build's).
    A failure is logged, not raised: the next sweep tries again.
    """
    try:
        images = await engine.list_berth_images()
        keep = {i.labels[LABEL_IMAGE_KEY] for i in images if i.labels.get(LABEL_IMAGE_KEY)}
        keep |= await engine.image_keys_in_use()
        return await engine.prune_envs(
            keep, stale_after_s=settings.job_timeout_s() + CONTAINER_SWEEP_MARGIN_S, grace_s=grace_s
        )
    except EngineError as e:
        log.warning("scheduler.prune_environments_failed", error=str(e))
        return []


async def berth_images(engine: Engine, settings: Settings) -> list[ImageInfo]:
    """This deployment's dependency images on ``engine``: a berth.image_key label, and
    every label of ``settings.extra_labels`` (deployments sharing an engine keep apart)."""
    wanted = settings.extra_labels.items()
    return [
        image
        for image in await engine.list_berth_images()
        if image.labels.get(LABEL_IMAGE_KEY) and wanted <= image.labels.items()
    ]


def _candidate(
    image: ImageInfo, record: asyncpg.Record | None, report: EvictionReport
) -> Candidate:
    key = image.labels[LABEL_IMAGE_KEY]
    tracked = (
        record is not None
        and record["status"] == "ready"
        and not (
            record["engine_id"] == report.engine_id
            and record["image_id"] is not None
            and record["image_id"] != image.id
        )
    )
    last_used = record["last_used_at"] if tracked and record is not None else image.created
    return Candidate(
        image_id=image.id,
        image_key=key,
        tags=tuple(image.tags),
        size_bytes=image.size_bytes,
        last_used_at=last_used,
        tracked=tracked,
    )


def _owns(record: asyncpg.Record, engine_id: str, image_id: str) -> bool:
    """Whether removing ``image_id`` from ``engine_id`` leaves ``record`` pointing at nothing."""
    if record["status"] != "ready":
        return False
    if record["engine_id"] not in (None, engine_id):
        return False
    return record["image_id"] in (None, image_id)


async def _building(redis: Redis, keys: list[str]) -> set[str]:
    """The keys among ``keys`` whose image some worker is building now."""
    if not keys:
        return set()
    async with redis.pipeline(transaction=False) as pipe:
        for key in keys:
            pipe.exists(build_lease_key(key))
        found = await pipe.execute()
    return {key for key, n in zip(keys, found, strict=True) if n}


async def remove_berth_image(engine: Engine, image_id: str, tags: tuple[str, ...]) -> bool:
    """Untag and delete one image, never forced; False when the engine refuses (in use).

    An image already gone counts as removed: the goal (not on this engine) holds.
    """
    for ref in tags or (image_id,):
        try:
            await engine.remove_image(ref, force=False)
        except EngineError as e:
            log.info("scheduler.evict_refused", image_id=image_id[:19], ref=ref, reason=e.reason)
            return False
    return True


def record_eviction_metrics(metrics: Metrics, report: EvictionReport) -> None:
    """Add a sweep's removals to this process's Prometheus counters, by reason."""
    if report.dry_run:
        return
    for reason in ("unused", "over budget"):
        removed = sum(1 for r in report.removed if r.reason == reason)
        metrics.record_evictions(removed, kind="image", reason=reason)


async def eviction_loop(
    engine: Callable[[], Awaitable[Engine]],
    pool: asyncpg.Pool,
    redis: Redis,
    settings: Settings,
    *,
    container_max_age_s: float,
    metrics: Metrics | None = None,
) -> None:
    """Sweep this host's engine every ``eviction_interval_s`` until cancelled.

    Each worker runs one (started in its ``on_startup``): a cron on the shared job
    queue would run on whichever worker picks it, not on each host. The per-engine
    lease makes the workers of one host take turns. Besides images, it removes
    berth containers older than ``container_max_age_s`` (no job or build lives that
    long: they are leftovers of a worker that died). The first sweep waits one
    interval, so a fleet starting together does not sweep all at once.
    """
    while True:
        await asyncio.sleep(settings.eviction_interval_s)
        try:
            current = await engine()
            report = await evict_images(current, pool, redis, settings)
            if not report.lease_busy:
                swept = await current.sweep_containers(older_than_s=container_max_age_s)
                if swept:
                    log.info("scheduler.containers_swept", removed=swept)
        except Exception:
            log.exception("scheduler.evict_failed")
            continue
        if metrics is not None:
            record_eviction_metrics(metrics, report)
