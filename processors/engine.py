"""The policy engine: applies every matching policy to one event and says which blocks to publish.

Pure: state is any ``MutableMapping[str, bytes]`` (a Faust table in the worker, a dict in tests) and
time is the event's own ``event_time_ms``, so results depend only on the events seen.

State entries:
- ``w/{policy}/{limit_key}`` — one policy's limiter state for one limit key (`encode_window`);
- ``d/{limit_key}`` — the denylist entry last published for that limit key and the key's plan, so
  that when several policies block one key the block that lasts longest wins, and a block can be
  recomputed when its policy changes.

Events arrive partitioned by API key, so policies keyed on ``api_key`` are applied where the event
arrives (``apply(event)``); for policies keyed on other dimensions the worker first regroups the
event by its limit key (`regroup`) and applies them there (``apply(event, dims)``).
"""

from __future__ import annotations

from collections.abc import MutableMapping
from dataclasses import dataclass, field

import msgspec

from ingest.blocklist import Block
from ingest.events import UsageEvent
from processors.policy import Policy, PolicySet
from processors.windows import Limiter


def encode_window(window: Limiter) -> bytes:
    """One key's state for one policy, as msgpack: a short list of numbers."""
    return msgspec.msgpack.encode(window.to_state())


def decode_window(raw: bytes, policy: Policy) -> Limiter:
    """Rebuild a policy's state; one stored under another algorithm or shape starts afresh."""
    window = policy.new_window()
    window.restore(msgspec.msgpack.decode(raw))
    return window


class Published(msgspec.Struct, array_like=True):
    """The ``d/`` entry: the block in force for a limit key and the plan its limits were taken from."""

    block: Block
    plan: str | None


_published = msgspec.msgpack.Decoder(Published)


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
    """Matching policies for which the event arrived later than their allowed lateness."""


class PolicyEngine:
    def __init__(self, policies: PolicySet, state: MutableMapping[str, bytes]) -> None:
        self.policies = policies
        self.state = state

    def apply(self, event: UsageEvent, dims: tuple[str, ...] | None = None) -> Outcome:
        """Apply the matching policies keyed on ``api_key`` (``dims`` None), or those keyed on exactly
        ``dims`` (an event regrouped by `regroup`)."""
        outcome = Outcome()
        if event.edge_blocked:  # refused at the edge: accounted, never counted against a window
            return outcome
        plan = self.policies.plan_of(event)
        strongest: dict[str, Block] = {}
        for policy in self.policies.matching(event):
            if (policy.key != dims) if dims is not None else not policy.partitioned_by_api_key:
                continue
            limit = self.policies.limit_of(policy, plan)
            if limit is None:  # e.g. a quota whose units the key's plan does not set
                continue
            key = policy.limit_key(event)
            window = self._window(policy, key)
            if not window.add(event.event_time_ms, policy.cost(event)):
                outcome.late += 1
                continue
            self.state[f"w/{policy.name}/{key}"] = encode_window(window)
            outcome.counted.append(Counted(policy, key, window))
            until = self._block_until(policy, window, limit, event.event_time_ms)
            if until is None:
                continue
            block = Block(limit_key=key, until_ms=until, policy=policy.name, dims=policy.key)
            if policy.shadow:
                outcome.shadow_blocks.append(block)
            elif key not in strongest or until > strongest[key].until_ms:
                strongest[key] = block
        for key, block in strongest.items():
            published = self._published(key)
            if published is None or block.until_ms > published.block.until_ms:
                self.state[f"d/{key}"] = msgspec.msgpack.encode(Published(block, plan))
                outcome.blocks.append(block)
        return outcome

    def regroup(self, event: UsageEvent) -> dict[tuple[str, ...], str]:
        """The dimension sets (and this event's limit key for each) of the matching policies that are
        not keyed on ``api_key``: the event must be applied again where those keys are partitioned."""
        if event.edge_blocked:
            return {}
        return {
            policy.key: policy.limit_key(event)
            for policy in self.policies.matching(event)
            if not policy.partitioned_by_api_key
        }

    def replace_policies(self, policies: PolicySet) -> list[Block]:
        """Switch to a new policy set. Blocks caused by a policy that was removed or changed are
        recomputed from the remaining windows of their key; the result (a block to publish, or an
        unblock with ``until_ms=0``) is returned for each such key."""
        old, self.policies = self.policies, policies
        changes = []
        for state_key in list(self.state.keys()):
            if not state_key.startswith("d/"):
                continue
            published = self._published(state_key[2:])
            if published is None or policies.by_name(published.block.policy) == old.by_name(published.block.policy):
                continue
            block = published.block
            replacement = self._recompute(block.limit_key, block.dims, published.plan)
            if replacement is None:
                del self.state[state_key]
                changes.append(msgspec.structs.replace(block, until_ms=0))
            else:
                self.state[state_key] = msgspec.msgpack.encode(Published(replacement, published.plan))
                changes.append(replacement)
        return changes

    def blocks_in_force(self, now_ms: int) -> list[Block]:
        """Every block published from this state that has not ended by ``now_ms``."""
        blocks = []
        for state_key in list(self.state.keys()):
            if state_key.startswith("d/"):
                published = self._published(state_key[2:])
                if published is not None and published.block.until_ms > now_ms:
                    blocks.append(published.block)
        return blocks

    def idle_keys(self, now_ms: int) -> list[str]:
        """State entries no decision needs any more: windows that are empty (and past their allowed
        lateness) or whose policy is gone, and denylist entries whose block has ended."""
        idle = []
        for state_key in list(self.state.keys()):
            if state_key.startswith("d/"):
                published = self._published(state_key[2:])
                if published is None or published.block.until_ms <= now_ms:
                    idle.append(state_key)
                continue
            if not state_key.startswith("w/"):
                continue  # not the engine's (the worker keeps its offset markers in the same table)
            name, _, limit_key = state_key[2:].partition("/")
            policy = self.policies.by_name(name)
            raw = self.state.get(state_key)
            if policy is None or raw is None:
                idle.append(state_key)
                continue
            empties_at = decode_window(raw, policy).empties_at()
            if empties_at is None or empties_at + policy.allowed_lateness_s * 1000 <= now_ms:
                idle.append(state_key)
        return idle

    def _recompute(self, limit_key: str, dims: tuple[str, ...], plan: str | None) -> Block | None:
        strongest: Block | None = None
        for policy in self.policies.policies:
            raw = self.state.get(f"w/{policy.name}/{limit_key}")
            limit = self.policies.limit_of(policy, plan)
            if policy.shadow or policy.key != dims or raw is None or limit is None:
                continue
            window = decode_window(raw, policy)
            until = self._block_until(policy, window, limit, window.newest_ms or 0)
            if until is not None and (strongest is None or until > strongest.until_ms):
                strongest = Block(limit_key=limit_key, until_ms=until, policy=policy.name, dims=dims)
        return strongest

    @staticmethod
    def _block_until(policy: Policy, window: Limiter, limit: int, breach_ms: int) -> int | None:
        until = window.admits_at(limit)
        if until is None:
            return None
        return max(until, breach_ms + round(policy.on_breach.min_block_s * 1000))

    def _published(self, limit_key: str) -> Published | None:
        raw = self.state.get(f"d/{limit_key}")
        return None if raw is None else _published.decode(raw)

    def _window(self, policy: Policy, key: str) -> Limiter:
        raw = self.state.get(f"w/{policy.name}/{key}")
        return policy.new_window() if raw is None else decode_window(raw, policy)
