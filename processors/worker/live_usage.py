"""Live usage: each limit key's current windows, mirrored to Redis for the quota report.

Workers write ``{prefix}:usage:{limit_key}`` as a hash of policy name to encoded window
(`encode_window`), coalescing changes and writing them every ``live_flush_interval_s``; the entry
expires one window after the last write. The API decodes the windows with the same code the engine
uses and evaluates them at the current time, so a report never needs the worker's state.
"""

from __future__ import annotations

import itertools
import logging
from typing import cast

from redis.asyncio import Redis

from processors import metrics
from processors.core.policy import PolicySet
from processors.core.state import KeyState, decode_window, encode_window
from processors.core.windows import Limiter

log = logging.getLogger(__name__)


def usage_key(prefix: str, limit_key: str) -> str:
    return f"{prefix}:usage:{limit_key}"


# One script call writes many keys: for each, its windows, and an expiry that is extended, never
# shortened (a longer policy's window may have set a later one); a key without an expiry (PTTL -1) or a
# new key (-2) gets one. ARGV, per key in KEYS order: expiry in ms, the number of windows, then
# name/value pairs.
_WRITE_WINDOWS = """
local at = 1
for i, key in ipairs(KEYS) do
  local expiry, count = tonumber(ARGV[at]), tonumber(ARGV[at + 1])
  redis.call('HSET', key, unpack(ARGV, at + 2, at + 1 + 2 * count))
  if redis.call('PTTL', key) < expiry then
    redis.call('PEXPIRE', key, expiry)
  end
  at = at + 2 + 2 * count
end
"""

_KEYS_PER_CALL = 500

class LiveUsageWriter:
    """Keeps the keys changed since the last write (at most ``max_pending_keys``; past that the
    oldest are dropped and counted: their next change writes them again)."""

    def __init__(self, redis: Redis, prefix: str, max_pending_keys: int) -> None:
        self._redis = redis
        self._prefix = prefix
        self._max_pending = max_pending_keys
        self._dirty: dict[str, KeyState] = {}
        self._write_windows = redis.register_script(_WRITE_WINDOWS)

    def record(self, touched: dict[str, KeyState]) -> None:
        self._dirty.update(touched)
        excess = len(self._dirty) - self._max_pending
        if excess > 0:
            for key in list(self._dirty)[:excess]:
                del self._dirty[key]
            metrics.LIVE_USAGE_DROPPED.inc(excess)

    async def flush(self) -> None:
        """Write every pending key; on a Redis error the unwritten ones stay pending and it propagates."""
        while await self.write_some():
            pass

    async def write_some(self) -> bool:
        """Write up to 500 pending keys in one call; whether more are pending."""
        if self._dirty:
            batch = {key: self._dirty.pop(key) for key in list(itertools.islice(self._dirty, _KEYS_PER_CALL))}
            names: list[str] = []
            args: list[str | bytes | int] = []
            for limit_key, state in batch.items():
                if state.windows:
                    names.append(usage_key(self._prefix, limit_key))
                    args += (max(window.span_ms for window in state.windows.values()), len(state.windows))
                    for name, window in state.windows.items():
                        args += (name, encode_window(window))
            try:
                if names:
                    await self._write_windows(keys=names, args=args)
            except BaseException:
                for limit_key, state in batch.items():  # not written: pending again, unless changed meanwhile
                    self._dirty.setdefault(limit_key, state)
                raise
        return bool(self._dirty)


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
