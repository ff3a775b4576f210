"""`berth warm`: fill the Redis hot cache from Postgres.

Run as the worker pods' init container (and by the scheduler's refresh cron), so
the first jobs after a Redis restart or a scale-up are served from Redis.
"""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg
import structlog
from redis.asyncio import Redis

from shared.cache import ImageRecord, RequirementRecord
from shared.constants import image_record_key, requirements_record_key
from shared.settings import Settings

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class WarmResult:
    images: int
    requirements: int


async def warm(
    redis: Redis, pool: asyncpg.Pool, settings: Settings, *, limit: int | None = None
) -> WarmResult:
    """Publish the most recently used ready images and fresh locks to Redis."""
    limit = settings.warm_limit if limit is None else limit
    image_rows = await pool.fetch(
        "select * from image_cache where status = 'ready' order by last_used_at desc limit $1",
        limit,
    )
    # Unpinned locks past their TTL are left out: a lookup must re-resolve them.
    req_rows = await pool.fetch(
        "select deps_hash, python_version, canonical, lock, pinned, resolved_at"
        " from requirements"
        " where pinned or resolved_at > now() - make_interval(secs => $2)"
        " order by last_used_at desc limit $1",
        limit,
        float(settings.lock_ttl_s),
    )
    async with redis.pipeline(transaction=False) as pipe:
        for row in image_rows:
            image = ImageRecord(**dict(row))
            pipe.set(
                image_record_key(image.image_key),
                image.model_dump_json(),
                ex=settings.image_cache_ttl_s,
            )
        for row in req_rows:
            req = RequirementRecord(**dict(row))
            pipe.set(
                requirements_record_key(req.deps_hash, req.python_version),
                req.model_dump_json(),
                ex=settings.requirements_cache_ttl_s,
            )
        await pipe.execute()
    result = WarmResult(images=len(image_rows), requirements=len(req_rows))
    log.info("cache.warm", images=result.images, requirements=result.requirements)
    return result
