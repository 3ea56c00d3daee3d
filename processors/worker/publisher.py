"""Everything the worker writes to Redis, off the path that applies events.

The consumer loop hands blocks and changed keys to a `RedisPublisher` and carries on; the
publisher's own task writes them. Pending work is coalesced per limit key (the longest block, the
latest windows), so it is bounded by the number of keys, never by the event rate. A Redis that refuses
connections or stops answering (a stopped process, a full network buffer) only delays these writes:
consumption and decisions go on, and what is pending is written as soon as Redis answers again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import cast

from redis.asyncio import Redis
from redis.exceptions import RedisError

from throttlex.ingest.clock import wall_clock_ms
from throttlex.ingest import denylist_entries
from throttlex.ingest.denylist_entries import Block
from throttlex.ingest.tasks import cancel_and_wait
from throttlex.processors import metrics
from throttlex.processors.core.state import KeyState
from throttlex.processors.redis_client import redis_server_id
from throttlex.processors.worker.denylist_writer import DenylistWriter
from throttlex.processors.worker.live_usage import LiveUsageWriter

log = logging.getLogger(__name__)

_MAX_BACKOFF_S = 1.0
_MARKER_TTL_S = 600


class RedisPublisher:
    """Writes blocks (first) and live usage (every ``live_flush_interval_s``) from its own task.

    ``blocks_in_force`` gives every block the worker's current state holds. Whenever the Redis server answering
    is another one than before (it restarted, perhaps empty, or a Sentinel failover promoted a replica that had
    not received the last writes), or the denylist is gone (a marker key only this publisher writes, for a Redis
    emptied in place), they are all written again; and a block Redis still holds for a key the worker ``holds``
    with no block in force (a lift the old primary took with it) is lifted again.
    """

    def __init__(
        self,
        redis: Redis,
        prefix: str,
        marker: str,
        blocks_in_force: Callable[[], list[Block]],
        holds: Callable[[str], bool],
        *,
        live_flush_interval_s: float,
        max_pending_keys: int,
    ) -> None:
        self._redis = redis
        self._denylist = DenylistWriter(redis, prefix)
        self._live = LiveUsageWriter(redis, prefix, max_pending_keys)
        self._prefix = prefix
        self._marker = marker
        self._server: str | None = None  # the Redis server written to (its run id)
        self._blocks_in_force = blocks_in_force
        self._holds = holds
        self._interval_s = live_flush_interval_s
        self._blocks: dict[str, tuple[Block, int | None]] = {}
        """Limit key -> the block to write and the event time that caused it (None: not an event)."""
        self._active: dict[str, int] = {}  # limit key -> until_ms of the blocks written
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="redis-publisher")

    async def stop(self, timeout_s: float) -> None:
        """Write what is pending (for at most ``timeout_s``), then stop."""
        if self._task is None:
            return
        await cancel_and_wait(self._task)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await self._write()

    def block(self, block: Block, event_time_ms: int | None) -> None:
        """Queue a block (``until_ms == 0``: a lift); a longer one already queued for the key stays."""
        queued = self._blocks.get(block.limit_key)
        if queued is None or block.until_ms == 0 or queued[0].until_ms == 0 or block.until_ms > queued[0].until_ms:
            self._blocks[block.limit_key] = (block, event_time_ms)
        self._wake.set()

    def usage(self, touched: dict[str, KeyState]) -> None:
        self._live.record(touched)

    @property
    def pending_blocks(self) -> int:
        return len(self._blocks)

    async def _run(self) -> None:
        """Blocks as soon as they come; every ``live_flush_interval_s`` a round of live usage, written
        500 keys at a time with the blocks that came meanwhile before each part."""
        backoff_s = 0.05
        next_round = time.monotonic()
        live_left = False
        while True:
            if not live_left:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(max(0.0, next_round - time.monotonic())):
                        await self._wake.wait()
            self._wake.clear()
            try:
                await self._write_blocks()
                if not live_left and time.monotonic() >= next_round:
                    next_round = time.monotonic() + self._interval_s
                    await self._restore_denylist()
                    self._expire_active()
                    live_left = True
                if live_left:
                    live_left = await self._live.write_some()
            except (RedisError, OSError) as exc:
                metrics.REDIS_ERRORS.labels(kind=type(exc).__name__).inc()
                log.warning("redis write failed; will retry", extra={"error": str(exc), "retry_in_s": backoff_s})
                await asyncio.sleep(backoff_s)  # try again soon, a little later each time
                backoff_s = min(backoff_s * 2, _MAX_BACKOFF_S)
                self._wake.set()
                continue
            backoff_s = 0.05

    async def _write(self) -> None:
        """Everything pending, at once (on the way out)."""
        await self._write_blocks()
        await self._live.flush()

    async def _write_blocks(self) -> None:
        if not self._blocks:
            return
        pending, self._blocks = self._blocks, {}
        try:
            written = await self._denylist.publish([block for block, _ in pending.values()])
        except BaseException:
            for key, item in pending.items():  # keep them, unless a newer decision came meanwhile
                self._blocks.setdefault(key, item)
            raise
        now_s = time.time()
        for block, event_time_ms in pending.values():
            if block.until_ms == 0:
                self._active.pop(block.limit_key, None)
                continue
            self._active[block.limit_key] = block.until_ms
            if event_time_ms is not None:
                metrics.PROCESSING_SECONDS.observe(max(0.0, now_s - event_time_ms / 1000))
        metrics.ACTIVE_BLOCKS.set(len(self._active))
        log.info("blocks written", extra={"blocks": written})

    async def _restore_denylist(self) -> None:
        """If another Redis server answers than before (restarted, or failed over), or the denylist is gone, write
        every block still in force again, and lift again what Redis blocks for keys of this worker's with none in
        force; edges pick both up through pub/sub and their periodic resync."""
        server = await redis_server_id(self._redis)
        if server == self._server and await self._redis.expire(self._marker, _MARKER_TTL_S):
            return
        blocks = self._blocks_in_force()
        in_force = {block.limit_key for block in blocks}
        index = denylist_entries.block_index(self._prefix)
        indexed = cast(list[bytes], await self._redis.zrangebyscore(index, f"({wall_clock_ms()}", "+inf"))
        lifts = [Block(key, 0, "lifted") for key in (raw.decode() for raw in indexed) if key not in in_force and self._holds(key)]
        await self._denylist.publish(blocks + lifts)
        await self._redis.set(self._marker, b"1", ex=_MARKER_TTL_S)
        if self._server is not None:  # not the first check after start-up: what was written may be gone
            metrics.DENYLIST_RESTORES.inc()
            log.warning("another Redis server answers (restarted or failed over) or the denylist is gone; blocks in "
                        "force written again", extra={"blocks": len(blocks), "lifts": len(lifts)})  # fmt: skip
        self._server = server

    def _expire_active(self) -> None:
        now_ms = wall_clock_ms()
        self._active = {key: until for key, until in self._active.items() if until > now_ms}
        metrics.ACTIVE_BLOCKS.set(len(self._active))
