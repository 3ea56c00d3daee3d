import os
import random
import uuid
import warnings

import msgspec
import pytest

from throttlex.ingest.events import SCHEMA_VERSION, EventError, decode, encode, key_id_for, new_event_id
from tests.factories import make_event


def raw_with(**changes: object) -> bytes:
    document = msgspec.json.decode(encode(make_event()))
    document.update(changes)
    return msgspec.json.encode(document)


def test_round_trip_keeps_every_field() -> None:
    event = make_event(edge_blocked=True)
    assert decode(encode(event)) == event


def test_wire_format_carries_the_schema_version() -> None:
    assert msgspec.json.decode(encode(make_event()))["v"] == SCHEMA_VERSION
    assert make_event().schema_version == SCHEMA_VERSION


def test_cost_defaults_to_one() -> None:
    document = msgspec.json.decode(encode(make_event()))
    del document["cost"]
    assert decode(msgspec.json.encode(document)).cost == 1


@pytest.mark.parametrize(
    ("raw", "kind", "fragment"),
    [
        (b"{not json", "malformed", "malformed JSON"),
        (b"", "malformed", "malformed JSON"),
        (raw_with(v=99), "unknown_version", "unknown schema version 99"),
        (raw_with(cost=-1), "invalid", "$.cost"),
        (raw_with(status=42), "invalid", "$.status"),
        (raw_with(event_id="not-a-uuid"), "invalid", "$.event_id"),
        (raw_with(api_key_id=""), "invalid", "$.api_key_id"),
        (raw_with(route="x" * 5000), "invalid", "$.route"),
        (raw_with(event_time_ms=0), "invalid", "$.event_time_ms"),
        (raw_with(event_time_ms=7_258_118_400_000), "invalid", "$.event_time_ms"),  # 2200
        (raw_with(response_bytes=2**64), "invalid", "$.response_bytes"),  # more than the sink can store
    ],
)
def test_bad_events_are_rejected_with_a_reason(raw: bytes, kind: str, fragment: str) -> None:
    with pytest.raises(EventError) as caught:
        decode(raw)
    assert caught.value.kind == kind
    assert fragment in caught.value.reason


def test_missing_field_is_named() -> None:
    document = msgspec.json.decode(encode(make_event()))
    del document["tenant"]
    with pytest.raises(EventError, match="missing required field `tenant`"):
        decode(msgspec.json.encode(document))


def test_key_ids_are_stable_per_salt_and_hide_the_key() -> None:
    first = key_id_for("sk_live_secret", b"salt-one")
    assert first == key_id_for("sk_live_secret", b"salt-one")
    assert first != key_id_for("sk_live_secret", b"salt-two")
    assert first != key_id_for("sk_live_other", b"salt-one")
    assert "secret" not in first and len(first) == 24


def test_an_event_without_a_version_is_read_as_version_one() -> None:
    document = msgspec.json.decode(encode(make_event()))
    del document["v"]
    assert decode(msgspec.json.encode(document)) == make_event()


def test_event_ids_are_random_uuids_that_the_apps_own_random_seed_does_not_repeat() -> None:
    assert {(i.version, i.variant) for i in (new_event_id() for _ in range(1_000))} == {(4, uuid.RFC_4122)}
    random.seed(7)
    first = new_event_id()
    random.seed(7)  # an app seeding the shared generator, in this process or in the next one
    assert new_event_id() != first


def test_a_forked_process_draws_other_event_ids() -> None:
    read, write = os.pipe()
    with warnings.catch_warnings():  # Python 3.12+ warns about forking a process that has threads
        warnings.simplefilter("ignore", DeprecationWarning)
        child = os.fork()
    if child == 0:  # a pre-forking server's worker
        os.write(write, new_event_id().bytes)
        os._exit(0)
    try:
        os.waitpid(child, 0)
        assert os.read(read, 16) != new_event_id().bytes  # the child was seeded afresh, not a copy of this sequence
    finally:
        os.close(read)
        os.close(write)
