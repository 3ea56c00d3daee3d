"""What an ingest token may say in an event: its kind (gateway or upload) and its bounds, read from the
token's entry, applied to each event with the field named on a refusal."""

from __future__ import annotations

import pytest

from throttlex.api.credentials import parse_ingest
from throttlex.ingest.events import UsageEvent
from throttlex.api.ingest_scope import OTHER_ROUTE, Bounds, Refused, TokenScope, admit
from tests.factories import make_event

NOW_MS = 1_790_000_000_000
BOUNDS = Bounds(max_cost=1000, past_s=3600, future_s=60, routes=("/v1/items/{item_id}", "/v1/reports/*"))
UPLOAD = TokenScope()
GATEWAY = TokenScope(gateway=True)


def upload_event(**changes: object) -> UsageEvent:
    return make_event(**{"event_time_ms": NOW_MS, "client_ip": "", **changes})


def test_an_entry_without_options_is_an_upload_token_and_options_set_its_bounds() -> None:
    plain, edge = parse_ingest("eu:acme:s3cret:with:colons,edge-eu;gateway;max_cost=50;past=6h;future=90s:*:t2", "V")
    assert (plain.name, plain.token, plain.tenants, plain.scope) == ("eu", "s3cret:with:colons", frozenset({"acme"}), UPLOAD)
    assert (edge.name, edge.tenants, edge.scope) == ("edge-eu", None, TokenScope(True, 50, 6 * 3600.0, 90.0))


@pytest.mark.parametrize("option", ["gateway=yes", "max_cost=-1", "max_cost=1000001", "past=6w", "future=", "admin"])
def test_an_unknown_or_malformed_option_stops_start_up_with_its_entry(option: str) -> None:
    with pytest.raises(ValueError, match=rf"V entry 2: option '{option}' is not gateway"):
        parse_ingest(f"eu:acme:t1,us;{option}:acme:t2", "V")


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"cost": 1_000_000}, "cost"),
        ({"event_time_ms": NOW_MS - 2 * 365 * 86_400_000}, "event_time_ms"),  # two years back
        ({"event_time_ms": NOW_MS - 3_600_001}, "event_time_ms"),
        ({"event_time_ms": NOW_MS + 60_001}, "event_time_ms"),
        ({"client_ip": "203.0.113.7"}, "client_ip"),
        ({"edge_blocked": True}, "edge_blocked"),
        ({"plan": "enterprise"}, "plan"),
        ({"method": "BREW"}, "method"),
    ],
)
def test_an_upload_token_may_not_say_what_it_is_not_trusted_with(changes: dict[str, object], field: str) -> None:
    with pytest.raises(Refused, match=f"^{field}: "):
        admit(upload_event(**changes), UPLOAD, BOUNDS, NOW_MS, key_plan=None)


def test_the_bounds_hold_at_their_edges() -> None:
    for changes in ({"cost": 1000}, {"event_time_ms": NOW_MS - 3_600_000}, {"event_time_ms": NOW_MS + 60_000}):
        admit(upload_event(**changes), UPLOAD, BOUNDS, NOW_MS, key_plan=None)


def test_a_registered_keys_event_takes_the_keys_plan_whatever_it_claims() -> None:
    stored = admit(upload_event(plan="enterprise"), UPLOAD, BOUNDS, NOW_MS, key_plan="free")
    assert stored.plan == "free"


def test_a_gateway_token_sets_the_client_address_edge_refusals_and_plans_within_its_own_window() -> None:
    backlog = upload_event(client_ip="203.0.113.7", edge_blocked=True, plan="pro", event_time_ms=NOW_MS - 5 * 3600_000)
    with pytest.raises(Refused, match="^event_time_ms: more than 3600 s before now"):
        admit(backlog, GATEWAY, BOUNDS, NOW_MS, key_plan=None)
    flushing = TokenScope(gateway=True, past_s=6 * 3600)  # a gateway that holds a backlog through a Kafka outage
    assert admit(backlog, flushing, BOUNDS, NOW_MS, key_plan=None) == backlog
    with pytest.raises(Refused, match="^cost: 1000 is above this token's ceiling of 50"):
        admit(upload_event(cost=1000), TokenScope(max_cost=50), BOUNDS, NOW_MS, key_plan=None)


def test_an_uploads_unknown_route_is_counted_under_other_and_a_gateways_only_once_routes_are_listed() -> None:
    assert admit(upload_event(route="/v1/reports/monthly"), UPLOAD, BOUNDS, NOW_MS, None).route == "/v1/reports/monthly"
    assert admit(upload_event(route="/wp-admin/8841"), UPLOAD, BOUNDS, NOW_MS, None).route == OTHER_ROUTE
    assert admit(upload_event(route="/wp-admin/8841"), UPLOAD, Bounds(1000, 3600, 60), NOW_MS, None).route == OTHER_ROUTE
    assert admit(upload_event(route="/wp-admin/8841"), GATEWAY, BOUNDS, NOW_MS, None).route == OTHER_ROUTE
    assert admit(upload_event(route="/own/{template}"), GATEWAY, Bounds(1000, 3600, 60), NOW_MS, None).route == "/own/{template}"


def test_an_event_whose_delivery_timed_out_is_kept_as_stored_and_one_kafka_refused_is_freed() -> None:
    """A timed-out event may have been written (its acknowledgement lost): a copy must not be sent again."""
    from confluent_kafka import KafkaError, KafkaException

    from throttlex.api.event_ingest import _maybe_stored

    assert _maybe_stored(KafkaException(KafkaError(KafkaError._MSG_TIMED_OUT)))
    assert not _maybe_stored(KafkaException(KafkaError(KafkaError.MSG_SIZE_TOO_LARGE)))
    assert not _maybe_stored(BufferError("queue full"))
