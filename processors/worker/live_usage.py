"""Live usage: each limit key's current windows, mirrored to Redis for the quota report.

Workers write ``{prefix}:usage:{limit_key}`` as one string, the key's windows encoded together
(`encode_live_usage`: a msgpack map of policy name to window state), coalescing changes and writing
them every ``live_flush_interval_s``; the entry expires one window (the longest of its policies) after
the last write. A limit key belongs to one worker partition, so one writer owns the whole entry. The
API decodes the windows with the same code the engine uses and evaluates them at the current time, so
a report never needs the worker's state.
"""

from __future__ import annotations

import itertools
import logging
from typing import cast

import msgspec
from redis.asyncio import Redis

from throttlex.processors import metrics
from throttlex.processors.core.policy import PolicySet
from throttlex.processors.core.state import KeyState, restored_window
from throttlex.processors.core.windows import Limiter

log = logging.getLogger(__name__)


def usage_key(prefix: str, limit_key: str) -> str:
    return f"{prefix}:usage:{limit_key}"


# One script call writes many keys: for each, its encoded windows and their expiry in ms (ARGV, two
# per key in KEYS order). Few arguments per key keep redis-py's command packing cheap.
_WRITE_WINDOWS = """
for i, key in ipairs(KEYS) do
  redis.call('SET', key, ARGV[2 * i], 'PX', ARGV[2 * i - 1])
end
"""

_encoder = msgspec.msgpack.Encoder()


def encode_live_usage(windows: dict[str, Limiter]) -> bytes:
    return _encoder.encode({name: window.to_state() for name, window in windows.items()})


def decode_live_usage(raw: bytes, policies: PolicySet) -> dict[str, Limiter]:
    """The windows of `encode_live_usage` whose policy still exists (one of another shape starts afresh)."""
    windows = {}
    for name, values in msgspec.msgpack.decode(raw, type=dict[str, list[int | float]]).items():
        policy = policies.by_name(name)
        if policy is not None:
            windows[policy.name] = restored_window(policy, values)
    return windows


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
            args: list[bytes | int] = []
            for limit_key, state in batch.items():
                if state.windows:
                    names.append(usage_key(self._prefix, limit_key))
                    args += (max(window.span_ms for window in state.windows.values()), encode_live_usage(state.windows))
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
    raw = cast(bytes | None, await redis.get(usage_key(prefix, limit_key)))
    return {} if raw is None else decode_live_usage(raw, policies)
