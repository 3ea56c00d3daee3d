"""Usage events as ``usage_events`` rows: Kafka records, validated, turned into Arrow columns.

The sink validates every event with the contract's own decoder (msgspec, as the worker does) and hands
ClickHouse the values as an Arrow stream: typed columns it takes almost as they are. ClickHouse parsing
JSON rows itself cost 4-7 CPU-µs per row here, the Arrow stream about 1 (``make bench-sink`` measures
both, see `BENCHMARKS.md`), and the columns are built from values already checked, so a row ClickHouse
would read differently from the contract cannot reach it.

Decoding is the sink's largest cost, so the usual path builds as little as it can (`event_rows`): the ids stay
text until a whole read's are checked and converted at once, and the values are transposed into columns in one
step. Anything that path does not take is decoded with the contract's decoder record by record.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

import msgspec
import pyarrow as pa
from msgspec.structs import astuple

from throttlex.ingest.events import SCHEMA_VERSION, UsageEvent, decode_valid

EVENT_SCHEMA = pa.schema([
    ("event_id", pa.binary(16)),  # a UUID's 16 bytes, big-endian: ClickHouse reads them into its UUID column
    ("event_time", pa.timestamp("ms", tz="UTC")),
    ("api_key_id", pa.string()),
    ("tenant", pa.string()),
    ("route", pa.string()),
    ("method", pa.string()),
    ("status", pa.uint16()),
    ("latency_ms", pa.float32()),
    ("response_bytes", pa.uint64()),
    ("cost", pa.uint32()),
    ("client_ip", pa.string()),
    ("edge_blocked", pa.bool_()),
    ("plan", pa.string()),
    ("source", pa.string()),
    ("stage", pa.string()),
    ("schema_version", pa.uint8()),
    ("kafka_partition", pa.uint16()),
    ("kafka_offset", pa.uint64()),
    ("appended_at", pa.timestamp("ms", tz="UTC")),  # when Kafka appended the record (the brokers' clock)
])  # fmt: skip
"""The columns the sink inserts, named as in ``usage_events``; the first 15 are `UsageEvent`'s fields in order."""

class _Row(UsageEvent, tag=SCHEMA_VERSION, frozen=True, kw_only=True, gc=False):
    """`UsageEvent` with its id kept as the text it came as: the contract's constraints on every other field,
    without building a `uuid.UUID` per event (half of what decoding cost). The ids are checked together
    afterwards (`_ids_of_texts`)."""

    event_id: Annotated[str, msgspec.Meta(min_length=36, max_length=36)]  # type: ignore[assignment]


_decode_row = msgspec.json.Decoder(_Row).decode
_TYPES = [field.type for field in EVENT_SCHEMA][1:15]
"""The Arrow type of each column after ``event_id``, in `UsageEvent`'s field order."""
assert UsageEvent.__struct_fields__ == _Row.__struct_fields__ == (
    "event_id", "event_time_ms", *EVENT_SCHEMA.names[2:15]
), "UsageEvent's fields changed: update EVENT_SCHEMA"  # fmt: skip


def event_rows(
    values: Sequence[bytes | None], offsets: Sequence[int], partition: int, appended_ms: Sequence[int] | None = None
) -> tuple[pa.RecordBatch, list[int]]:
    """The valid events among the records ``values`` at ``offsets`` (all of one partition) as rows, and their offsets.
    ``appended_ms`` are the records' timestamps (Kafka's append time); without them, each row's own event time.

    Records that are not valid events are left out: the worker dead-letters them, the sink never stores them.
    When every record is an event with a hyphenated id (all the gateways write), the rows come from `_Row`s;
    otherwise each record is decoded with the contract's own decoder, so what is stored is always exactly what
    the contract accepts.
    """
    try:
        rows = list(map(_decode_row, values))  # type: ignore[arg-type]
        columns = _columns(rows)
        ids = _ids_of_texts(columns[0])
        row_offsets = list(offsets)
        row_appended = columns[1] if appended_ms is None else appended_ms
    except (msgspec.DecodeError, TypeError, ValueError):  # one is not an event (TypeError: a record without a value)
        events, row_offsets, row_appended = [], [], []
        for n, (value, offset) in enumerate(zip(values, offsets)):
            try:
                event = decode_valid(value or b"")
            except msgspec.DecodeError:
                continue
            events.append(event)
            row_offsets.append(offset)
            row_appended.append(event.event_time_ms if appended_ms is None else appended_ms[n])
        columns = _columns(events)
        ids = b"".join([event.event_id.bytes for event in events])
    count = len(row_offsets)
    arrays = [pa.FixedSizeBinaryArray.from_buffers(pa.binary(16), count, [None, pa.py_buffer(ids)])]
    arrays += [pa.array(column, type) for column, type in zip(columns[1:], _TYPES)]
    arrays += [
        pa.array([SCHEMA_VERSION] * count, pa.uint8()),
        pa.array([partition] * count, pa.uint16()),
        pa.array(row_offsets, pa.uint64()),
        pa.array(row_appended, pa.timestamp("ms", tz="UTC")),
    ]
    return pa.RecordBatch.from_arrays(arrays, schema=EVENT_SCHEMA), row_offsets


def _columns(events: Sequence[UsageEvent | _Row]) -> list[tuple[object, ...]]:
    """The events' values column by column, transposed in one step: tuples of scalars only, which the garbage
    collector does not track."""
    if not events:
        return [()] * len(_Row.__struct_fields__)
    return list(zip(*map(astuple, events)))


def _ids_of_texts(texts: Sequence[object]) -> bytes:
    """Hyphenated UUIDs (36 characters each, as `_Row` checked) as their 16 bytes each, one after the other;
    ValueError if any is not one."""
    joined = "".join(texts)  # type: ignore[arg-type]
    if any(joined[at::36].strip("-") for at in (8, 13, 18, 23)):
        raise ValueError("an event id is not a hyphenated UUID")
    ids = bytes.fromhex(joined.replace("-", ""))  # ValueError for what is not hex digits
    if len(ids) != 16 * len(texts):  # a hyphen elsewhere, or whitespace, which fromhex skips
        raise ValueError("an event id is not a hyphenated UUID")
    return ids


def arrow_stream(table: pa.Table) -> bytes:
    """``table`` in the Arrow IPC stream format (ClickHouse's ``ArrowStream``), as one record batch.

    ClickHouse makes a block of each record batch and gives the n-th block of an insert the deduplication
    token ``<token>_<n>``; a batch rebuilt after a crash is read in other steps than the first time, so
    only a single record batch makes the replay the same block under the same token.
    """
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, EVENT_SCHEMA) as writer:
        writer.write_table(table.combine_chunks())
    stream: bytes = sink.getvalue().to_pybytes()
    return stream
