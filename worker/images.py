"""From a job's requirements and runtime to a ready image, building at most once.

Keys first (DESIGN.md "Keys"): the canonical requirement set, its lock for the
runtime's Python (cached, re-resolved after its TTL when unpinned), the base
image's digest, and from those the image key. Then the image: hot cache, then
Postgres, and on a miss a single-flight build: one worker in the whole fleet
holds the build lease for the key, the others wait for its record. A build starts
from the closest image this engine has when there is one (``worker.near``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace

import structlog
from redis.asyncio import Redis

from shared.cache import Cache, ImageRecord, RequirementRecord, count
from shared.constants import (
    BUILD_RECIPE_VERSION,
    LABEL_IMAGE_KEY,
    LABEL_MANAGED,
    build_lease_key,
    failed_resolution_key,
    image_tag,
)
from shared.engine import Engine, ImageInfo
from shared.errors import BerthError, BuildFailed, EngineError, ResolutionFailed
from shared.hashing import deps_hash, image_key, lock_hash
from shared.lease import Lease
from shared.locks import resolve_lock
from shared.requirements import RequirementSet, parse_requirements
from shared.settings import Settings
from worker import near

log = structlog.get_logger(__name__)

WAIT_POLL_S = 0.1  # how often a job waiting for another worker's build looks again


@dataclass(frozen=True)
class Keys:
    runtime: str
    base_image: str
    base_digest: str
    deps_hash: str
    lock: str
    image_key: str
    resolve_s: float
    lock_cached: bool  # the lock came from the cache (no resolution ran)


@dataclass(frozen=True)
class ReadyImage:
    tag: str
    image_key: str
    cache_hit: bool  # the image was there when the job looked: no build, no wait
    tier: str  # where it was found: redis, postgres, built, waited
    build_s: float = 0.0
    record: ImageRecord | None = None
    parent_key: str | None = None  # built by us on top of this image (a near build)


class BuildWaitTimeout(BerthError):
    def __init__(self, image_key: str, waited_s: float) -> None:
        self.image_key = image_key
        self.waited_s = waited_s
        super().__init__(str(self))

    def __str__(self) -> str:
        return (
            f"waited {self.waited_s:.0f} s for another worker to build image "
            f"{self.image_key[:12]} (BERTH_BUILD_WAIT_TIMEOUT_S); giving up"
        )


class ImageResolver:
    """Computes a job's keys and gets its image, building only on a fleet-wide miss."""

    def __init__(self, cache: Cache, engine: Engine, redis: Redis, settings: Settings) -> None:
        self.cache = cache
        self.engine = engine
        self.redis = redis
        self.settings = settings

    async def keys(self, runtime: str, requirements: str) -> Keys:
        """The content keys of a runtime + requirements pair (resolving the lock if needed)."""
        started = time.perf_counter()
        req = parse_requirements(
            requirements,
            allow_index_options=self.settings.allow_index_options,
            max_bytes=self.settings.max_requirements_bytes,
        )
        dh = deps_hash(req)
        python = self.settings.python_version(runtime)
        base_image = self.settings.runtime_images[runtime]
        lookup, base_digest = await asyncio.gather(
            self.cache.get_requirements(dh, python),
            self.engine.base_image_digest(base_image),
        )
        if lookup.record is not None:
            lock = lookup.record.lock
        else:
            lock = await self._resolve(req, dh, python)
        key = image_key(base_digest=base_digest, lock_text=lock, runtime=runtime)
        return Keys(
            runtime,
            base_image,
            base_digest,
            dh,
            lock,
            key,
            time.perf_counter() - started,
            lock_cached=lookup.record is not None,
        )

    async def _resolve(self, req: RequirementSet, dh: str, python: str) -> str:
        failed_key = failed_resolution_key(dh, python)
        cached_error = await self.redis.get(failed_key)
        if cached_error is not None:
            raise ResolutionFailed(
                "the same requirements failed to resolve recently (cached failure)",
                cached_error.decode(),
            )
        try:
            lock = await resolve_lock(req, python_version=python, settings=self.settings)
        except ResolutionFailed as e:
            await self.redis.set(
                failed_key, e.log_tail or e.reason, ex=self.settings.failed_build_ttl_s
            )
            raise
        await self.cache.put_requirements(
            RequirementRecord(
                deps_hash=dh,
                python_version=python,
                canonical=req.canonical,
                lock=lock,
                pinned=req.pinned,
            )
        )
        return lock

    async def ready(
        self, keys: Keys, *, job_id: str, on_build: Callable[[], Awaitable[None]]
    ) -> ReadyImage:
        """The image for these keys: cached, built by us, or built by another worker."""
        lookup = await self.cache.get_image(keys.image_key)
        if lookup.record is not None:
            return self._usable(lookup.record, cache_hit=True, tier=str(lookup.tier))
        await on_build()
        started = time.monotonic()
        lease = Lease(self.redis, build_lease_key(keys.image_key), self.settings.build_lease_ttl_s)
        while True:
            if await lease.acquire():
                async with lease.renewing():
                    # Someone may have finished between our lookup and our lease.
                    again = await self.cache.get_image(keys.image_key)
                    if again.record is not None:
                        return self._usable(again.record, cache_hit=False, tier="waited")
                    record, parent_key = await self._build(keys, job_id=job_id)
                ready = self._usable(
                    record, cache_hit=False, tier="built", build_s=record.build_seconds or 0.0
                )
                return replace(ready, parent_key=parent_key)
            # Another worker is building: wait for its record, or for its lease to lapse.
            while await lease.held_by_anyone():
                waited = time.monotonic() - started
                if waited > self.settings.build_wait_timeout_s:
                    raise BuildWaitTimeout(keys.image_key, waited)
                await asyncio.sleep(WAIT_POLL_S)
            done = await self.cache.get_image(keys.image_key)
            if done.record is not None:
                return self._usable(done.record, cache_hit=False, tier="waited")
            log.warning("build.lease_lapsed", image_key=keys.image_key[:12])

    def _usable(
        self, record: ImageRecord, *, cache_hit: bool, tier: str, build_s: float = 0.0
    ) -> ReadyImage:
        if record.status == "failed":
            raise BuildFailed(
                record.image_key,
                "the same dependency set failed to build recently (cached failure)",
                record.error or "",
                cached=True,
            )
        return ReadyImage(record.image_tag, record.image_key, cache_hit, tier, build_s, record)

    async def _parent(self, keys: Keys) -> ImageInfo | None:
        """The closest image on this engine to start the build from (None: from scratch)."""
        try:
            images = await self.engine.list_berth_images()
        except EngineError as e:
            log.warning("build.parent_lookup_failed", image_key=keys.image_key[:12], error=str(e))
            return None
        found = near.closest_parent(
            images,
            runtime=keys.runtime,
            base_digest=keys.base_digest,
            recipe_version=BUILD_RECIPE_VERSION,
            lock_text=keys.lock,
            required_labels=self.settings.extra_labels,
            exclude_key=keys.image_key,
        )
        if found is None:
            return None
        parent, shared_pins = found
        log.info(
            "build.parent",
            image_key=keys.image_key[:12],
            parent_image_key=parent.labels.get(LABEL_IMAGE_KEY, "")[:12],
            shared_pins=shared_pins,
        )
        return parent

    async def _build(self, keys: Keys, *, job_id: str) -> tuple[ImageRecord, str | None]:
        labels = {
            LABEL_MANAGED: "true",
            "berth.deps_hash": keys.deps_hash,
            "berth.built_by_job": job_id,
            **near.image_labels(
                runtime=keys.runtime,
                base_digest=keys.base_digest,
                recipe_version=BUILD_RECIPE_VERSION,
                lock_text=keys.lock,
            ),
        }
        base = {
            "image_key": keys.image_key,
            "runtime": keys.runtime,
            "base_image": keys.base_image,
            "base_digest": keys.base_digest,
            "deps_hash": keys.deps_hash,
            "lock_hash": lock_hash(keys.lock),
            "recipe_version": BUILD_RECIPE_VERSION,
            "image_tag": image_tag(keys.image_key),
        }
        log.info("build.start", image_key=keys.image_key[:12], job_id=job_id)
        try:
            built = await self.engine.build_image(
                image_key=keys.image_key,
                base_image=keys.base_image,
                lock_text=keys.lock,
                labels=labels,
                parent=await self._parent(keys),
            )
        except BuildFailed as e:
            await self.cache.put_image(
                ImageRecord(**base, status="failed", error=f"{e.reason}\n{e.log_tail}".strip())
            )
            await count(self.redis, "build_failures")
            raise
        record = ImageRecord(
            **base,
            image_id=built.image_id,
            engine_id=await self.engine.engine_id(),
            size_bytes=built.size_bytes,
            build_seconds=built.build_seconds,
        )
        await self.cache.put_image(record)
        await count(self.redis, "builds")
        await count(self.redis, "build_seconds_ms", int(built.build_seconds * 1000))
        log.info(
            "build.done",
            image_key=keys.image_key[:12],
            job_id=job_id,
            build_s=round(built.build_seconds, 2),
            size_bytes=built.size_bytes,
            parent_image_key=(built.parent_key or "")[:12] or None,
            **built.phases,
        )
        return record, built.parent_key

    async def drop_stale(self, image_key: str) -> None:
        """The record points at an image the engine no longer has: forget it."""
        log.warning("image.stale", image_key=image_key[:12])
        await self.cache.forget_image(
            image_key, status="evicted", reason="image missing from the engine"
        )
