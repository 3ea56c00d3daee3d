"""Prometheus metrics of the gateway role (middleware, producer, edge denylist)."""

from collections import defaultdict
from collections.abc import Iterable, Iterator

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics_core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector


class RequestPathCounter(Collector):
    """A labelled counter added to on every request: ``counter.counts[label] += 1`` is a dictionary update,
    where a prometheus_client `Counter` takes a lock and checks its arguments on each add (about a tenth
    of the middleware's own cost). The counts are read when Prometheus scrapes; the labels given start
    at 0, others appear when first added to. For code running on one event loop, as the ASGI middleware
    does: adds from several threads at once may be lost."""

    def __init__(self, name: str, documentation: str, label: str, values: Iterable[str],
                 registry: CollectorRegistry = REGISTRY) -> None:  # fmt: skip
        self._name, self._documentation, self._label = name, documentation, label
        self.counts: defaultdict[str, int] = defaultdict(int, dict.fromkeys(values, 0))
        registry.register(self)

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(self._name, self._documentation, labels=[self._label])
        for value, count in list(self.counts.items()):
            family.add_metric([value], count)
        yield family


EVENTS_PRODUCED = Counter(
    "throttlex_gateway_events_produced_total", "Usage events Kafka confirmed (acks=all)"
)
EVENTS_SHED = Counter(
    "throttlex_gateway_events_shed_total",
    "Usage events dropped because the producer buffer was full (Kafka out of reach for long)",
)
PRODUCER_BUFFERED = Gauge(
    "throttlex_gateway_producer_buffered_events", "Usage events accepted and not yet confirmed by Kafka"
)
EVENTS_FAILED = Counter(
    "throttlex_gateway_events_failed_total", "Usage events the producer could not deliver", ["reason"]
)
REQUESTS = RequestPathCounter(
    "throttlex_gateway_requests_total", "Requests seen by the gateway middleware", "outcome",
    ("admitted", "blocked", "refused_unavailable", "unauthenticated", "unauthorized", "key_check_unavailable"),
)
EDGE_CACHE_SIZE = Gauge(
    "throttlex_edge_cache_blocks", "Blocked limit keys held in the edge denylist cache"
)
EDGE_RESYNCS = Counter(
    "throttlex_edge_resyncs_total", "Times the edge denylist took a full snapshot from Redis"
)
EDGE_REDIS_ERRORS = Counter(
    "throttlex_edge_redis_errors_total", "Redis errors seen by the edge denylist client", ["kind"]
)
EDGE_SYNC_LAG = Histogram(
    "throttlex_edge_sync_lag_seconds",
    "Time from a worker writing a block to this gateway's cache holding it",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
KEY_LOOKUPS = RequestPathCounter(
    "throttlex_edge_key_lookups_total",
    "API key checks by where the answer came from (cache, unknown_cache, redis)",
    "source", ("cache", "unknown_cache", "redis"),
)
