"""The gateway producer's bound, without a broker: `emit` never waits, holds at most the bound, and
sheds the rest with a count and one log line per episode. (Delivery itself: tests/faults.)"""

import logging

import pytest

from ingest import metrics
from ingest.producer import EventProducer
from tests.factories import make_event


def shed_total() -> float:
    return metrics.EVENTS_SHED._value.get()  # type: ignore[no-any-return]


async def test_emit_holds_the_bound_and_sheds_the_rest(caplog: pytest.LogCaptureFixture) -> None:
    producer = EventProducer("127.0.0.1:1", "events", buffer_max_events=3)  # no broker there: nothing leaves
    before = shed_total()
    with caplog.at_level(logging.WARNING, logger="ingest.producer"):
        for _ in range(5):
            producer.emit(make_event())
    assert producer.undelivered == 3
    assert shed_total() - before == 2
    assert [r.getMessage() for r in caplog.records if r.name == "ingest.producer"] == [
        "producer buffer full: shedding usage events until Kafka takes the buffered ones"
    ]
    await producer.stop(timeout_s=0.01)  # the held events are reported undelivered


async def test_shedding_stops_with_the_count_once_there_is_room(caplog: pytest.LogCaptureFixture) -> None:
    producer = EventProducer("127.0.0.1:1", "events", buffer_max_events=1)
    with caplog.at_level(logging.WARNING, logger="ingest.producer"):
        producer.emit(make_event())
        producer.emit(make_event())
        producer.emit(make_event())
        producer._producer.purge()  # the queued event leaves the queue (as a delivery would take it)
        producer._collect()
        assert producer.undelivered == 0
        producer.emit(make_event())
    ended = [r for r in caplog.records if r.getMessage().startswith("producer buffer has room again")]
    assert [r.shed for r in ended] == [2]  # type: ignore[attr-defined]
    assert producer.undelivered == 1
    await producer.stop(timeout_s=0.01)
