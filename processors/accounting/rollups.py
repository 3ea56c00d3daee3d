"""Each sink batch's billable units per key and minute, published for the plan ledgers of the API replicas.

Every API replica keeps a plan ledger (`ledger`): each key's units per month, live. Fed by the raw events,
every replica would read and decode every event the gateways send, as much work as the sink's own reading.
Instead the sink, which reads each event once anyway, sums each batch it cuts per key and minute and
publishes the sums to the rollups topic (``<events topic>.rollups``, events partition N to rollups partition
N) before it inserts the batch. A replica reads a few sums per key and batch instead of a record per event.

Each rollup names its batch (``first..last`` offset of its events partition). A batch with many keys is
published in several chunks (``chunk`` of ``chunks``), cut the same way every time. A replay after a
crash publishes the same batch again with the same chunks, and a reader counts each chunk of a batch once
(`RollupCounter`).

The sink's committed metadata says where its partition's rollups stood: ``rollups:<offset>``, the rollups
offset after the last batch committed; an intent carries the value of the commit before it. A ledger
loaded from ClickHouse below the sink's committed offset reads rollups from that offset on. Every batch at
or past the committed offset (the intent's batch too) was published there or later.
"""

from __future__ import annotations

from collections.abc import Iterator

import msgspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from throttlex.ingest.kafka_access import KafkaAccess

MAX_BYTES = 500_000
"""Most bytes of sums in one rollup record (each key id's bytes and 16 for its minute and units), half of
Kafka's default 1 MB record limit: a batch is cut into as many records as it takes."""
RETENTION = {"retention.ms": str(24 * 3_600_000)}
"""The rollups topic's setting: a day. A ledger reads only what was published since the sink's last commit."""

_INFLIGHT, _ROLLUPS = "inflight", "rollups"


def topic_of(events_topic: str) -> str:
    """The rollups topic of an events topic."""
    return f"{events_topic}.rollups"


def producer_config(kafka: KafkaAccess) -> dict[str, object]:
    """librdkafka settings of the sink's rollups producer: every replica has a record before it counts as published."""
    return {**kafka.librdkafka_config(), "acks": "all", "enable.idempotence": True, "compression.type": "lz4", "linger.ms": 5}


class Rollup(msgspec.Struct, array_like=True, frozen=True):
    """One chunk of one batch's sums, minute by minute: the first ``sizes[0]`` of ``keys`` and ``units`` are the
    billable units of each key in the minute starting at ``minutes[0]`` (UTC ms), the next ``sizes[1]`` those of
    ``minutes[1]``, and so on. Grouped by minute so that a reader finds each minute's month once, not per key."""

    first: int
    last: int
    chunk: int
    chunks: int
    minutes: list[int]
    sizes: list[int]
    keys: list[str]
    units: list[int]


_encode = msgspec.msgpack.Encoder().encode
decode = msgspec.msgpack.Decoder(Rollup).decode


def rollup_records(rows: pa.Table, first: int, last: int) -> Iterator[tuple[bytes, bytes]]:
    """The rollup records (key, value) of the batch of offsets ``first..last`` holding ``rows`` (the sink's
    Arrow rows): the billable units (edge-blocked requests are not billable) per minute and key, sorted, in
    records of at most about `MAX_BYTES`. A batch with no billable row still has one (empty) record: readers learn the batch
    is done."""
    billable = rows.filter(pc.invert(rows.column("edge_blocked")))
    minutes = pc.cast(pc.floor_temporal(billable.column("event_time"), 1, "minute"), pa.int64())
    summed = (
        pa.table({"minute": minutes, "key": billable.column("api_key_id"), "units": pc.cast(billable.column("cost"), pa.int64())})
        .group_by(["minute", "key"])
        .aggregate([("units", "sum")])
        .sort_by([("minute", "ascending"), ("key", "ascending")])
    )
    sizes = np.cumsum(pc.add(pc.binary_length(summed.column("key")), 16).to_numpy(zero_copy_only=False))
    cuts = [0, *np.searchsorted(sizes, np.arange(MAX_BYTES, int(sizes[-1]) if len(sizes) else 0, MAX_BYTES), side="right"), summed.num_rows]
    bounds = [(start, end) for start, end in zip(cuts, cuts[1:], strict=False) if end > start] or [(0, 0)]
    for chunk, (start, end) in enumerate(bounds):
        part = summed.slice(start, end - start)
        runs = pc.run_end_encode(part.column("minute").combine_chunks())  # each minute once, with its run's end
        sizes_of_minutes = np.diff(runs.run_ends.to_numpy(), prepend=0).tolist()
        keys, units = part.column("key").to_pylist(), part.column("units_sum").to_pylist()
        rollup = Rollup(first, last, chunk, len(bounds), runs.values.to_pylist(), sizes_of_minutes, keys, units)
        yield f"{first}-{last}/{chunk}".encode(), _encode(rollup)


class RollupGap(RuntimeError):
    """A batch's rollups are missing before those read (see `RollupCounter.counts`)."""


class RollupCounter:
    """Which rollups of one events partition a ledger counts: those of batches at or past ``split`` (the
    ledger loaded the events below it from ClickHouse), each chunk once."""

    __slots__ = ("_batch", "_chunks", "position")

    def __init__(self, split: int) -> None:
        self._batch = (-1, split - 1)
        self._chunks: set[int] = set()
        self.position = split
        """The events offset up to which every batch is counted."""

    def counts(self, rollup: Rollup) -> bool:
        """True if ``rollup`` is to be counted (and remember it is). `RollupGap` if batches before it are
        missing: a ledger that goes on would undercount (a sink of an older release publishing nothing, a
        batch whose records retention deleted); loading it again from ClickHouse is exact."""
        batch = (rollup.first, rollup.last)
        if batch == self._batch:
            if rollup.chunk in self._chunks:
                return False  # published again by a replay
        elif rollup.first <= self._batch[1]:
            return False  # a batch counted already, or one below the split
        elif rollup.first > self.position:
            raise RollupGap(f"rollups of offsets {self.position}..{rollup.first - 1} are missing")
        else:
            self._batch, self._chunks = batch, set()
        self._chunks.add(rollup.chunk)
        return True

    def counted(self, rollup: Rollup) -> None:
        """``rollup`` is in the ledger now: once every chunk of its batch is, the position moves past it."""
        if (rollup.first, rollup.last) == self._batch and len(self._chunks) == rollup.chunks:
            self.position = rollup.last + 1


def commit_metadata(*, inflight: int | None = None, rollups: int | None = None) -> str:
    """The sink's commit metadata: the intent's last offset, where the partition's rollups stand."""
    return " ".join(f"{name}:{value}" for name, value in ((_INFLIGHT, inflight), (_ROLLUPS, rollups)) if value is not None)


def read_metadata(metadata: str | None) -> tuple[int | None, int | None]:
    """(intent's last offset, rollups offset) from the sink's commit metadata, each None if absent (an older
    sink wrote ``inflight:<last>`` alone, or nothing)."""
    fields = dict(part.split(":", 1) for part in (metadata or "").rstrip("\0").split() if ":" in part)
    inflight, rollups = fields.get(_INFLIGHT), fields.get(_ROLLUPS)
    return (int(inflight) if inflight else None), (int(rollups) if rollups else None)
