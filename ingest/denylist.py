"""The edge denylist: a gateway-local cache of blocked limit keys, kept in sync from Redis.

A check (`EdgeDenylist.blocked`) is a dictionary lookup: no Redis call on the request path. The cache
is filled from a snapshot of the blocks in force (the ``{prefix}:block-index`` sorted set, then their
entries) and then follows the ``{prefix}:blocks`` channel. The subscription is made before the snapshot,
so no change published in between is missed. When the connection drops, the cache keeps its entries
(they still expire on time) and the client reconnects (to the new primary, after a Sentinel failover),
resubscribes and takes a fresh snapshot. A snapshot is also taken every ``resync_interval_s`` while
connected, so a change lost in a failover (published to a primary that died before its replicas had
it) lives no longer than that.

A request is checked against every kind of limit key in force: blocks carry their dimensions
(``api_key``, ``tenant``, ``ip``…), and the cache counts how many blocks of each kind it holds, so a
request builds only the keys that could be blocked — one lookup when only API keys are.

When Redis has been unreachable for longer than ``fail_after_s``, the configured ``fail_mode`` decides:
``open`` keeps enforcing the blocks already cached (they still expire on time) and admits the rest;
``closed`` refuses every request until the cache is synchronised again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from typing import Any, Literal, NoReturn, cast

import msgspec
from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from throttlex.ingest import denylist_entries, metrics
from throttlex.ingest.denylist_entries import Block, request_limit_key
from throttlex.ingest.redis_connection import connect_redis, refuse_cluster
from throttlex.ingest.clock import Clock, wall_clock_ms
from throttlex.ingest.tasks import cancel_and_wait

FailMode = Literal["open", "closed"]

log = logging.getLogger(__name__)

_SNAPSHOT_CHUNK = 500
_LISTEN_POLL_S = 0.25


def edge_redis(url: str, *, connect_timeout_s: float, timeout_s: float | None = None) -> Redis:
    """A Redis client for an edge cache: no retries of its own, so nothing waits behind a backoff;
    the cache's own loop reconnects every ``reconnect_delay_s`` and resynchronises."""
    return connect_redis(
        url, socket_connect_timeout=connect_timeout_s, socket_timeout=timeout_s, retry=Retry(NoBackoff(), 0)
    )


async def listen(pubsub: PubSub, silence_s: float, apply: Callable[[bytes], Awaitable[None] | None]) -> NoReturn:
    """Hand every message of ``pubsub``'s channel to ``apply``, and make sure the connection still
    delivers: after ``silence_s`` without a message, ping; no answer within ``silence_s`` more raises
    `ConnectionError`. A connection that stays open but delivers nothing is noticed within about twice
    ``silence_s``, instead of never."""
    heard, pinged = time.monotonic(), False
    while True:
        message = await pubsub.get_message(timeout=min(silence_s, _LISTEN_POLL_S))
        now = time.monotonic()
        if message is not None:
            heard, pinged = now, False
            if message["type"] == "message" and (applying := apply(message["data"])) is not None:
                await applying
        elif now - heard > silence_s:
            if pinged:
                raise ConnectionError(f"no answer on the pub/sub connection for {now - heard + silence_s:.1f} s")
            await pubsub.ping()
            heard, pinged = now, True


async def first_failure(*jobs: Coroutine[Any, Any, NoReturn]) -> NoReturn:
    """Run ``jobs`` together until one fails; cancel the others and raise its error."""
    tasks = [asyncio.create_task(job) for job in jobs]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        raise next(iter(done)).exception()  # type: ignore[misc]
    finally:
        for task in tasks:
            await cancel_and_wait(task)


_CALL_TIMEOUT_S = 2.0
"""Longest wait for one Redis call of the edge (a snapshot reads a few thousand blocks in milliseconds)."""


class EdgeDenylist:
    def __init__(
        self,
        redis_url: str,
        prefix: str,
        *,
        clock: Clock = wall_clock_ms,
        reconnect_delay_s: float = 0.5,
        fail_mode: FailMode = "open",
        fail_after_s: float = 5.0,
        silence_s: float = 1.0,
        resync_interval_s: float = 5.0,
    ) -> None:
        # Every call bounded: a read on a connection whose peer vanished (a dropped NAT entry) would otherwise
        # wait for TCP's own timeout, about 15 minutes. The pub/sub reads pass their own timeouts.
        self._redis = edge_redis(redis_url, connect_timeout_s=2.0, timeout_s=_CALL_TIMEOUT_S)
        self._resync_interval_s = resync_interval_s
        self._silence_s = silence_s
        """After this long without a message the channel is pinged; without an answer as long again, the
        connection counts as lost (an open connection that delivers nothing: a stopped Redis, a dropped
        NAT entry), and the cache is resynchronised from a new one."""
        self._prefix = prefix
        self._clock = clock
        self._reconnect_delay_s = reconnect_delay_s
        self._fail_mode = fail_mode
        self._fail_after_s = fail_after_s
        self._unsynced_since: float | None = time.monotonic()
        self._cache: dict[str, Block] = {}
        self._kinds: Counter[tuple[str, ...]] = Counter()  # blocks in the cache by dimensions
        self._synced = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._heard_during_snapshot: list[bytes] | None = None
        """Messages applied while a snapshot is read: applied again over it, since it may predate them."""

    async def start(self, *, ready_timeout_s: float = 5.0) -> None:
        """Start following Redis; wait up to ``ready_timeout_s`` for the first snapshot.

        If Redis does not answer in time the gateway still starts, with an empty cache, and the client
        keeps trying in the background. A Redis Cluster is refused (`RedisUrlError`).
        """
        with contextlib.suppress(RedisError, OSError, TimeoutError):
            async with asyncio.timeout(ready_timeout_s):
                await refuse_cluster(self._redis)
        self._task = asyncio.create_task(self._follow(), name="edge-denylist")
        try:
            await asyncio.wait_for(self._synced.wait(), ready_timeout_s)
        except TimeoutError:
            log.warning("edge denylist not synchronised yet; admitting until it is")

    async def stop(self) -> None:
        if self._task is not None:
            await cancel_and_wait(self._task)
        await self._redis.aclose()

    @property
    def synced(self) -> bool:
        return self._synced.is_set()

    @property
    def refusing(self) -> bool:
        """True in fail-closed mode once Redis has been unreachable longer than ``fail_after_s``."""
        since = self._unsynced_since
        return self._fail_mode == "closed" and since is not None and time.monotonic() - since > self._fail_after_s

    def check(self, values: Mapping[str, str], *, on_expired: Callable[[str], None] | None = None) -> Block | None:
        """The longest block in force for a request whose dimension values are ``values``, or None.

        An expired block found on the way is dropped from the cache; from another thread than the loop's
        (the WSGI middleware) pass ``on_expired``, which gets its key instead and must hand it to the loop
        (`forget_if_expired`): the cache is only ever changed on the loop."""
        found: Block | None = None
        for dims in list(self._kinds):
            block = self.blocked(request_limit_key(dims, values), on_expired=on_expired)
            if block is not None and (found is None or block.until_ms > found.until_ms):
                found = block
        return found

    def blocked(self, limit_key: str, *, on_expired: Callable[[str], None] | None = None) -> Block | None:
        """The block in force for ``limit_key`` now, or None (see `check` for ``on_expired``)."""
        block = self._cache.get(limit_key)
        if block is None:
            return None
        if block.until_ms <= self._clock():
            (on_expired or self._drop)(limit_key)
            return None
        return block

    def in_force(self) -> dict[str, Block]:
        """The blocks this edge enforces now, by limit key (for the gateway's status and for tests)."""
        now_ms = self._clock()
        return {key: block for key, block in self._cache.items() if block.until_ms > now_ms}

    def forget_if_expired(self, limit_key: str) -> None:
        """Drop ``limit_key``'s block if it has expired (a renewal may have replaced it meanwhile)."""
        block = self._cache.get(limit_key)
        if block is not None and block.until_ms <= self._clock():
            self._drop(limit_key)

    async def _follow(self) -> None:
        while True:
            try:
                async with self._redis.pubsub(ignore_subscribe_messages=True) as pubsub:
                    await pubsub.subscribe(denylist_entries.channel(self._prefix))
                    await self._snapshot()
                    self._synced.set()
                    self._unsynced_since = None
                    await first_failure(listen(pubsub, self._silence_s, self._apply), self._resync_every())
            except (RedisError, OSError) as exc:
                self._synced.clear()
                if self._unsynced_since is None:
                    self._unsynced_since = time.monotonic()
                metrics.EDGE_REDIS_ERRORS.labels(kind=type(exc).__name__).inc()
                log.warning("edge denylist lost Redis; reconnecting", extra={"error": str(exc)})
                await asyncio.sleep(self._reconnect_delay_s)

    async def _resync_every(self) -> NoReturn:
        while True:
            await asyncio.sleep(self._resync_interval_s)
            await self._snapshot()

    async def _snapshot(self) -> None:
        """Replace the cache with the blocks in force in Redis (the index, then their entries)."""
        self._heard_during_snapshot = []
        try:
            index = denylist_entries.block_index(self._prefix)
            limit_keys = cast(list[bytes], await self._redis.zrangebyscore(index, f"({self._clock()}", "+inf"))
            fresh: dict[str, Block] = {}
            for start in range(0, len(limit_keys), _SNAPSHOT_CHUNK):
                chunk = [denylist_entries.block_key(self._prefix, key.decode()) for key in limit_keys[start : start + _SNAPSHOT_CHUNK]]
                for raw in await self._redis.mget(chunk):
                    if raw is not None:  # ended or lifted since the index was read
                        block = denylist_entries.decode_block(raw)
                        fresh[block.limit_key] = block
        finally:
            heard, self._heard_during_snapshot = self._heard_during_snapshot, None
        self._cache = fresh
        self._kinds = Counter(block.dims for block in fresh.values())
        for raw in heard:
            self._apply(raw)
        metrics.EDGE_RESYNCS.inc()
        metrics.EDGE_CACHE_SIZE.set(len(self._cache))

    def _apply(self, raw: bytes) -> None:
        if self._heard_during_snapshot is not None:
            self._heard_during_snapshot.append(raw)
        try:
            block = denylist_entries.decode_block(raw)
        except msgspec.DecodeError as exc:
            metrics.EDGE_REDIS_ERRORS.labels(kind="bad_message").inc()
            log.warning("ignoring malformed denylist message", extra={"error": str(exc)})
            return
        now_ms = self._clock()
        if block.published_ms:
            metrics.EDGE_SYNC_LAG.observe(max(0, now_ms - block.published_ms) / 1000)
        if block.until_ms > now_ms:
            if block.limit_key not in self._cache:
                self._kinds[block.dims] += 1
            self._cache[block.limit_key] = block
            metrics.EDGE_CACHE_SIZE.set(len(self._cache))
        else:
            self._drop(block.limit_key)

    def _drop(self, limit_key: str) -> None:
        block = self._cache.pop(limit_key, None)
        if block is not None:
            self._kinds[block.dims] -= 1
            if not self._kinds[block.dims]:
                del self._kinds[block.dims]
        metrics.EDGE_CACHE_SIZE.set(len(self._cache))
