"""When an event counts for enforcement: the gateway's time, held to the time Kafka appended it.

A gateway stamps each event with its own clock (``event_time_ms``); the brokers stamp each record of the
events topic with theirs as they append it (the topic's ``message.timestamp.type`` is ``LogAppendTime``,
which the worker sets at start). A gateway's clock can be wrong by seconds or minutes; the brokers'
clocks are the deployment's own. So the worker counts each event at its *enforcement time*::

    at = min(appended, max(event_time, appended - tolerance))

- never after Kafka appended it: a gateway whose clock runs ahead cannot move a window forward, nor make
  a block outlast the window it would have ended with;
- never more than ``tolerance`` before it: a gateway whose clock runs behind is counted beside on-time
  ones, and its blocks do not end early;
- in between, the gateway's own time, so a healthy gateway's events keep their exact place in time.

Records stamped with the producer's time instead (written before the topic was switched to append time)
are judged against that time, held to the worker's clock. Billing keeps the gateway's time: the sink stores
``event_time`` as sent and ``appended_at`` beside it. `SourceClocks` reports, per source, how far its
clock is from Kafka's, so an operator can find the bad one.
"""

from __future__ import annotations

from throttlex.processors import metrics

LOG_APPEND_TIME = 1
"""A record's ``timestamp_type`` when the broker stamped it."""

MAX_SOURCES = 1_000
"""Sources reported by name; events of any further ones are reported as ``other``."""


def enforcement_time(event_time_ms: int, appended_ms: int, tolerance_ms: int) -> int:
    """The instant an event counts at (see the module's docstring)."""
    if event_time_ms > appended_ms:
        return appended_ms
    earliest = appended_ms - tolerance_ms
    return event_time_ms if event_time_ms > earliest else earliest


class SourceClocks:
    """Event time minus append time per source (``source`` of the event, ``gateway`` when it names none),
    as the gauge ``throttlex_worker_source_clock_offset_seconds``: the last event of each batch per source."""

    def __init__(self, max_sources: int = MAX_SOURCES) -> None:
        self._known: set[str] = set()
        self._max = max_sources

    def report(self, offsets_ms: dict[str, int]) -> None:
        for source, offset_ms in offsets_ms.items():
            label = source or "gateway"
            if label not in self._known:
                if len(self._known) >= self._max:
                    label = "other"
                else:
                    self._known.add(label)
            metrics.SOURCE_CLOCK_OFFSET.labels(source=label).set(offset_ms / 1000)
