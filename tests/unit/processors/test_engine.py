from pathlib import Path

from ingest.blocklist import Block, limit_key
from ingest.events import UsageEvent
from processors.engine import PolicyEngine
from processors.policy import PolicySet, load_policies
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
    state: dict[str, bytes] = {}
    engine = PolicyEngine(policies(tmp_path), state)
    for t in (0, 100, 200, 300):
        outcome = engine.apply(hit(t, edge_blocked=True))
        assert outcome.blocks == [] and outcome.counted == []
    assert state == {}


def test_state_survives_a_new_engine(tmp_path: Path) -> None:
    """Window state lives in the mapping (a Faust table in the worker), not in the engine."""
    state: dict[str, bytes] = {}
    PolicyEngine(policies(tmp_path), state).apply(hit(0))
    PolicyEngine(policies(tmp_path), state).apply(hit(100))
    outcome = PolicyEngine(policies(tmp_path), state).apply(hit(200))
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
    state: dict[str, bytes] = {}
    blocks = [PolicyEngine(policies(tmp_path, text), state).apply(hit(t)).blocks for t in (0, 0, 0, 500)]
    # Three at once empty the bucket (a token a second: one is back at 1 s); the fourth, at 0.5 s,
    # fills the hour (until 3600 s), which outlasts the bucket's block (until 2 s).
    assert blocks == [[], [], [Block(KEY, 1_000, "bucket")], [Block(KEY, 3_600_000, "hourly")]]
