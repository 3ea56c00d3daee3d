"""The policy engine: applies every matching policy to one event and says which blocks to publish.

Pure: state is any ``MutableMapping[str, bytes]`` (a Faust table in the worker, a dict in tests) and
time is the event's own ``event_time_ms``, so results depend only on the events seen.

State entries:
- ``w/{policy}/{limit_key}`` — one policy's limiter state for one limit key (`encode_window`);
- ``d/{limit_key}`` — the denylist entry last published for that limit key, so that when several
  policies block one key, the block that lasts longest wins.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from dataclasses import dataclass, field

import msgspec

from ingest.blocklist import Block, decode_block, encode_block
from ingest.events import UsageEvent
from processors.policy import Policy, PolicySet
from processors.windows import Limiter


def encode_window(window: Limiter) -> bytes:
    """One key's state for one policy, as msgpack: a short list of numbers."""
    return msgspec.msgpack.encode(window.to_state())


def decode_window(raw: bytes, policy: Policy) -> Limiter:
    """Rebuild a policy's state; one stored under another algorithm or shape starts afresh."""
    window = policy.algorithm.new_window()
    window.restore(msgspec.msgpack.decode(raw))
    return window


@dataclass(frozen=True)
class Counted:
    """A window that changed: the policy, its limit key and the window after the event."""

    policy: Policy
    limit_key: str
    window: Limiter


@dataclass
class Outcome:
    blocks: list[Block] = field(default_factory=list)
    """Blocks to publish: new, or lasting longer than the one published before."""
    shadow_blocks: list[Block] = field(default_factory=list)
    """Blocks shadow policies would have published."""
    counted: list[Counted] = field(default_factory=list)
    late: int = 0
    """Matching policies for which the event arrived after its bucket left the window."""


class PolicyEngine:
    def __init__(self, policies: PolicySet, state: MutableMapping[str, bytes]) -> None:
        self.policies = policies
        self._state = state

    def apply(self, event: UsageEvent) -> Outcome:
        outcome = Outcome()
        if event.edge_blocked:  # refused at the edge: accounted, never counted against a window
            return outcome
        strongest: dict[str, Block] = {}
        for policy in self.policies.matching(event):
            key = policy.limit_key(event)
            window = self._window(policy, key)
            if not window.add(event.event_time_ms, event.cost):
                outcome.late += 1
                continue
            self._state[f"w/{policy.name}/{key}"] = encode_window(window)
            outcome.counted.append(Counted(policy, key, window))
            until = window.admits_at(policy.algorithm.limit)
            if until is None:
                continue
            block = Block(limit_key=key, until_ms=until, policy=policy.name)
            if policy.shadow:
                outcome.shadow_blocks.append(block)
            elif key not in strongest or until > strongest[key].until_ms:
                strongest[key] = block
        for key, block in strongest.items():
            published = self._state.get(f"d/{key}")
            if published is None or block.until_ms > decode_block(published).until_ms:
                self._state[f"d/{key}"] = encode_block(block)
                outcome.blocks.append(block)
        return outcome

    def _window(self, policy: Policy, key: str) -> Limiter:
        raw = self._state.get(f"w/{policy.name}/{key}")
        return policy.algorithm.new_window() if raw is None else decode_window(raw, policy)
