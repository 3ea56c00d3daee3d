"""Live usage: each limit key's current windows, mirrored to Redis for the quota report.

Workers write ``{prefix}:usage:{limit_key}`` as a hash of policy name to encoded window, coalescing
changes and flushing them every ``live_flush_interval_s``; the entry expires one window after the
last event. The API decodes the windows with the same code the engine uses and evaluates them at the
current time, so a report never needs the worker's state.
"""

from __future__ import annotations

import logging
from typing import cast

from redis.asyncio import Redis
from redis.exceptions import RedisError

from processors import metrics
from processors.engine import Counted, decode_window, encode_window
from processors.policy import PolicySet
from processors.windows import Limiter

log = logging.getLogger(__name__)


def usage_key(prefix: str, limit_key: str) -> str:
    return f"{prefix}:usage:{limit_key}"


# One command per key instead of three (HSET, PEXPIRE GT, PEXPIRE NX): writes the windows and extends,
# never shortens, the expiry (a longer policy's window may have set a later one). ARGV: expiry in ms,
# then field/value pairs. A key without an expiry (PTTL -1) or a new key (-2) gets one.
_WRITE_WINDOWS = """
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[1]) then
  redis.call('PEXPIRE', KEYS[1], ARGV[1])
end
"""


class LiveUsageWriter:
    def __init__(self, redis: Redis, prefix: str) -> None:
        self._redis = redis
        self._prefix = prefix
        self._dirty: dict[tuple[str, str], Counted] = {}
        self._write_windows = redis.register_script(_WRITE_WINDOWS)

    def record(self, counted: list[Counted]) -> None:
        for item in counted:
            self._dirty[(item.policy.name, item.limit_key)] = item

    async def flush(self) -> None:
        if not self._dirty:
            return
        dirty, self._dirty = self._dirty, {}
        by_key: dict[str, list[Counted]] = {}
        for item in dirty.values():
            by_key.setdefault(item.limit_key, []).append(item)
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for limit_key, items in by_key.items():
                    expiry_ms = round(max(item.policy.algorithm.window_s for item in items) * 1000)
                    fields: list[str | bytes | int] = [expiry_ms]
                    for item in items:
                        fields += (item.policy.name, encode_window(item.window))
                    await self._write_windows(keys=[usage_key(self._prefix, limit_key)], args=fields, client=pipe)
                await pipe.execute()
        except (RedisError, OSError) as exc:
            metrics.REDIS_ERRORS.labels(kind=type(exc).__name__).inc()
            log.warning("live usage flush failed; will retry", extra={"error": str(exc)})
            dirty.update(self._dirty)
            self._dirty = dirty


async def read_live_usage(
    redis: Redis, prefix: str, limit_key: str, policies: PolicySet
) -> dict[str, Limiter]:
    """The stored window of every known policy for ``limit_key`` (policies with no traffic are absent)."""
    # ThrottleX's Redis clients never decode responses, so names and values are bytes.
    stored = cast(dict[bytes, bytes], await redis.hgetall(usage_key(prefix, limit_key)))
    windows = {}
    for name, raw in stored.items():
        policy = policies.by_name(name.decode())
        if policy is not None:
            windows[policy.name] = decode_window(raw, policy)
    return windows
