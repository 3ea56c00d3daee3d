from pathlib import Path

from throttlex.ingest.denylist_entries import Block, limit_key
from throttlex.ingest.events import UsageEvent
from throttlex.processors.core.engine import PolicyEngine
from throttlex.processors.core.state import KeyState, decode_key_state, encode_key_state
from throttlex.processors.core.policy import PolicySet, load_policies
from tests.factories import make_event

POLICIES = """
policies:
  - name: per-second
    key: [api_key]
    algorithm: {type: sliding_window, limit: 3, window_s: 1, bucket_s: 0.1}
  - name: per-minute
    key: [api_key]
    algorithm: {type: sliding_window, limit: 5, window_s: 60, bucket_s: 1}
  - name: watch-only
    shadow: true
    key: [api_key]
    algorithm: {type: sliding_window, limit: 2, window_s: 1, bucket_s: 0.1}
"""


def policies(tmp_path: Path, text: str = POLICIES) -> PolicySet:
    path = tmp_path / "policies.yaml"
    path.write_text(text)
    return load_policies(path)


KEY = limit_key([("api_key", "a1b2c3")])


def hit(t: int, **changes: object) -> UsageEvent:
    """A one-unit request at ``t`` ms."""
    return make_event(event_time_ms=t, cost=1, **changes)


def test_the_longest_block_wins_and_names_its_policy(tmp_path: Path) -> None:
    engine = PolicyEngine(policies(tmp_path), {})
    outcomes = [engine.apply(hit(t)) for t in (0, 100, 200)]
    # The third event fills per-second (3/s): blocked until the bucket [0, 100ms) leaves at 1.0s.
    assert outcomes[2].blocks == [Block(KEY, 1_000, "per-second")]
    outcomes += [engine.apply(hit(t)) for t in (1_000, 1_100)]
    # Five events fill per-minute: blocked until the first second's bucket leaves at 60s.
    assert outcomes[-1].blocks == [Block(KEY, 60_000, "per-minute")]


def test_a_shorter_block_does_not_replace_a_longer_one(tmp_path: Path) -> None:
    engine = PolicyEngine(policies(tmp_path), {})
    for t in (0, 100, 200, 1_000, 1_100):
        engine.apply(hit(t))
    # per-second blocks again (until 2.1s) but per-minute's block (60s) already covers it.
    later = [engine.apply(hit(t)).blocks for t in (1_150, 1_200)]
    assert later == [[], []]


def test_shadow_policies_report_but_never_block(tmp_path: Path) -> None:
    text = POLICIES.split("  - name: watch-only")[0].replace("limit: 3,", "limit: 30,").replace("limit: 5,", "limit: 50,")
    text += "  - name: watch-only\n    shadow: true\n    key: [api_key]\n    algorithm: {type: sliding_window, limit: 2, window_s: 1, bucket_s: 0.1}\n"
    engine = PolicyEngine(policies(tmp_path, text), {})
    outcomes = [engine.apply(hit(t)) for t in (0, 100)]
    assert outcomes[1].blocks == []
    assert outcomes[1].shadow_blocks == [Block(KEY, 1_000, "watch-only")]


def test_requests_refused_at_the_edge_are_not_counted(tmp_path: Path) -> None:
    state: dict[str, KeyState] = {}
    engine = PolicyEngine(policies(tmp_path), state)
    for t in (0, 100, 200, 300):
        outcome = engine.apply(hit(t, edge_blocked=True))
        assert outcome.blocks == [] and outcome.touched == {}
    assert state == {}


def test_state_survives_a_new_engine_and_its_encoding(tmp_path: Path) -> None:
    """Window state lives in the mapping (a worker partition's keys), not in the engine, and its
    changelog record restores it exactly."""
    state: dict[str, KeyState] = {}
    PolicyEngine(policies(tmp_path), state).apply(hit(0))
    PolicyEngine(policies(tmp_path), state).apply(hit(100))
    restored = {key: decode_key_state(encode_key_state(value), policies(tmp_path)) for key, value in state.items()}
    outcome = PolicyEngine(policies(tmp_path), restored).apply(hit(200))
    assert outcome.blocks == [Block(KEY, 1_000, "per-second")]


def test_late_events_are_reported(tmp_path: Path) -> None:
    engine = PolicyEngine(policies(tmp_path), {})
    engine.apply(hit(120_000))
    outcome = engine.apply(hit(1_000))
    assert outcome.late == 3  # too late for each of the three matching policies


def test_fixed_window_and_token_bucket_policies_block_and_keep_their_state(tmp_path: Path) -> None:
    text = """
policies:
  - name: hourly
    key: [api_key]
    algorithm: {type: fixed_window, limit: 4, window_s: 3600}
  - name: bucket
    key: [api_key]
    algorithm: {type: token_bucket, rate_per_s: 1, burst: 3}
"""
    state: dict[str, KeyState] = {}
    blocks = [PolicyEngine(policies(tmp_path, text), state).apply(hit(t)).blocks for t in (0, 0, 0, 500)]
    # Three at once empty the bucket (a token a second: one is back at 1 s); the fourth, at 0.5 s,
    # fills the hour (until 3600 s), which outlasts the bucket's block (until 2 s).
    assert blocks == [[], [], [Block(KEY, 1_000, "bucket")], [Block(KEY, 3_600_000, "hourly")]]


def test_policies_keyed_on_other_dimensions_are_regrouped_then_applied_by_their_key(tmp_path: Path) -> None:
    text = """
policies:
  - name: per-tenant-route
    key: [route, tenant]
    algorithm: {type: token_bucket, rate_per_s: 1, burst: 2}
  - name: per-ip
    key: [ip]
    algorithm: {type: sliding_window, limit: 100, window_s: 1}
  - name: per-key
    key: [api_key, method]
    algorithm: {type: sliding_window, limit: 100, window_s: 1}
"""
    engine = PolicyEngine(policies(tmp_path, text))
    event = hit(0, api_key_id="k1", tenant="acme", route="/v1/search", client_ip="10.0.0.1")
    local = engine.apply(event, (3, 41))  # only the policy keyed on api_key is applied where the event arrives
    assert list(local.touched) == ["api_key=k1|method=GET"]
    assert [(f.dims, f.limit_key, f.source_partition, f.source_offset) for f in local.forwards] == [
        (("tenant", "route"), "tenant=acme|route=/v1/search", 3, 41), (("ip",), "ip=10.0.0.1", 3, 41)
    ]
    # Two keys of one tenant share the tenant's bucket once regrouped by (tenant, route).
    engine.apply_forwarded(local.forwards[0])
    later = engine.apply(hit(10, api_key_id="k2", tenant="acme", route="/v1/search"), (0, 7))
    outcome = engine.apply_forwarded(later.forwards[0])
    assert outcome.blocks == [Block("tenant=acme|route=/v1/search", 1_000, "per-tenant-route", dims=("tenant", "route"))]


def test_an_event_read_again_counts_once_per_key(tmp_path: Path) -> None:
    """Input read again after a crash: a key whose state includes the offset skips it, per key; a
    forward carries its source offset, so one sent twice counts once."""
    text = """
policies:
  - name: per-key
    key: [api_key]
    algorithm: {type: fixed_window, limit: 100, window_s: 60}
  - name: per-tenant
    key: [tenant]
    algorithm: {type: fixed_window, limit: 100, window_s: 60}
  - name: per-ip
    key: [ip]
    algorithm: {type: fixed_window, limit: 100, window_s: 60}
"""
    engine = PolicyEngine(policies(tmp_path, text))
    events = [hit(t, tenant="acme", client_ip="10.0.0.1") for t in (0, 1, 2)]
    forwards = [f for n, e in enumerate(events) for f in engine.apply(e, (0, n)).forwards]
    replayed = [engine.apply(e, (0, n)) for n, e in enumerate(events)]  # read again from the start
    assert sum(o.repeated for o in replayed) == 3
    forwards += [f for o in replayed for f in o.forwards]
    for version, forward in enumerate(forwards):
        engine.apply_forwarded(forward, version)
    # Every key counted each event once, including the two regrouped keys of one event, which share
    # their source offset (they are separate keys, so neither is taken for a repeat of the other).
    used = {key: window.used_at(2) for key, state in engine.state.items() for window in state.windows.values()}
    assert used == {KEY: 3, "tenant=acme": 3, "ip=10.0.0.1": 3}


def test_a_quota_takes_its_limit_from_the_keys_plan(tmp_path: Path) -> None:
    text = """
policies:
  - name: daily
    key: [api_key]
    algorithm: {type: quota, period: day, time_zone: UTC}
plans:
  free: {monthly_units: 100, daily_units: 2}
  pro: {monthly_units: 1000, daily_units: 5}
  unmetered: {monthly_units: 1000}
default_plan: free
"""
    engine = PolicyEngine(policies(tmp_path, text), {})
    day = 86_400_000
    free = [engine.apply(hit(t, api_key_id="f")).blocks for t in (0, 1)]
    assert free == [[], [Block("api_key=f", day, "daily")]]  # the default plan: 2 a day
    pro = [engine.apply(hit(t, api_key_id="p", plan="pro")).blocks for t in range(5)]
    assert pro[:4] == [[], [], [], []] and pro[4] == [Block("api_key=p", day, "daily")]
    assert all(engine.apply(hit(t, api_key_id="u", plan="unmetered")).touched == {} for t in range(10))


def test_on_breach_min_block_route_costs_and_tenant_match(tmp_path: Path) -> None:
    text = """
policies:
  - name: search-is-dear
    match: {routes: ["/v1/search*"], tenants: [acme]}
    key: [api_key]
    route_costs: {"/v1/search/deep": 5}
    on_breach: {min_block_s: 30}
    algorithm: {type: sliding_window, limit: 6, window_s: 1, bucket_s: 0.1}
"""
    engine = PolicyEngine(policies(tmp_path, text), {})
    assert engine.apply(hit(0, route="/v1/search/deep", tenant="other")).touched == {}
    assert engine.apply(hit(0, route="/v1/search/deep")).blocks == []  # 5 units
    outcome = engine.apply(hit(200, route="/v1/search"))  # cost 1 from the event: 6 units
    assert outcome.blocks == [Block(KEY, 30_200, "search-is-dear")]  # the window admits at 1 s; 30 s minimum


def test_removing_a_policy_lifts_its_blocks_and_changing_one_recomputes_them(tmp_path: Path) -> None:
    state: dict[str, KeyState] = {}
    engine = PolicyEngine(policies(tmp_path), state)
    for t in (0, 100, 200, 1_000, 1_100):
        engine.apply(hit(t))  # blocked by per-minute until 60 s
    without_per_minute = POLICIES.replace("per-minute", "per-minute-renamed").replace("limit: 5,", "limit: 500,")
    changes = engine.replace_policies(policies(tmp_path, without_per_minute))
    # Only per-second still blocks: 3 units (0.2, 1.0, 1.1 s) until the 0.2 s bucket leaves at 1.2 s.
    assert changes == [Block(KEY, 1_200, "per-second")]
    engine.apply(hit(1_150))  # 4 units: blocked until 2.0 s
    assert engine.replace_policies(policies(tmp_path, without_per_minute.replace("limit: 3,", "limit: 2,"))) == [
        Block(KEY, 2_100, "per-second")  # recomputed under the new limit: the 1.0 s bucket must leave too
    ]
    changes = engine.replace_policies(policies(tmp_path, "policies:\n  - name: other\n    key: [ip]\n"
                                               "    algorithm: {type: fixed_window, limit: 9, window_s: 1}\n"))  # fmt: skip
    assert changes == [Block(KEY, 0, "per-second")]  # nothing blocks the key any more: lifted
    assert state[KEY].published is None and list(state[KEY].windows) == []


def test_idle_keys_are_those_no_decision_needs(tmp_path: Path) -> None:
    engine = PolicyEngine(policies(tmp_path))
    for t in (0, 100, 1_100):
        engine.apply(hit(t))
    engine.apply(hit(0, api_key_id="other"))
    assert engine.idle_keys(watermark_ms=1_500) == []
    # per-second and watch-only empty at 2.1 s, but per-minute holds KEY's last event until 61 s (then
    # 5 s of lateness); "other" had one event at 0: its windows empty at 60 s, idle at 65 s.
    assert engine.idle_keys(watermark_ms=7_100) == []
    assert engine.idle_keys(watermark_ms=65_000) == [limit_key([("api_key", "other")])]
    assert sorted(engine.idle_keys(watermark_ms=66_000)) == sorted(engine.state)


def test_a_key_with_a_block_in_force_is_not_idle(tmp_path: Path) -> None:
    engine = PolicyEngine(policies(tmp_path, POLICIES.replace("window_s: 60, bucket_s: 1}", "window_s: 60, bucket_s: 1}\n    on_breach: {min_block_s: 600}")))
    for t in (0, 100, 200, 300, 400):
        engine.apply(hit(t))
    published = engine.state[KEY].published
    assert published is not None and published.until_ms == 600_400
    assert engine.idle_keys(watermark_ms=600_000) == []
    assert engine.idle_keys(watermark_ms=600_400) == [KEY]


def test_blocks_read_back_under_changed_policies_are_lifted_shortened_or_kept(tmp_path: Path) -> None:
    """A state written under one policy set and read back under another (changed while no worker ran)."""
    engine = PolicyEngine(policies(tmp_path), {})
    for t in (0, 100, 200, 1_000, 1_100):
        engine.apply(hit(t))
    stored = encode_key_state(engine.state[KEY])
    assert engine.state[KEY].published == Block(KEY, 60_000, "per-minute")

    def settled(text: str) -> tuple[list[Block], Block | None]:
        restored = {KEY: decode_key_state(stored, policies(tmp_path, text))}
        blocks = PolicyEngine(policies(tmp_path, text), restored).settle_restored_blocks(now_ms=1_200)
        return blocks, restored[KEY].published

    assert settled(POLICIES) == ([Block(KEY, 60_000, "per-minute")], Block(KEY, 60_000, "per-minute"))
    removed = POLICIES.split("  - name: per-minute")[0]
    assert settled(removed) == ([Block(KEY, 0, "per-minute")], None)  # per-second admits again at 1.2 s
    raised = POLICIES.replace("limit: 5, window_s: 60", "limit: 50, window_s: 60")
    assert settled(raised) == ([Block(KEY, 0, "per-minute")], None)
    shorter = POLICIES.replace("limit: 3, window_s: 1,", "limit: 2, window_s: 1,").replace("limit: 5, window_s: 60", "limit: 50, window_s: 60")
    blocks, published = settled(shorter)
    assert blocks == [published] and published is not None and 1_200 < published.until_ms < 60_000
