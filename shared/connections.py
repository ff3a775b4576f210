"""Opening Redis the one way every berth process does: arq's pool, JSON payloads.

Job payloads are JSON, never pickle: whoever can write to Redis must not be able
to run code on a worker. The same serializer pair is given to the producer and
to the worker, so a pickled payload pushed by hand fails to deserialize.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from arq.connections import ArqRedis, RedisSettings, create_pool
from redis.exceptions import RedisError

from shared.errors import ServiceUnavailable
from shared.settings import Settings

CONNECT_TIMEOUT_S = 5.0


def _encode_extra(value: Any) -> Any:
    """Exceptions (arq stores a failed job's exception as its result) become plain data."""
    if isinstance(value, BaseException):
        return {"error": type(value).__name__, "message": str(value)}
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def serialize_job(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":"), default=_encode_extra).encode()


def deserialize_job(data: bytes) -> dict[str, Any]:
    value = json.loads(data)
    if not isinstance(value, dict):
        raise ValueError("a berth job payload must be a JSON object")
    return value


def redis_settings(settings: Settings) -> RedisSettings:
    rs = RedisSettings.from_dsn(settings.redis_url)
    rs.conn_timeout = int(CONNECT_TIMEOUT_S)
    rs.conn_retries = 1
    rs.conn_retry_delay = 0
    return rs


def redact_url(url: str) -> str:
    """A Redis URL without its password."""
    if "@" not in url:
        return url
    scheme, rest = url.split("://", 1)
    return f"{scheme}://***@{rest.split('@', 1)[1]}"


async def connect_redis(settings: Settings) -> ArqRedis:
    """arq's Redis pool with berth's serializers; ServiceUnavailable if unreachable."""
    try:
        async with asyncio.timeout(CONNECT_TIMEOUT_S * 2):
            redis = await create_pool(
                redis_settings(settings),
                job_serializer=serialize_job,
                job_deserializer=deserialize_job,
                default_queue_name=settings.queue_name,
            )
            await redis.ping()
    except (OSError, TimeoutError, RedisError) as e:
        raise ServiceUnavailable(
            "redis", redact_url(settings.redis_url), str(e) or type(e).__name__
        ) from e
    return redis
