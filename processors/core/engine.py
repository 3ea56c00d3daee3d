"""The policy engine: applies every matching policy to each event and says which blocks to publish.

Pure: no I/O and no clock. State is a plain ``dict`` of limit key to `KeyState` (one worker partition's
keys) and time is the instant each event counts at (given with it), so results depend only on the
events seen.

Events arrive partitioned by API key, so the policies keyed on ``api_key`` are applied where the
event arrives (`apply`). For the policies keyed on other dimensions `apply` returns one `Forward` per
dimension set: the worker sends it to the partition of that limit key, where `apply_forwarded`
applies exactly the policies keyed on those dimensions.

Applied once. Given where an event comes from (``origin``: events partition and offset), the engine
counts it at most once per limit key, whatever is read again after a crash or a rebalance: a key's
state remembers the last offset applied to it (per events partition, for regrouped keys).

Decisions are taken event by event, as if each event were the only one: a batch gives exactly the
blocks that its events one at a time would give.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import msgspec

from throttlex.ingest.denylist_entries import EVENT_FIELD, Block, event_limit_key
from throttlex.ingest.events import UsageEvent
from throttlex.processors.core.policy import Policy, PolicySet
from throttlex.processors.core.state import KeyState, restored_window
from throttlex.processors.core.windows import Limiter

MATCHES_REMEMBERED = 10_000
"""Route, method, tenant and plan combinations whose matching policies are remembered."""


class Forward(msgspec.Struct, array_like=True, frozen=True, gc=False):
    """An event on its way to the worker of one of its limit keys that is not keyed on ``api_key``:
    only what the policies keyed on ``dims`` need, and where the event came from."""

    dims: tuple[str, ...]
    limit_key: str
    route: str
    method: str
    tenant: str
    plan: str
    cost: int
    event_time_ms: int
    source_partition: int = -1
    """The events partition and offset of the event (-1: unknown, never deduplicated)."""
    source_offset: int = -1


@dataclass(frozen=True, slots=True)
class _Rule:
    """One policy as it applies to one combination of route, method, tenant and plan."""

    policy: Policy
    limit: int
    cost: int | None
    """The policy's route cost for this route, or None: the event's own cost."""
    min_block_ms: int
    name: str
    shadow: bool


@dataclass(frozen=True, slots=True)
class _Group:
    """The matching policies keyed on one set of dimensions (they share one limit key)."""

    dims: tuple[str, ...]
    rules: tuple[_Rule, ...]
    local: bool
    """Keyed on ``api_key``: applied where the event arrives, not forwarded."""
    attr: str | None
    """For one dimension, the event field holding its value (the key is ``dim=value``); else None."""
    prefix: str

    @classmethod
    def of(cls, dims: tuple[str, ...], rules: tuple[_Rule, ...]) -> _Group:
        attr = EVENT_FIELD[dims[0]] if len(dims) == 1 else None
        return cls(dims, rules, "api_key" in dims, attr, f"{dims[0]}=")



@dataclass(slots=True)
class Outcome:
    """What applying events changed, accumulated over a batch."""

    blocks: list[Block] = field(default_factory=list)
    """Blocks to publish: new, or lasting longer than the one published before for the key."""
    breaches: dict[str, int] = field(default_factory=dict)
    """Limit key -> event time of the event that caused its latest block in ``blocks``."""
    shadow_blocks: list[Block] = field(default_factory=list)
    """Blocks shadow policies would have published."""
    touched: dict[str, KeyState] = field(default_factory=dict)
    """Keys whose state changed (to be written to the changelog and to live usage)."""
    forwards: list[Forward] = field(default_factory=list)
    late: int = 0
    """Event/policy pairs that arrived later than the policy's allowed lateness."""
    repeated: int = 0
    """Event/key pairs skipped because the key's state already includes the event."""


class PolicyEngine:
    def __init__(self, policies: PolicySet, state: dict[str, KeyState] | None = None) -> None:
        self.policies = policies
        self.state: dict[str, KeyState] = {} if state is None else state
        self._groups: dict[tuple[str, str, str, str | None], tuple[_Group, ...]] = {}
        self._regrouped: dict[tuple[str, str, str, str | None, tuple[str, ...]], _Group | None] = {}

    def apply(
        self, event: UsageEvent, origin: tuple[int, int] | None = None, into: Outcome | None = None, *, at_ms: int | None = None
    ) -> Outcome:
        """Apply the matching policies keyed on ``api_key``; forward the event for the others.

        ``origin`` is the event's events partition and offset; with it, a key whose state already
        includes that offset is left as it is. Forwards are made either way. ``at_ms`` is the instant the
        event counts at (the worker's enforcement time, see `processors.worker.timing`); by default its
        own ``event_time_ms``."""
        outcome = Outcome() if into is None else into
        if event.edge_blocked:  # refused at the edge: accounted, never counted against a window
            return outcome
        plan = event.plan or self.policies.default_plan
        source_partition, source_offset = (-1, -1) if origin is None else origin
        t = event.event_time_ms if at_ms is None else at_ms
        groups = self._groups.get((event.route, event.method, event.tenant, plan))
        if groups is None:
            groups = self._matching(event.route, event.method, event.tenant, plan)
        for group in groups:
            attr = group.attr
            key = group.prefix + getattr(event, attr) if attr is not None else event_limit_key(group.dims, event)
            if group.local:
                state = self.state.get(key)
                if state is None:
                    state = self.state[key] = KeyState()
                elif source_offset >= 0 and state.version >= source_offset:
                    outcome.repeated += 1
                    continue
                state.version = source_offset
                self._count(key, state, group, t, event.cost, plan, outcome)
            else:
                outcome.forwards.append(Forward(group.dims, key, event.route, event.method, event.tenant, event.plan,
                                                event.cost, t, source_partition, source_offset))  # fmt: skip
        return outcome

    def apply_forwarded(self, forward: Forward, version: int = -1, into: Outcome | None = None) -> Outcome:
        """Apply the policies keyed on ``forward.dims`` that match it; ``version`` is the offset of the
        regroup record that carried it."""
        outcome = Outcome() if into is None else into
        plan = forward.plan or self.policies.default_plan
        combination = (forward.route, forward.method, forward.tenant, plan, forward.dims)
        try:
            group = self._regrouped[combination]
        except KeyError:
            matching = self._matching(forward.route, forward.method, forward.tenant, plan)
            group = self._regrouped[combination] = next((g for g in matching if g.dims == forward.dims), None)
            if len(self._regrouped) > MATCHES_REMEMBERED:
                self._regrouped.clear()
        if group is None:
            return outcome
        key = forward.limit_key
        state = self.state.get(key)
        if state is None:
            sources: dict[int, int] = {}
            state = self.state[key] = KeyState(sources=sources)
        elif state.sources is None:
            sources = state.sources = {}
        else:
            sources = state.sources
        offset = forward.source_offset
        if offset >= 0:
            partition = forward.source_partition
            if sources.get(partition, -1) >= offset:
                outcome.repeated += 1
                return outcome
            sources[partition] = offset
        if version > state.version:
            state.version = version
        self._count(key, state, group, forward.event_time_ms, forward.cost, plan, outcome)
        return outcome

    def _count(
        self, key: str, state: KeyState, group: _Group, t: int, cost: int, plan: str | None, outcome: Outcome
    ) -> None:
        state.plan = plan
        outcome.touched[key] = state
        windows = state.windows
        strongest: Block | None = None
        for rule in group.rules:
            name = rule.name
            window = windows.get(name)
            if window is None:
                window = windows[name] = rule.policy.new_window()
            if not window.add(t, cost if rule.cost is None else rule.cost):
                outcome.late += 1
                continue
            until = window.admits_at(rule.limit)
            if until is None:
                continue
            if rule.min_block_ms:
                until = max(until, t + rule.min_block_ms)
            if rule.shadow:
                outcome.shadow_blocks.append(Block(key, until, rule.name, dims=group.dims))
            elif strongest is None or until > strongest.until_ms:
                strongest = Block(key, until, rule.name, dims=group.dims)
        if strongest is not None and (state.published is None or strongest.until_ms > state.published.until_ms):
            state.published = strongest
            outcome.blocks.append(strongest)
            outcome.breaches[key] = t

    def replace_policies(self, policies: PolicySet) -> list[Block]:
        """Switch to a new policy set. Windows of removed policies are dropped, those of changed ones
        rebuilt under the new shape; blocks caused by a policy that was removed or changed are
        recomputed from the key's remaining windows. Returns, for each such key, the block to publish
        or an unblock (``until_ms=0``)."""
        old, self.policies = self.policies, policies
        self._groups.clear()
        self._regrouped.clear()
        changes = []
        for key, state in self.state.items():
            for name, window in list(state.windows.items()):
                policy = policies.by_name(name)
                if policy is None:
                    del state.windows[name]
                elif policy != old.by_name(name):
                    state.windows[name] = restored_window(policy, window.to_state())
            published = state.published
            if published is None or policies.by_name(published.policy) == old.by_name(published.policy):
                continue
            replacement = self._recompute(key, published.dims, state)
            state.published = replacement
            changes.append(msgspec.structs.replace(published, until_ms=0) if replacement is None else replacement)
        return changes

    def settle_restored_blocks(self, now_ms: int) -> list[Block]:
        """For a state just read back, which may have been written under other policies (changed while no
        worker ran): every block in force checked against the policies now in force. Returns what to
        publish: a block that still holds as it is, a shorter one where a policy was relaxed, an unblock
        (``until_ms=0``) where none holds any more (its policy removed, or its limit no longer reached).

        A block that still holds is recomputed as long or longer (windows only gain events), so a shorter
        answer means a policy says less now."""
        publish = []
        for key, state in self.state.items():
            published = state.published
            if published is None or published.until_ms <= now_ms:
                continue
            replacement = self._recompute(key, published.dims, state)
            if replacement is None or replacement.until_ms <= now_ms:
                state.published = None
                publish.append(msgspec.structs.replace(published, until_ms=0))
            elif replacement.until_ms < published.until_ms:
                state.published = replacement
                publish.append(replacement)
            else:
                publish.append(published)
        return publish

    def blocks_in_force(self, now_ms: int) -> list[Block]:
        """Every block published from this state that has not ended by ``now_ms``."""
        return [s.published for s in self.state.values() if s.published is not None and s.published.until_ms > now_ms]

    def idle_keys(self, watermark_ms: int) -> list[str]:
        """Keys no decision needs any more at event time ``watermark_ms``: every window empty and past
        its allowed lateness (or its policy gone), and no block in force."""
        idle = []
        for key, state in self.state.items():
            if state.published is not None and state.published.until_ms > watermark_ms:
                continue
            if all(self._window_idle(name, window, watermark_ms) for name, window in state.windows.items()):
                idle.append(key)
        return idle

    def _window_idle(self, name: str, window: Limiter, watermark_ms: int) -> bool:
        policy = self.policies.by_name(name)
        if policy is None:
            return True
        empties_at = window.empties_at()
        return empties_at is None or empties_at + policy.allowed_lateness_s * 1000 <= watermark_ms

    def _recompute(self, key: str, dims: tuple[str, ...], state: KeyState) -> Block | None:
        strongest: Block | None = None
        for policy in self.policies.policies:
            window = state.windows.get(policy.name)
            limit = self.policies.limit_of(policy, state.plan)
            if policy.shadow or policy.key != dims or window is None or limit is None:
                continue
            until = window.admits_at(limit)
            if until is None:
                continue
            until = max(until, (window.newest_ms or 0) + round(policy.on_breach.min_block_s * 1000))
            if strongest is None or until > strongest.until_ms:
                strongest = Block(key, until, policy.name, dims=dims)
        return strongest

    def _matching(self, route: str, method: str, tenant: str, plan: str | None) -> tuple[_Group, ...]:
        combination = (route, method, tenant, plan)
        groups = self._groups.get(combination)
        if groups is None:
            if len(self._groups) >= MATCHES_REMEMBERED:
                self._groups.clear()
            groups = self._groups[combination] = self._group(route, method, tenant, plan)
        return groups

    def _group(self, route: str, method: str, tenant: str, plan: str | None) -> tuple[_Group, ...]:
        by_dims: dict[tuple[str, ...], list[_Rule]] = {}
        for policy in self.policies.policies:
            if not policy.match.applies_to(route, method, tenant, plan):
                continue
            limit = self.policies.limit_of(policy, plan)
            if limit is None:  # e.g. a quota whose units the key's plan does not set
                continue
            min_block_ms = round(policy.on_breach.min_block_s * 1000)
            rule = _Rule(policy, limit, policy.route_cost(route), min_block_ms, policy.name, policy.shadow)
            by_dims.setdefault(policy.key, []).append(rule)
        return tuple(_Group.of(dims, tuple(rules)) for dims, rules in by_dims.items())
