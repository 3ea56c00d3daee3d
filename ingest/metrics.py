"""Prometheus metrics of the gateway role (middleware, producer, edge denylist)."""

from prometheus_client import Counter, Gauge

EVENTS_PRODUCED = Counter(
    "throttlex_gateway_events_produced_total", "Usage events handed to the Kafka producer"
)
EVENTS_FAILED = Counter(
    "throttlex_gateway_events_failed_total", "Usage events the producer could not deliver", ["reason"]
)
REQUESTS = Counter(
    "throttlex_gateway_requests_total", "Requests seen by the gateway middleware", ["outcome"]
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
