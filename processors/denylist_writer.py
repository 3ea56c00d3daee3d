"""Publishes blocks to Redis: the TTL'd denylist entry and the change notice, in one transaction.

A block with ``until_ms == 0`` is a lift (its policy was removed or relaxed): the entry is deleted and
the notice tells edges to drop it.
"""

from __future__ import annotations

import logging

import msgspec
from redis.asyncio import Redis
from redis.exceptions import RedisError

from ingest import blocklist
from ingest.blocklist import Block
from ingest.clock import Clock, wall_clock_ms
from processors import metrics

log = logging.getLogger(__name__)


class DenylistWriter:
    """Writes each block as ``SET {prefix}:block:{key} PX ttl`` plus ``PUBLISH``, atomically.

    The TTL is the time from now until the block's ``until_ms``, so Redis drops the entry exactly when
    the policy admits again. A block that Redis refused (after the client's own retries) is kept and
    sent again by `retry_pending`; only the longest block per key is kept.
    """

    def __init__(self, redis: Redis, prefix: str, *, clock: Clock = wall_clock_ms) -> None:
        self._redis = redis
        self._prefix = prefix
        self._clock = clock
        self._pending: dict[str, Block] = {}

    async def lift(self, block: Block) -> bool:
        """Delete ``block``'s entry now and tell every edge, whatever its ``until_ms``."""
        return await self.publish(msgspec.structs.replace(block, until_ms=0))

    async def publish(self, block: Block) -> bool:
        now_ms = self._clock()
        ttl_ms = block.until_ms - now_ms
        if ttl_ms <= 0 and block.until_ms != 0:
            return True  # over already: Redis and the edges have let it go
        encoded = blocklist.encode_block(msgspec.structs.replace(block, published_ms=now_ms))
        key = blocklist.block_key(self._prefix, block.limit_key)
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                if block.until_ms == 0:
                    pipe.delete(key)
                else:
                    pipe.set(key, encoded, px=ttl_ms)
                pipe.publish(blocklist.channel(self._prefix), encoded)
                await pipe.execute()
        except (RedisError, OSError) as exc:
            metrics.REDIS_ERRORS.labels(kind=type(exc).__name__).inc()
            log.warning("denylist write failed; will retry", extra={"limit_key": block.limit_key, "error": str(exc)})
            current = self._pending.get(block.limit_key)
            if current is None or block.until_ms > current.until_ms or block.until_ms == 0:
                self._pending[block.limit_key] = block
            return False
        pending = self._pending.get(block.limit_key)
        if pending is not None and pending.until_ms == 0:  # a later write supersedes an unsent lift
            del self._pending[block.limit_key]
        return True

    async def retry_pending(self) -> None:
        pending, self._pending = self._pending, {}
        for block in pending.values():
            await self.publish(block)

    async def still_holds(self, marker: str, ttl_s: int) -> bool:
        """Whether Redis still has ``marker`` (its TTL renewed): False means Redis lost what this writer
        wrote (it restarted empty, or failed over to a replica behind it). True when unreachable."""
        try:
            return bool(await self._redis.expire(marker, ttl_s))
        except (RedisError, OSError):
            return True

    async def rewrite(self, blocks: list[Block], marker: str, ttl_s: int) -> bool:
        """Write ``blocks`` again, then set ``marker``; False if Redis failed (try again later)."""
        for block in blocks:
            if not await self.publish(block):
                return False
        try:
            await self._redis.set(marker, b"1", ex=ttl_s)
        except (RedisError, OSError):
            return False
        return True
