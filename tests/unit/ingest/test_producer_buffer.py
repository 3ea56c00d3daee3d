"""The gateway producer without a broker: `emit` never waits and hands a turn's events to librdkafka
together, holds at most the bound, and sheds the rest with a count and one log line per episode; an
event librdkafka refuses outright is counted as failed and the others go on. (Delivery itself:
tests/integration/test_event_producer.py and tests/faults.)"""

import asyncio
import logging

import pytest

from throttlex.ingest import metrics
from throttlex.ingest.producer import EventProducer
from tests.factories import make_event


def shed_total() -> float:
    return metrics.EVENTS_SHED._value.get()  # type: ignore[no-any-return]


async def test_emit_holds_the_bound_and_sheds_the_rest(caplog: pytest.LogCaptureFixture) -> None:
    producer = EventProducer("127.0.0.1:1", "events", buffer_max_events=3)  # no broker there: nothing leaves
    before = shed_total()
    with caplog.at_level(logging.WARNING, logger="throttlex.ingest.producer"):
        for _ in range(5):
            producer.emit(make_event())
        await asyncio.sleep(0)  # the loop's next turn hands them over
    assert producer.undelivered == 3
    assert shed_total() - before == 2
    assert [r.getMessage() for r in caplog.records if r.name == "throttlex.ingest.producer"] == [
        "producer buffer full: shedding usage events until Kafka takes the buffered ones"
    ]
    await producer.stop(timeout_s=0.01)  # the held events are reported undelivered


async def test_shedding_stops_with_the_count_once_there_is_room(caplog: pytest.LogCaptureFixture) -> None:
    producer = EventProducer("127.0.0.1:1", "events", buffer_max_events=1)
    with caplog.at_level(logging.WARNING, logger="throttlex.ingest.producer"):
        producer.emit(make_event())
        producer.emit(make_event())
        producer.emit(make_event())
        await asyncio.sleep(0)
        producer._producer.purge()  # the queued event leaves the queue (as a delivery would take it)
        producer._collect()
        assert producer.undelivered == 0
        producer.emit(make_event())
        await asyncio.sleep(0)
    ended = [r for r in caplog.records if r.getMessage().startswith("producer buffer has room again")]
    assert [r.shed for r in ended] == [2]  # type: ignore[attr-defined]
    assert producer.undelivered == 1
    await producer.stop(timeout_s=0.01)


async def test_the_events_of_one_turn_of_the_loop_are_handed_over_together_on_the_next() -> None:
    producer = EventProducer("127.0.0.1:1", "events")
    for _ in range(3):
        producer.emit(make_event())
    assert (len(producer._pending), producer._undelivered, producer.undelivered) == (3, 0, 3)  # taken, not queued yet
    await asyncio.sleep(0)
    assert (len(producer._pending), producer._undelivered, producer.undelivered) == (0, 3, 3)
    await producer.stop(timeout_s=0.01)


def test_without_a_running_event_loop_an_event_is_handed_over_at_once() -> None:
    producer = EventProducer("127.0.0.1:1", "events")
    producer.emit(make_event())
    assert (len(producer._pending), producer._undelivered) == (0, 1)
    producer._producer.purge()


def test_events_whose_hand_over_never_ran_are_handed_over_by_the_next_collect() -> None:
    producer = EventProducer("127.0.0.1:1", "events")
    loop = asyncio.new_event_loop()

    def emit_then_stop() -> None:
        producer.emit(make_event())
        loop.stop()  # the loop stops before the hand-over runs

    loop.call_soon(emit_then_stop)
    loop.run_forever()
    loop.close()
    producer.emit(make_event())  # a hand-over is still due: this one waits with the first
    assert (len(producer._pending), producer._undelivered) == (2, 0)
    producer._collect()  # what the producer's task does every 50 ms
    assert (len(producer._pending), producer._undelivered) == (0, 2)
    producer._producer.purge()


async def test_an_event_librdkafka_refuses_is_counted_as_failed_and_the_others_are_queued(caplog: pytest.LogCaptureFixture) -> None:
    producer = EventProducer("127.0.0.1:1", "events")
    before = metrics.EVENTS_FAILED.labels(reason="MSG_SIZE_TOO_LARGE")._value.get()
    with caplog.at_level(logging.WARNING, logger="throttlex.ingest.producer"):
        producer.emit(make_event())
        producer.emit(make_event(route="/" + "x" * 2_000_000))  # past librdkafka's message.max.bytes (1 MB)
        producer.emit(make_event())
        await asyncio.sleep(0)
    assert metrics.EVENTS_FAILED.labels(reason="MSG_SIZE_TOO_LARGE")._value.get() - before == 1
    assert producer.undelivered == 2
    assert [r.getMessage() for r in caplog.records if r.name == "throttlex.ingest.producer"] == ["usage event not delivered"]
    await producer.stop(timeout_s=0.01)
