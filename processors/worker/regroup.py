"""Regrouping: events travel to the worker of each limit key that is not keyed on ``api_key``.

The events topic is partitioned by API key, so a policy keyed on ``tenant`` or ``ip`` would see the
events of one tenant spread over every worker. For such policies the engine makes a `Forward` per
event and limit key; the worker packs a batch's forwards for one partition of the regroup topic into a
single record (msgpack, a list of forwards), and the worker that owns that partition applies them.
One limit key always maps to one regroup partition (`partition_of`).
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator

import msgspec

from throttlex.processors.core.engine import Forward

FORWARDS_PER_RECORD = 2_000
"""Forwards packed into one regroup record (about 150 KB), well under Kafka's message size limit."""

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(list[Forward])


def partition_of(limit_key: str, partitions: int) -> int:
    return zlib.crc32(limit_key.encode()) % partitions


def pack(forwards: list[Forward], partitions: int) -> Iterator[tuple[int, bytes]]:
    """The regroup records for ``forwards``: (partition, value), in the order of the forwards within
    each partition."""
    by_partition: dict[int, list[Forward]] = {}
    for forward in forwards:
        by_partition.setdefault(partition_of(forward.limit_key, partitions), []).append(forward)
    for partition, items in by_partition.items():
        for start in range(0, len(items), FORWARDS_PER_RECORD):
            yield partition, _encoder.encode(items[start : start + FORWARDS_PER_RECORD])


def unpack(value: bytes) -> list[Forward]:
    """The forwards of one regroup record; `msgspec.DecodeError` if it is not one."""
    return _decoder.decode(value)
