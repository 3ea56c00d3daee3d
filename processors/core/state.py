"""What a worker keeps per limit key, as live objects, and the one encoding it is written in.

A `KeyState` holds every window of one limit key (one per policy keyed on the key's dimensions), the
block last published for it, and how far the input it was built from reaches. Workers keep them in
memory per input partition and write a changed one to the partition's compacted changelog topic as
one record: the limit key as record key, `encode_key_state` as value.

``version`` is the offset (in the input partition) of the last record applied to the key, so a
stored state says exactly which records it includes: a record at or before it is skipped when the
input is read again. Regrouped keys receive their events from every events partition through the
regroup topic; for them ``sources`` holds, per events partition, the offset of the last event
applied, which makes a forward that arrives twice count once.
"""

from __future__ import annotations

from typing import Any

import msgspec

from throttlex.ingest.denylist_entries import Block
from throttlex.processors.core.policy import Policy, PolicySet
from throttlex.processors.core.windows import Limiter


class KeyState:
    __slots__ = ("windows", "published", "plan", "version", "sources")

    def __init__(
        self,
        windows: dict[str, Limiter] | None = None,
        published: Block | None = None,
        plan: str | None = None,
        version: int = -1,
        sources: dict[int, int] | None = None,
    ) -> None:
        self.windows: dict[str, Limiter] = {} if windows is None else windows
        self.published = published
        """The block in force for this key as last published (the longest wins), or None."""
        self.plan = plan
        """The plan of the calling key as last seen: the limits of plan-dependent policies come from it."""
        self.version = version
        self.sources = sources

    def __repr__(self) -> str:
        return f"KeyState(version={self.version}, windows={sorted(self.windows)}, published={self.published})"


class _Stored(msgspec.Struct, array_like=True, forbid_unknown_fields=False):
    version: int
    plan: str | None
    published: Block | None
    windows: dict[str, list[int | float]]
    sources: dict[int, int] | None = None


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(_Stored)


def encode_key_state(state: KeyState) -> bytes:
    windows = {name: window.to_state() for name, window in state.windows.items()}
    return _encoder.encode(_Stored(state.version, state.plan, state.published, windows, state.sources))  # type: ignore[arg-type]


def decode_key_state(raw: bytes, policies: PolicySet) -> KeyState:
    """Rebuild a stored key. Windows of policies that no longer exist are dropped; a window stored under
    another shape of its policy (the policy changed) starts afresh."""
    stored = _decoder.decode(raw)
    windows = {}
    for name, values in stored.windows.items():
        policy = policies.by_name(name)
        if policy is not None:
            windows[name] = restored_window(policy, values)
    return KeyState(windows, stored.published, stored.plan, stored.version, stored.sources)


def restored_window(policy: Policy, values: list[Any]) -> Limiter:
    window = policy.new_window()
    window.restore(values)
    return window
