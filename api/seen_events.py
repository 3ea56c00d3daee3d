"""The event ids ``POST /v1/events`` has taken, kept in Redis, so that a batch sent again is counted once.

A caller whose request failed (a 503 while Kafka is away, a dropped connection) sends the same batch again,
and the first copy may still land later: each event id is therefore *claimed* before its event is sent.
Per event id, one Redis string ``{prefix}:ingested:{tenant}/{token name}/{event_id}``: a copy is one the same
token sends again for the same tenant, so no other token can claim an id first and have an event taken for
a copy:

- ``p`` (pending): an API process is sending it. Set with ``SET NX``, so of two requests carrying the id only
  one sends it; it lives as long as the producer may take to deliver (`pending_s`), so an id whose sender
  died is freed.
- ``s`` (stored): Kafka acknowledged it. Kept for the dedup window (`window_s`); a copy arriving within it is
  answered as accepted and not sent again.
- gone: never seen, the window has passed, or Kafka refused it for good (the claim is dropped so a retry
  sends it anew). An event whose delivery timed out may have been written (its acknowledgement lost): it is
  kept as stored, so it is never counted twice, at the risk of being lost.

A copy sent after the window is a new event as far as ingest can tell, and is counted again. The worker, the
sink and the rollups all read what Kafka holds, so an event sent once there is counted once everywhere.
The ids carry a TTL, so a Redis whose eviction policy evicts keys with one (``volatile-*``, ``allkeys-*``)
under memory pressure, or that restarts empty, forgets them early: give it the memory the window needs.
"""

from __future__ import annotations

import enum
import uuid

from redis.asyncio import Redis

PENDING, STORED = b"p", b"s"

EventKey = tuple[str, uuid.UUID]
"""``<tenant>/<token name>`` and the event id: what a copy is recognised by."""


class Seen(enum.Enum):
    NEW = "new"
    """Claimed by this request: send it."""
    STORED = "stored"
    """Stored by an earlier request within the window: accepted, not sent again."""
    PENDING = "pending"
    """Another request is still sending it: its fate is not known yet."""


class SeenEvents:
    def __init__(self, redis: Redis, prefix: str, *, window_s: float, pending_s: float) -> None:
        self._redis = redis
        self._prefix = prefix
        self._window_ms = int(window_s * 1000)
        self._pending_ms = int(pending_s * 1000)

    def _key(self, event: EventKey) -> str:
        return f"{self._prefix}:ingested:{event[0]}/{event[1].hex}"

    async def claim(self, event_ids: list[EventKey]) -> list[Seen]:
        """Claim each id not seen yet (one round trip); what each one is."""
        if not event_ids:
            return []
        async with self._redis.pipeline(transaction=False) as pipe:
            for event_id in event_ids:
                pipe.set(self._key(event_id), PENDING, nx=True, px=self._pending_ms)
                pipe.get(self._key(event_id))
            replies = await pipe.execute()
        return [Seen.NEW if claimed else Seen.STORED if held == STORED else Seen.PENDING
                for claimed, held in zip(replies[::2], replies[1::2], strict=True)]  # fmt: skip

    async def settle(self, stored: list[EventKey], refused: list[EventKey]) -> None:
        """Record what Kafka answered: stored ids are kept for the window, refused ones are freed."""
        if not stored and not refused:
            return
        async with self._redis.pipeline(transaction=False) as pipe:
            for event_id in stored:
                pipe.set(self._key(event_id), STORED, px=self._window_ms)
            for event_id in refused:
                pipe.delete(self._key(event_id))
            await pipe.execute()
