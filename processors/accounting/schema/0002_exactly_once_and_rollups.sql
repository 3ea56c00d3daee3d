-- Exactly-once inserts: the sink sends each batch with an insert_deduplication_token derived from its
-- Kafka offsets; ClickHouse drops a block whose token it has seen among the last 1000 inserts, in the
-- raw table and (deduplicate_blocks_in_dependent_materialized_views) in every rollup below.
ALTER TABLE usage_events MODIFY SETTING non_replicated_deduplication_window = 1000;

-- Rollups, kept by materialized views on every insert into usage_events. Query them with sum() and
-- quantilesMerge() grouped by the columns you need: totals are exact before and after merges.
-- cost_units counts every request; billable_units leaves out those the gateways refused (429).
CREATE TABLE IF NOT EXISTS usage_per_minute
(
    bucket         DateTime('UTC'),
    tenant         LowCardinality(String),
    api_key_id     String,
    route          LowCardinality(String),
    status         UInt16,
    requests       SimpleAggregateFunction(sum, UInt64),
    cost_units     SimpleAggregateFunction(sum, UInt64),
    billable_units SimpleAggregateFunction(sum, UInt64),
    response_bytes SimpleAggregateFunction(sum, UInt64),
    errors         SimpleAggregateFunction(sum, UInt64),
    edge_blocked   SimpleAggregateFunction(sum, UInt64),
    latency_ms     AggregateFunction(quantiles(0.5, 0.9, 0.99), Float32)
)
ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMM(bucket)
ORDER BY (tenant, api_key_id, bucket, route, status)
SETTINGS non_replicated_deduplication_window = 1000;

CREATE MATERIALIZED VIEW IF NOT EXISTS usage_per_minute_mv TO usage_per_minute AS
SELECT
    toStartOfMinute(event_time) AS bucket, tenant, api_key_id, route, status,
    count() AS requests, sum(cost) AS cost_units, sumIf(cost, NOT usage_events.edge_blocked) AS billable_units, sum(response_bytes) AS response_bytes,
    countIf(status >= 500) AS errors, countIf(edge_blocked) AS edge_blocked,
    quantilesState(0.5, 0.9, 0.99)(latency_ms) AS latency_ms
FROM usage_events
GROUP BY bucket, tenant, api_key_id, route, status;

CREATE TABLE IF NOT EXISTS usage_per_hour AS usage_per_minute
ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMM(bucket)
ORDER BY (tenant, api_key_id, bucket, route, status)
SETTINGS non_replicated_deduplication_window = 1000;

CREATE MATERIALIZED VIEW IF NOT EXISTS usage_per_hour_mv TO usage_per_hour AS
SELECT
    toStartOfHour(event_time) AS bucket, tenant, api_key_id, route, status,
    count() AS requests, sum(cost) AS cost_units, sumIf(cost, NOT usage_events.edge_blocked) AS billable_units, sum(response_bytes) AS response_bytes,
    countIf(status >= 500) AS errors, countIf(edge_blocked) AS edge_blocked,
    quantilesState(0.5, 0.9, 0.99)(latency_ms) AS latency_ms
FROM usage_events
GROUP BY bucket, tenant, api_key_id, route, status;

CREATE TABLE IF NOT EXISTS usage_per_day AS usage_per_minute
ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMM(bucket)
ORDER BY (tenant, api_key_id, bucket, route, status)
SETTINGS non_replicated_deduplication_window = 1000;

CREATE MATERIALIZED VIEW IF NOT EXISTS usage_per_day_mv TO usage_per_day AS
SELECT
    toStartOfDay(event_time) AS bucket, tenant, api_key_id, route, status,
    count() AS requests, sum(cost) AS cost_units, sumIf(cost, NOT usage_events.edge_blocked) AS billable_units, sum(response_bytes) AS response_bytes,
    countIf(status >= 500) AS errors, countIf(edge_blocked) AS edge_blocked,
    quantilesState(0.5, 0.9, 0.99)(latency_ms) AS latency_ms
FROM usage_events
GROUP BY bucket, tenant, api_key_id, route, status
