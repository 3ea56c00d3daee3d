-- Raw usage: one row per accepted request event, as the gateway emitted it.
-- Ordered for per-tenant and per-key scans; partitioned by month for retention and billing periods.
CREATE TABLE IF NOT EXISTS usage_events
(
    event_id        UUID,
    event_time      DateTime64(3, 'UTC'),
    api_key_id      String,
    tenant          LowCardinality(String),
    route           LowCardinality(String),
    method          LowCardinality(String),
    status          UInt16,
    latency_ms      Float32,
    response_bytes  UInt64,
    cost            UInt32,
    client_ip       String,
    edge_blocked    Bool,
    schema_version  UInt8,
    kafka_partition UInt16,
    kafka_offset    UInt64,
    inserted_at     DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(event_time)
ORDER BY (tenant, api_key_id, event_time)
