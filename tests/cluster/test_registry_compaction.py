"""A registry topic that holds 100,000 superseded key versions (written as a release before tombstones left
it): the first process to start reads them all and tombstones the stale ones; compaction removes them, and a
process started then reads only the live entries. Concurrent writers of one key still see the first writer
win, everywhere, on the compacted log as on the whole one."""

from __future__ import annotations

import asyncio
import secrets
import time

import pytest
from aiokafka import AIOKafkaProducer

from throttlex.ingest.keys import KeyRecord, encode_key
from throttlex.processors.registry import REGISTRY_TOPIC_CONFIGS, KeyConflict, Registry
from throttlex.processors.topics import ensure_topics
from tests.cluster.conftest import LocalCluster, on_cluster
from tests.conftest import Sandbox, eventually

pytestmark = pytest.mark.cluster

KEYS, VERSIONS = 1_000, 101  # 100 superseded versions of each key
CONTESTED = 20  # keys three writers change at once
QUICK_COMPACTION = {**REGISTRY_TOPIC_CONFIGS, "segment.ms": "1000", "max.compaction.lag.ms": "1000", "delete.retention.ms": "0"}
"""The shipped settings, but segments roll and tombstones go within seconds, so the test need not wait an hour."""


async def started(sandbox: Sandbox, topic: str) -> tuple[Registry, float]:
    registry = Registry(sandbox.kafka_bootstrap, topic, None, sandbox.env["THROTTLEX_REDIS_PREFIX"], replication_factor=3)
    began = time.monotonic()
    await registry.start()
    return registry, time.monotonic() - began


async def test_superseded_versions_are_compacted_away_and_the_first_writer_still_wins(
    sandbox: Sandbox, cluster: LocalCluster
) -> None:
    sandbox = on_cluster(sandbox, cluster)
    topic = sandbox.env["THROTTLEX_REGISTRY_TOPIC"]
    await ensure_topics(sandbox.kafka_bootstrap, {topic: 1}, replication_factor=3, configs={topic: QUICK_COMPACTION})
    history = AIOKafkaProducer(bootstrap_servers=sandbox.kafka_bootstrap, acks="all", linger_ms=20)
    await history.start()
    try:
        sends = []
        for version in range(1, VERSIONS + 1):
            for n in range(KEYS):
                made_by = secrets.token_hex(8)
                record = KeyRecord(key_id=f"k{n}", tenant="acme", version=version, writer=made_by, hint=f"v{version}")
                sends.append(await history.send(topic, encode_key(record), key=f"key/k{n}/v{version}/{made_by}".encode()))
        await asyncio.gather(*sends)
    finally:
        await history.stop()

    first, first_s = await started(sandbox, topic)  # reads the history, tombstones the stale records
    writers = [first] + [(await started(sandbox, topic))[0] for _ in range(2)]
    try:
        assert first.records_read_at_start == KEYS * VERSIONS
        assert {key_id: record.version for key_id, record in first.keys.items()} == {f"k{n}": VERSIONS for n in range(KEYS)}

        async def change(writer: Registry, key_id: str) -> str | None:
            try:
                record = await writer.put_key(KeyRecord(key_id=key_id, tenant="acme", hint=str(id(writer))),
                                              expected_version=VERSIONS)  # fmt: skip
            except KeyConflict:
                return None
            return record.writer

        outcomes = await asyncio.gather(*[change(w, f"k{n}") for n in range(CONTESTED) for w in writers])
        for n in range(CONTESTED):  # one winner per key, and every process holds it
            won = [o for o in outcomes[n * len(writers) : (n + 1) * len(writers)] if o is not None]
            assert len(won) == 1, f"k{n}: {len(won)} writers won"
            for writer in writers:
                await eventually(lambda w=writer, k=f"k{n}", v=won[0]: w.keys[k].writer == v, timeout_s=10,  # type: ignore[misc]
                                 what=f"k{n}'s winner everywhere")  # fmt: skip
        expected = {key_id: (record.version, record.writer) for key_id, record in first.keys.items()}
    finally:
        for writer in writers:
            await writer.stop()

    roll = AIOKafkaProducer(bootstrap_servers=sandbox.kafka_bootstrap, acks="all")
    await roll.start()
    reads: list[int] = []

    async def compacted() -> bool:
        # A tombstone of no entry: the head segment rolls once it is older than segment.ms, so it can be compacted.
        await roll.send_and_wait(topic, None, key=b"roll")
        fresh, _ = await started(sandbox, topic)
        await fresh.stop()
        reads.append(fresh.records_read_at_start)
        return fresh.records_read_at_start <= KEYS + CONTESTED

    try:
        await eventually(compacted, timeout_s=120, what="compaction to remove the stale records")
    finally:
        await roll.stop()
    fresh, fresh_s = await started(sandbox, topic)
    await fresh.stop()
    print(f"first start after the history: {first_s:.2f} s for {first.records_read_at_start} records; "
          f"records read by starts while compaction ran: {reads}; start on the compacted topic: {fresh_s:.2f} s "
          f"for {fresh.records_read_at_start} records")  # fmt: skip
    assert fresh.records_read_at_start <= KEYS + CONTESTED
    assert {key_id: (record.version, record.writer) for key_id, record in fresh.keys.items()} == expected
