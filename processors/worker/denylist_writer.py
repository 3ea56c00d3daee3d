"""Writes blocks to the denylist in Redis: the TTL'd entry and the change notice for edge caches.

A block with ``until_ms == 0`` is a lift (its policy was removed or relaxed): the entry is deleted and
the notice tells edges to drop it.
"""

from __future__ import annotations

import msgspec
from redis.asyncio import Redis

from throttlex.ingest import denylist_entries
from throttlex.ingest.clock import Clock, wall_clock_ms
from throttlex.ingest.denylist_entries import Block


class DenylistWriter:
    """Writes each block as ``SET {prefix}:block:{key} PX ttl`` and its index entry, followed by its ``PUBLISH``.

    The TTL is the time from now until the block's ``until_ms``, so Redis drops the entry exactly when
    the policy admits again; index entries of ended blocks are dropped by each write. Many blocks go in one pipelined round trip; Redis errors propagate (the
    caller keeps the blocks and tries again).
    """

    def __init__(self, redis: Redis, prefix: str, *, clock: Clock = wall_clock_ms) -> None:
        self._redis = redis
        self._prefix = prefix
        self._clock = clock

    async def publish(self, blocks: list[Block]) -> int:
        """Write ``blocks``; returns how many were still in force (ended ones need no entry)."""
        now_ms = self._clock()
        channel = denylist_entries.channel(self._prefix)
        index = denylist_entries.block_index(self._prefix)
        written = 0
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.zremrangebyscore(index, "-inf", now_ms)
            for block in blocks:
                ttl_ms = block.until_ms - now_ms
                if ttl_ms <= 0 and block.until_ms != 0:
                    continue  # over already: Redis and the edges have let it go
                encoded = denylist_entries.encode_block(msgspec.structs.replace(block, published_ms=now_ms))
                key = denylist_entries.block_key(self._prefix, block.limit_key)
                if block.until_ms == 0:
                    pipe.delete(key)
                    pipe.zrem(index, block.limit_key)
                else:
                    pipe.set(key, encoded, px=ttl_ms)
                    pipe.zadd(index, {block.limit_key: block.until_ms})
                pipe.publish(channel, encoded)
                written += 1
            if written:
                await pipe.execute()
        return written
