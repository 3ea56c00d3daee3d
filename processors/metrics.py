"""Prometheus metrics of the worker and sink roles."""

from prometheus_client import Counter, Gauge, Histogram

EVENTS_CONSUMED = Counter("throttlex_worker_events_total", "Usage events processed by the policy engine")
EVENTS_DEAD_LETTERED = Counter(
    "throttlex_worker_dead_letters_total", "Events sent to the dead-letter topic", ["reason"]
)
EVENTS_LATE = Counter(
    "throttlex_worker_late_events_total", "Event/policy pairs whose window or period had closed when they arrived"
)
SOURCE_CLOCK_OFFSET = Gauge(
    "throttlex_worker_source_clock_offset_seconds",
    "Event time minus Kafka's append time of the last event seen from each source (gateway or ingest token): "
    "a gateway whose clock is wrong shows here",
    ["source"],
)
DECISIONS = Counter(
    "throttlex_worker_decisions_total", "Blocks decided, by policy and outcome", ["policy", "outcome"]
)
PROCESSING_SECONDS = Histogram(
    "throttlex_worker_processing_seconds",
    "Time from an event's event time to its block being written to Redis",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
REDIS_ERRORS = Counter("throttlex_worker_redis_errors_total", "Redis errors in the worker", ["kind"])

EVENTS_REDELIVERED = Counter(
    "throttlex_worker_redelivered_total",
    "Event/key pairs skipped because the key's state already included the event (input read again after a crash or rebalance)",
)
FORWARDS = Counter(
    "throttlex_worker_forwards_total",
    "Events forwarded to a regrouped limit key: applied at once (this worker owns the key's regroup "
    "partition) or sent through the regroup topic",
    ["route"],
)
for _route in ("local", "kafka"):
    FORWARDS.labels(route=_route)
FORWARDS_RECEIVED = Counter("throttlex_worker_forwards_received_total", "Forwarded events read from the regroup topic")
STATE_RECORDS_WRITTEN = Counter("throttlex_worker_state_records_total", "Key states (and tombstones) written to the changelogs")
STATE_FLUSH_SECONDS = Histogram(
    "throttlex_worker_state_flush_seconds",
    "Duration of one state flush: changelog writes acknowledged and offsets committed",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
WORKER_ERRORS = Counter("throttlex_worker_errors_total", "Failed worker operations, by kind", ["kind"])
WORKER_ERRORS.labels(kind="commit")
LIVE_USAGE_DROPPED = Counter(
    "throttlex_worker_live_usage_dropped_total",
    "Live-usage writes dropped while Redis was behind (the key is written again at its next change)",
)
ASSIGNED_PARTITIONS = Gauge(
    "throttlex_worker_assigned_partitions", "Input partitions (events and regroup topics) this worker owns"
)
TRACKED_KEYS = Gauge("throttlex_worker_state_entries", "Limit keys in this worker's state")
KEYS_EVICTED = Counter("throttlex_worker_evicted_total", "Idle limit keys dropped from the state")
POLICY_RELOADS = Counter("throttlex_policy_reloads_total", "Policy file changes, by outcome: applied, refused, or ignored (the registry's document is in force)", ["outcome"])
for _outcome in ("applied", "refused"):
    POLICY_RELOADS.labels(outcome=_outcome)  # exported at 0 from the start

DENYLIST_RESTORES = Counter(
    "throttlex_worker_denylist_restores_total", "Times a worker found another Redis server answering (restarted or failed over) and wrote the blocks in force again"
)
ACTIVE_BLOCKS = Gauge("throttlex_worker_active_blocks", "Blocks this worker wrote that are still in force")
CONSUMER_LAG = Gauge("throttlex_consumer_lag_events", "Events on the topic the group has not committed yet", ["group"])
CLICKHOUSE_ERRORS = Counter(
    "throttlex_clickhouse_errors_total", "Failed ClickHouse calls, by kind: connection, transient or refused", ["kind"]
)

SINK_ROWS = Counter("throttlex_sink_rows_total", "Rows inserted into ClickHouse by the sink")
SINK_SKIPPED = Counter("throttlex_sink_skipped_total", "Undecodable events the sink did not store")
SINK_INSERT_SECONDS = Histogram("throttlex_sink_insert_seconds", "Duration of one ClickHouse insert")
SINK_ERRORS = Counter("throttlex_sink_errors_total", "Failed sink operations", ["kind"])

RECONCILE_DRIFT = Gauge(
    "throttlex_reconciliation_drift_units",
    "Sum over the windows checked in the last round of |live units - ClickHouse units|",
)
RECONCILE_WINDOWS = Counter("throttlex_reconciliation_windows_total", "Live windows compared with ClickHouse")
RECONCILE_MISMATCHES = Counter(
    "throttlex_reconciliation_mismatches_total", "Live windows whose units differed from ClickHouse"
)
RECONCILE_ERRORS = Counter("throttlex_reconciliation_errors_total", "Reconciliation rounds that failed")
