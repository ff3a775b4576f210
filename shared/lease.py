"""A Redis lease with a token: one holder fleet-wide, renewed while it works.

Used for single-flight image builds. The holder renews the lease every third of
its TTL; a holder that dies stops renewing, the lease expires, and another
worker takes over. Renew and release only touch the lease if the token is
still ours, so a holder that lost its lease never deletes a successor's.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncIterator, Awaitable
from typing import Any, cast

import structlog
from redis.asyncio import Redis

log = structlog.get_logger(__name__)

_RENEW = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('pexpire', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('del', KEYS[1])
end
return 0
"""


class Lease:
    def __init__(self, redis: Redis, key: str, ttl_s: float) -> None:
        self.redis = redis
        self.key = key
        self.ttl_ms = max(1, int(ttl_s * 1000))
        self.token = secrets.token_hex(16)
        self.lost = False

    async def acquire(self) -> bool:
        """Take the lease if nobody holds it."""
        return bool(await self.redis.set(self.key, self.token, nx=True, px=self.ttl_ms))

    async def renew(self) -> bool:
        renewed = bool(await self._eval(_RENEW, self.token, str(self.ttl_ms)))
        if not renewed and not self.lost:
            self.lost = True
            log.warning("lease.lost", key=self.key)
        return renewed

    async def release(self) -> None:
        await self._eval(_RELEASE, self.token)

    async def _eval(self, script: str, *args: str) -> Any:
        return await cast(Awaitable[Any], self.redis.eval(script, 1, self.key, *args))

    async def held_by_anyone(self) -> bool:
        return bool(await self.redis.exists(self.key))

    @contextlib.asynccontextmanager
    async def renewing(self) -> AsyncIterator[Lease]:
        """Keep renewing while the body runs; release afterwards, whatever happens."""
        task = asyncio.create_task(self._renew_loop())
        try:
            yield self
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await asyncio.shield(self.release())

    async def _renew_loop(self) -> None:
        while True:
            await asyncio.sleep(self.ttl_ms / 3000)
            await self.renew()
