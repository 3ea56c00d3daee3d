-- The hour and day rollups are kept from the minute rollup's rows instead of from raw events: each
-- batch's raw rows are grouped once (per minute), and the hour and day views group what that gave,
-- a few rows per key and minute. Sums are the same; latency quantile states are merged. Measured on
-- 50,000-row inserts this saves about 1.4 CPU-µs of ClickHouse's 2.7 per row (`make bench-sink`).
-- Deduplication is unchanged: a repeated insert is dropped in usage_events and in every view below it.
-- Run migrations with the sinks stopped: an insert between a DROP and its CREATE would miss a rollup.
DROP VIEW IF EXISTS usage_per_hour_mv;

CREATE MATERIALIZED VIEW usage_per_hour_mv TO usage_per_hour AS
SELECT
    toStartOfHour(bucket) AS bucket, tenant, api_key_id, route, status,
    sum(requests) AS requests, sum(cost_units) AS cost_units, sum(billable_units) AS billable_units,
    sum(response_bytes) AS response_bytes, sum(errors) AS errors, sum(edge_blocked) AS edge_blocked,
    quantilesMergeState(0.5, 0.9, 0.99)(latency_ms) AS latency_ms
FROM usage_per_minute
GROUP BY bucket, tenant, api_key_id, route, status;

DROP VIEW IF EXISTS usage_per_day_mv;

CREATE MATERIALIZED VIEW usage_per_day_mv TO usage_per_day AS
SELECT
    toStartOfDay(bucket) AS bucket, tenant, api_key_id, route, status,
    sum(requests) AS requests, sum(cost_units) AS cost_units, sum(billable_units) AS billable_units,
    sum(response_bytes) AS response_bytes, sum(errors) AS errors, sum(edge_blocked) AS edge_blocked,
    quantilesMergeState(0.5, 0.9, 0.99)(latency_ms) AS latency_ms
FROM usage_per_minute
GROUP BY bucket, tenant, api_key_id, route, status
