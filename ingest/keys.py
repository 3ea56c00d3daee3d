"""API keys as gateways see them: the key record, its Redis view, and the edge key cache.

A key is known only by its key id (`key_id_for`: a BLAKE2b hash keyed with the deployment's secret
salt); the plain key is shown once when it is created and stored nowhere (a gateway keeps the ids
of the keys it has just seen in memory, see `ingest.middleware`). The registry (a compacted
Kafka topic, see `processors.registry`) is the source of truth; Redis holds the view gateways read:

- ``{prefix}:apikey:{key_id}`` — the encoded `KeyRecord`;
- ``{prefix}:apikeys`` — a pub/sub channel carrying each changed record, and ``resync`` after the
  registry has rewritten the whole view (e.g. into a Redis that restarted empty).

`EdgeKeys` answers "may this key call?" from a local cache. A key seen before costs no Redis call;
an unknown key costs one, and is then remembered as unknown in a bounded cache, so a client
hammering with a bad key costs one call per ``unknown_ttl_s``. Changes arrive by pub/sub, so a
revoked key is refused within milliseconds of the revocation.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from typing import Literal

import msgspec
from cachetools import TTLCache
from redis.exceptions import RedisError

from throttlex.ingest import metrics
from throttlex.ingest.clock import Clock, wall_clock_ms
from throttlex.ingest.denylist import edge_redis, listen
from throttlex.ingest.tasks import cancel_and_wait

log = logging.getLogger(__name__)

KeyStatus = Literal["active", "suspended", "revoked"]
RESYNC = b"resync"
NAME_PATTERN = r"^[A-Za-z0-9_.:-]{1,64}$"
"""What a tenant or plan name may be."""


class KeyRecord(msgspec.Struct, frozen=True, kw_only=True):
    key_id: str
    tenant: str
    plan: str = ""
    """Empty: the deployment's default plan."""
    name: str = ""
    status: KeyStatus = "active"
    expires_at_ms: int = 0
    """0: never expires."""
    created_ms: int = 0
    hint: str = ""
    """The last four characters of the key, so an operator can tell keys apart."""
    version: int = 0
    """1 at creation, one more with each change that lands (0: written before records were versioned)."""
    writer: str = ""
    """A random id of the write that made this version: how a writer learns whether its change landed."""

    def supersedes(self, other: KeyRecord) -> bool:
        """Whether this record replaces ``other`` (of the same key) in a view: a revocation is final, and
        otherwise a view only moves to later versions, whatever order copies of the records arrive in."""
        if other.status == "revoked":
            return False
        return self.status == "revoked" or self.version >= other.version

    def admits(self, key_id: str, now_ms: int) -> bool:
        """Whether the caller whose key hashes to ``key_id`` may call at ``now_ms``. The record was
        found by that id; the final comparison takes the same time wherever two ids differ."""
        usable = self.status == "active" and (self.expires_at_ms == 0 or now_ms < self.expires_at_ms)
        return hmac.compare_digest(self.key_id, key_id) and usable


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(KeyRecord)


def encode_key(record: KeyRecord) -> bytes:
    return _encoder.encode(record)


def decode_key(raw: bytes | str) -> KeyRecord:
    return _decoder.decode(raw)


def key_view(prefix: str, key_id: str) -> str:
    return f"{prefix}:apikey:{key_id}"


def key_channel(prefix: str) -> str:
    return f"{prefix}:apikeys"


_LOOKUPS = metrics.KEY_LOOKUPS.counts


class KnownKeys(dict[str, KeyRecord]):
    """The key records an edge cache holds: a plain dictionary, so the request path's check is one
    ``dict.get``. Past ``size`` records, adding one forgets the one added longest ago; if that key calls
    again, its record is read from Redis once more."""

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError(f"the key cache must hold at least one record, not {size}")
        super().__init__()
        self._size = size

    def __setitem__(self, key_id: str, record: KeyRecord) -> None:
        if len(self) >= self._size and key_id not in self:
            del self[next(iter(self))]
        super().__setitem__(key_id, record)


class KeyLookupUnavailable(Exception):
    """Redis could not be asked about a key this cache has not seen."""


class EdgeKeys:
    def __init__(
        self,
        redis_url: str,
        prefix: str,
        *,
        clock: Clock = wall_clock_ms,
        known_size: int = 100_000,
        unknown_size: int = 10_000,
        unknown_ttl_s: float = 30.0,
        reconnect_delay_s: float = 0.5,
        silence_s: float = 1.0,
    ) -> None:
        self._redis = edge_redis(redis_url, connect_timeout_s=1.0, timeout_s=1.0)
        self._prefix = prefix
        self._clock = clock
        self._known = KnownKeys(known_size)
        self._unknown: TTLCache[str, bool] = TTLCache(unknown_size, unknown_ttl_s)
        self._reconnect_delay_s = reconnect_delay_s
        self._silence_s = silence_s
        """See `EdgeDenylist`: a connection silent this long is pinged, and dropped if it stays silent."""
        self._task: asyncio.Task[None] | None = None
        self.lookups = 0
        """Redis reads made for keys not in the cache (for tests and metrics)."""

    async def start(self) -> None:
        self._task = asyncio.create_task(self._follow(), name="edge-keys")

    async def stop(self) -> None:
        if self._task is not None:
            await cancel_and_wait(self._task)
        await self._redis.aclose()

    def cached(self, key_id: str, *, count: bool = True) -> KeyRecord | None:
        """The key's record if it is cached and may call now: the request path's check, no await. None
        otherwise; then `usable` decides (it may ask Redis). Callers on other threads than the loop's
        count the lookup themselves (``count=False``)."""
        record = self._known.get(key_id)
        if record is None or not record.admits(key_id, self._clock()):
            return None
        if count:
            _LOOKUPS["cache"] += 1
        return record

    async def usable(self, key_id: str) -> KeyRecord | None:
        """The key's record if it may call now; None for an unknown, suspended, revoked or expired key.

        Raises `KeyLookupUnavailable` when the key is not cached and Redis does not answer.
        """
        record = self._known.get(key_id)
        if record is None:
            if key_id in self._unknown:
                _LOOKUPS["unknown_cache"] += 1
                return None
            record = await self._fetch(key_id)
            if record is None:
                return None
        else:
            _LOOKUPS["cache"] += 1
        return record if record.admits(key_id, self._clock()) else None

    async def _fetch(self, key_id: str) -> KeyRecord | None:
        self.lookups += 1
        _LOOKUPS["redis"] += 1
        try:
            raw = await self._redis.get(key_view(self._prefix, key_id))
        except (RedisError, OSError) as exc:
            raise KeyLookupUnavailable(str(exc)) from None
        cached = self._known.get(key_id)  # a notice may have arrived while Redis answered: keep the later one
        if raw is None:
            if cached is None:
                self._unknown[key_id] = True
            return cached
        record = decode_key(raw)
        if cached is not None and not record.supersedes(cached):
            return cached
        self._known[key_id] = record
        return record

    async def _follow(self) -> None:
        while True:
            try:
                async with self._redis.pubsub(ignore_subscribe_messages=True) as pubsub:
                    await pubsub.subscribe(key_channel(self._prefix))
                    await self._refresh()  # changes missed while disconnected
                    await listen(pubsub, self._silence_s, self._apply)
            except (RedisError, OSError) as exc:
                log.warning("edge key cache lost Redis; reconnecting", extra={"error": str(exc)})
                await asyncio.sleep(self._reconnect_delay_s)

    async def _apply(self, raw: bytes) -> None:
        if raw == RESYNC:
            await self._refresh()
            return
        try:
            record = decode_key(raw)
        except msgspec.DecodeError:
            log.warning("ignoring malformed key message")
            return
        self._unknown.pop(record.key_id, None)
        cached = self._known.get(record.key_id)
        if cached is not None and not record.supersedes(cached):
            return  # an older copy, published late by a registry follower that was behind
        if cached is not None or record.status != "active":
            self._known[record.key_id] = record

    async def _refresh(self) -> None:
        """Forget unknown keys and re-read the cached ones. A cached key missing from Redis (a view
        not rewritten yet after a Redis restart) keeps its record until the registry's resync."""
        self._unknown.clear()
        ids = list(self._known.keys())
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            for key_id, raw in zip(chunk, await self._redis.mget([key_view(self._prefix, k) for k in chunk]), strict=True):
                if raw is None:
                    continue
                record, cached = decode_key(raw), self._known.get(key_id)
                if cached is None or record.supersedes(cached):
                    self._known[key_id] = record
