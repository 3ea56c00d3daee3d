"""The sink's rows hold exactly the events the contract accepts, with exactly their values, whichever way they
were built (the quick path for hyphenated ids, or the contract's own decoder for everything else)."""

import uuid
from typing import NamedTuple

import msgspec
import pytest

from throttlex.ingest.events import decode_valid, encode
from throttlex.processors.accounting.rows import EVENT_SCHEMA, event_rows
from tests.factories import make_event


class _Record(NamedTuple):
    offset: int
    value: bytes | None

    @property
    def appended_ms(self) -> int:
        """Kafka's append time of the record: made up, distinct from every event time here."""
        return 1_800_000_000_000 + 7 * self.offset


def _with_id(event_id: str) -> bytes:
    document = msgspec.json.decode(encode(make_event()))
    document["event_id"] = event_id
    return msgspec.json.encode(document)


def _expected(records: list[_Record], partition: int) -> list[dict[str, object]]:
    """What the contract makes of the records, one by one: the rows the sink must build."""
    rows = []
    for record in records:
        try:
            event = decode_valid(record.value or b"")
        except msgspec.DecodeError:
            continue
        values = [getattr(event, name) for name in event.__struct_fields__]
        values[0] = event.event_id.bytes
        rows.append(dict(zip(EVENT_SCHEMA.names, [*values, 1, partition, record.offset, record.appended_ms])))
    return rows


def _built(records: list[_Record], partition: int) -> list[dict[str, object]]:
    batch, offsets = event_rows([r.value for r in records], [r.offset for r in records], partition,
                                [r.appended_ms for r in records])  # fmt: skip
    rows = batch.to_pylist()
    assert [row["kafka_offset"] for row in rows] == offsets
    for row in rows:  # compared as milliseconds, as the contract holds them
        row["event_time_ms"] = round(row.pop("event_time").timestamp() * 1000)
        row["appended_at"] = round(row["appended_at"].timestamp() * 1000)
    return [{name: row[name if name != "event_time" else "event_time_ms"] for name in EVENT_SCHEMA.names} for row in rows]


def _valid(count: int) -> list[bytes]:
    return [
        encode(make_event(event_id=uuid.uuid4(), api_key_id=f"key-{n}", event_time_ms=1_790_000_000_000 + n, cost=n % 4,
                          route="/v1/ünïcode/\"q\"", edge_blocked=n % 2 == 0, plan="pro" if n % 3 else ""))
        for n in range(count)
    ]  # fmt: skip


def test_every_valid_event_becomes_its_row() -> None:
    records = [_Record(100 + n, value) for n, value in enumerate(_valid(50))]
    assert _built(records, 5) == _expected(records, 5)
    assert len(_built(records, 5)) == 50


@pytest.mark.parametrize(
    "odd",
    [
        _with_id("5F0C7A52-8D7E-4C39-9A57-3B8F0F0C2A11"),  # upper case: a UUID the contract accepts
        _with_id("5f0c7a528d7e4c399a573b8f0f0c2a11"),  # no hyphens: the contract accepts it too
        _with_id("5f0c7a52-8d7e-4c39-9a57-3b8f0f0c2a1g"),  # not hex
        _with_id("5f0c7a52-8d7e-4c39-9a57-3b8f0f0c 2a1"),  # a space, which bytes.fromhex would skip
        _with_id("5f0c7a528-d7e-4c39-9a57-3b8f0f0c2a11"),  # a hyphen out of place
        _with_id("5f0c7a52-8d7e-4c39-9a57-3b8f0f0c2a-1"),  # a hyphen among the digits
        _with_id("{5f0c7a52-8d7e-4c39-9a57-3b8f0f0c2a1}"),
        encode(make_event())[:-1] + b',"status":99}',  # a later duplicate key
        b"\x00 not json",
        b"",
        None,
    ],
)
def test_a_record_the_quick_path_does_not_take_is_judged_by_the_contract(odd: bytes | None) -> None:
    """One odd record among valid events: stored if and only if the contract accepts it, with its values, and the
    valid events around it are all stored."""
    values = _valid(6)
    records = [_Record(n, value) for n, value in enumerate([*values[:3], odd, *values[3:]])]
    built = _built(records, 0)
    assert built == _expected(records, 0)
    assert len(built) in (6, 7)
