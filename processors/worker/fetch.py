"""Reading the worker's input: batches with an even share of each partition, the events partitions kept in
step by Kafka's append time."""

from __future__ import annotations

from typing import TypeAlias

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition

Record: TypeAlias = ConsumerRecord[bytes, bytes]

ALIGN_MS = 100
"""How far ahead in record time one events partition may run of another while catching up. A key fed by
several partitions (a tenant) receives their events this far out of order at most: windows add up counts
and do not mind, but a token bucket replays its history from each out-of-order event (measured on one
over-limit tenant bucket: 1.9 CPU-µs an event at 100 ms of disorder, 12.4 at 1 s)."""


class Fetcher:
    """Takes records from the consumer for `StreamWorker`; ``forget`` drops what it holds of a revoked partition."""

    def __init__(self, consumer: AIOKafkaConsumer, events_topic: str, batch_max_records: int) -> None:
        self._consumer = consumer
        self._events_topic = events_topic
        self._batch_max_records = batch_max_records
        self._held: dict[TopicPartition, list[Record]] = {}
        """Records taken from the consumer and not applied yet."""

    def forget(self, tp: TopicPartition) -> None:
        self._held.pop(tp, None)  # never applied: the partition's next owner reads them

    async def next_batch(self) -> dict[TopicPartition, list[Record]]:
        """The next batch: up to ``batch_max_records`` records, an even share from each partition that has
        some (if none has any, wait up to 100 ms for the first).

        Records are taken out of the consumer as soon as it has them, into ``_held``, for every partition
        holding less than its share here: aiokafka sends a broker no new fetch while any of its partitions
        still has records the application has not taken, so taking them at once keeps the next fetch under
        way while this batch is applied (measured: leaving them in the consumer made fetches wait 40–100 ms
        at 10,000 events/s). A partition already holding a share or more is left in the consumer, which
        bounds what is held to about one fetch per partition.

        The events partitions are kept in step by record time (Kafka's append time): records more than
        ``ALIGN_MS`` newer than the newest record of the events partition furthest behind (one with more to
        read) are held back for a later batch. Catching up after a restart, partitions would otherwise drift
        apart, and a regrouped key, fed by all of them, would see its window move on ahead of the partition
        behind.
        """
        consumer = self._consumer
        assigned = consumer.assignment()
        share = max(1, self._batch_max_records // max(1, len(assigned)))
        held = self._held
        wanted = [tp for tp in assigned if len(held.get(tp, ())) < share]
        if wanted:
            timeout_ms = 0 if any(held.get(tp) for tp in assigned) else 100
            for tp, records in (await consumer.getmany(*wanted, timeout_ms=timeout_ms)).items():
                held[tp] = held[tp] + records if tp in held else records
        fetched: dict[TopicPartition, list[Record]] = {}
        for tp in assigned:
            records = held.pop(tp, None)
            if records:
                fetched[tp] = records[:share]
                if len(records) > share:
                    held[tp] = records[share:]
        events = self._events_topic
        behind = [records[-1].timestamp for tp, records in fetched.items()
                  if tp.topic == events and records[-1].offset + 1 < (consumer.highwater(tp) or 0)]  # fmt: skip
        if behind:
            bound = min(behind) + ALIGN_MS
            for tp, records in list(fetched.items()):
                if tp.topic == events and records[-1].timestamp > bound:
                    cut = next(i for i, record in enumerate(records) if record.timestamp > bound)
                    held[tp], fetched[tp] = records[cut:] + held.get(tp, []), records[:cut]
        return {tp: records for tp, records in fetched.items() if records}
