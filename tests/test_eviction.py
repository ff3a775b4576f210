"""Image eviction: the plan (pure), then sweeps over real images in the Docker engine."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest
from arq.connections import ArqRedis

from scheduler.eviction import evict_images, eviction_loop
from scheduler.eviction_plan import Candidate, plan_eviction
from scheduler.metrics import counters
from shared.cache import Cache
from shared.constants import LABEL_IMAGE_KEY, build_lease_key, eviction_lease_key, image_record_key
from shared.engine import Engine, ImageInfo, SandboxLimits
from shared.errors import EngineError
from shared.settings import Settings
from tests.jobs_fixtures import TEST_RUN_LABEL
from tests.test_cache import image

NOW = datetime(2030, 1, 10, tzinfo=UTC)
WEEK_AGO = NOW - timedelta(days=7)


def candidate(
    key: str, hours_ago: float, size_bytes: int = 100, *, tracked: bool = True
) -> Candidate:
    return Candidate(
        image_id=f"sha256:{key}",
        image_key=key,
        tags=(f"berth/deps:{key}",),
        size_bytes=size_bytes,
        last_used_at=NOW - timedelta(hours=hours_ago),
        tracked=tracked,
    )


def test_plan_under_budget_and_recent_removes_nothing() -> None:
    """Images under the budget and used within the unused window all stay."""
    images = [candidate("a", 1), candidate("b", 2)]
    assert plan_eviction(images, budget_bytes=1000, unused_before=WEEK_AGO, protected=set()) == []


def test_plan_over_budget_removes_lru_down_to_90_percent() -> None:
    """Over budget, least recently used go first until 90 % of the budget is left."""
    images = [candidate(k, h) for k, h in (("new", 1), ("old", 30), ("mid", 10), ("older", 50))]
    plan = plan_eviction(images, budget_bytes=300, unused_before=WEEK_AGO, protected=set())
    # 400 bytes > 300: down to 270 takes two images, the two least recently used.
    assert [(r.image_key, r.reason) for r in plan] == [
        ("older", "over budget"),
        ("old", "over budget"),
    ]


def test_plan_removes_unused_images_even_under_budget() -> None:
    """An image unused for the configured days goes whatever the budget."""
    images = [candidate("stale", 24 * 8), candidate("fresh", 1)]
    plan = plan_eviction(images, budget_bytes=10**9, unused_before=WEEK_AGO, protected=set())
    assert [(r.image_key, r.reason) for r in plan] == [("stale", "unused")]


def test_plan_never_touches_protected_keys() -> None:
    """An image in use or being built stays, even the oldest, even far over budget."""
    images = [candidate("busy", 24 * 30, 1000), candidate("idle", 1, 100)]
    plan = plan_eviction(images, budget_bytes=10, unused_before=WEEK_AGO, protected={"busy"})
    assert [r.image_key for r in plan] == ["idle"]


def test_plan_removes_untracked_images_first() -> None:
    """An image with no ready record counts as older than any tracked one."""
    images = [candidate("tracked-old", 100), candidate("leftover", 1, tracked=False)]
    plan = plan_eviction(images, budget_bytes=150, unused_before=WEEK_AGO, protected=set())
    assert [r.image_key for r in plan] == ["leftover"]


# --- sweeps over real images ---------------------------------------------------------

MakeImage = Callable[[str], Awaitable[ImageInfo]]


@pytest.fixture(name="evict_settings")
def evict_settings_fixture(settings: Settings, job_run_id: str) -> Settings:
    """Settings whose sweeps see only this test's images (the engine is shared, and
    other tests of the run keep theirs until the session ends)."""
    labels = {TEST_RUN_LABEL: job_run_id, "berth.test_case": secrets.token_hex(4)}
    return settings.model_copy(update={"extra_labels": labels})


@pytest.fixture(name="engine")
async def engine_fixture(evict_settings: Settings) -> AsyncIterator[Engine]:
    engine = await Engine.connect(evict_settings)
    yield engine
    await engine.close()


@pytest.fixture(name="make_image")
async def make_image_fixture(engine: Engine, evict_settings: Settings) -> AsyncIterator[MakeImage]:
    """Builds tiny labelled images (an empty lock: a venv layer on the base); removed after."""
    tags: list[str] = []

    async def make(key: str) -> ImageInfo:
        built = await engine.build_image(
            image_key=key,
            base_image=evict_settings.runtime_images["python3.11"],
            lock_text="",
            labels=dict(evict_settings.extra_labels),
        )
        tags.append(built.tag)
        info = await engine.image_info(built.image_id)
        assert info is not None
        return info

    yield make
    for tag in tags:
        with contextlib.suppress(EngineError):
            await engine.remove_image(tag, force=True)


async def tracked(
    make: MakeImage,
    cache: Cache,
    engine: Engine,
    *,
    used_hours_ago: float,
    engine_id: str | None = None,
) -> ImageInfo:
    """A tiny image with a ready record last used ``used_hours_ago`` (on this engine)."""
    key = secrets.token_hex(32)
    info = await make(key)
    await cache.put_image(
        image(
            key,
            image_id=info.id,
            engine_id=engine_id or await engine.engine_id(),
            size_bytes=info.size_bytes,
        )
    )
    await cache.pool.execute(
        "update image_cache set last_used_at = now() - make_interval(hours => $2)"
        " where image_key = $1",
        key,
        used_hours_ago,
    )
    return info


def key_of(info: ImageInfo) -> str:
    return info.labels[LABEL_IMAGE_KEY]


async def on_engine(engine: Engine, info: ImageInfo) -> bool:
    return await engine.image_info(info.id) is not None


async def status(pool: asyncpg.Pool, info: ImageInfo) -> str:
    return str(
        await pool.fetchval("select status from image_cache where image_key = $1", key_of(info))
    )


@pytest.fixture(name="cache")
def cache_fixture(redis: ArqRedis, pool: asyncpg.Pool, evict_settings: Settings) -> Cache:
    return Cache(redis, pool, evict_settings)


@pytest.mark.docker
async def test_over_budget_evicts_lru_and_spares_the_image_in_use(
    engine: Engine, make_image: MakeImage, cache: Cache, evict_settings: Settings
) -> None:
    """Over budget, the least recently used idle image goes; an older one in use stays."""
    busy = await tracked(make_image, cache, engine, used_hours_ago=30)
    idle = await tracked(make_image, cache, engine, used_hours_ago=20)
    recent = await tracked(make_image, cache, engine, used_hours_ago=1)
    total = sum(i.size_bytes for i in (busy, idle, recent))
    limits = SandboxLimits.from_settings(evict_settings)
    async with engine.sandbox(
        image=busy.tags[0], job_id="evict-test", image_key=key_of(busy), limits=limits, env={}
    ):
        report = await evict_images(
            engine, cache.pool, cache.redis, evict_settings, budget_bytes=total - 1
        )
    assert [(r.image_key, r.reason) for r in report.removed] == [(key_of(idle), "over budget")]
    assert (report.images, report.protected) == (3, 1)
    assert not await on_engine(engine, idle)
    assert await on_engine(engine, busy)
    assert await on_engine(engine, recent)
    assert await status(cache.pool, idle) == "evicted"
    assert await cache.redis.exists(image_record_key(key_of(idle))) == 0
    assert (await cache.get_image(key_of(idle))).record is None
    assert await status(cache.pool, busy) == "ready"
    fleet = await counters(cache.redis, None)
    assert (fleet.evictions, fleet.evicted_bytes) == (1, idle.size_bytes)


@pytest.mark.docker
async def test_images_unused_for_days_are_evicted_under_budget(
    engine: Engine, make_image: MakeImage, cache: Cache, evict_settings: Settings
) -> None:
    """An image unused for image_unused_days goes even far under budget; a used one stays."""
    stale = await tracked(make_image, cache, engine, used_hours_ago=24 * 8)
    fresh = await tracked(make_image, cache, engine, used_hours_ago=2)
    report = await evict_images(engine, cache.pool, cache.redis, evict_settings)
    assert [(r.image_key, r.reason) for r in report.removed] == [(key_of(stale), "unused")]
    assert not await on_engine(engine, stale)
    assert await on_engine(engine, fresh)
    assert await status(cache.pool, stale) == "evicted"


@pytest.mark.docker
async def test_image_being_built_is_never_evicted(
    engine: Engine, make_image: MakeImage, cache: Cache, evict_settings: Settings
) -> None:
    """An image whose key holds a build lease stays, however old and over budget."""
    building = await tracked(make_image, cache, engine, used_hours_ago=24 * 30)
    await cache.redis.set(build_lease_key(key_of(building)), "another-worker", px=60_000)
    report = await evict_images(engine, cache.pool, cache.redis, evict_settings, budget_bytes=1)
    assert report.removed == []
    assert report.protected == 1
    assert await on_engine(engine, building)


@pytest.mark.docker
async def test_image_without_a_record_goes_first(
    engine: Engine, make_image: MakeImage, cache: Cache, evict_settings: Settings
) -> None:
    """A leftover image with no record is evicted before any tracked image."""
    old = await tracked(make_image, cache, engine, used_hours_ago=100)
    leftover = await make_image(secrets.token_hex(32))
    budget = old.size_bytes + leftover.size_bytes - 1
    report = await evict_images(
        engine, cache.pool, cache.redis, evict_settings, budget_bytes=budget
    )
    assert [r.image_key for r in report.removed] == [key_of(leftover)]
    assert await on_engine(engine, old)


@pytest.mark.docker
async def test_copy_of_another_engines_image_leaves_its_record_ready(
    engine: Engine, make_image: MakeImage, cache: Cache, evict_settings: Settings
) -> None:
    """Evicting this host's copy of an image recorded on another engine keeps the record."""
    copy = await tracked(make_image, cache, engine, used_hours_ago=24 * 8, engine_id="other")
    report = await evict_images(engine, cache.pool, cache.redis, evict_settings)
    assert [r.image_key for r in report.removed] == [key_of(copy)]
    assert not await on_engine(engine, copy)
    assert await status(cache.pool, copy) == "ready"


@pytest.mark.docker
async def test_dry_run_and_busy_lease_remove_nothing(
    engine: Engine, make_image: MakeImage, cache: Cache, evict_settings: Settings
) -> None:
    """A dry run reports what would go; a sweep finding another holder of the lease skips."""
    stale = await tracked(make_image, cache, engine, used_hours_ago=24 * 8)
    dry = await evict_images(engine, cache.pool, cache.redis, evict_settings, dry_run=True)
    assert [r.image_key for r in dry.removed] == [key_of(stale)]
    assert await on_engine(engine, stale)
    assert await status(cache.pool, stale) == "ready"
    await cache.redis.set(eviction_lease_key(await engine.engine_id()), "someone", px=60_000)
    busy = await evict_images(engine, cache.pool, cache.redis, evict_settings)
    assert busy.lease_busy
    assert busy.removed == []
    assert await on_engine(engine, stale)


@pytest.mark.docker
async def test_eviction_loop_sweeps_its_engine(
    engine: Engine, make_image: MakeImage, cache: Cache, evict_settings: Settings
) -> None:
    """A worker's eviction loop sweeps its own engine every eviction_interval_s."""
    stale = await tracked(make_image, cache, engine, used_hours_ago=24 * 8)
    fast = evict_settings.model_copy(update={"eviction_interval_s": 1})

    async def this_engine() -> Engine:
        return engine

    task = asyncio.create_task(
        eviction_loop(this_engine, cache.pool, cache.redis, fast, container_max_age_s=3600.0)
    )
    try:
        while await status(cache.pool, stale) != "evicted":  # noqa: ASYNC110 (polls Postgres)
            await asyncio.sleep(0.1)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert not await on_engine(engine, stale)
