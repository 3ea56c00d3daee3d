-- Billable units per key and minute, with the highest Kafka offset each minute holds. Plan quotas
-- (`GET /v1/quota`) read this instead of raw events: the cost of a read is bounded by the minutes in
-- the period, whatever the history, and the units survive raw retention. `top_offset` tells a reader
-- whether a minute may hold events stored after the offset it splits ClickHouse from Kafka at
-- (processors/accounting/exact_usage.py); such a minute is read from the raw rows below that offset.
CREATE TABLE IF NOT EXISTS usage_units_per_minute
(
    api_key_id      String,
    bucket          DateTime('UTC'),
    kafka_partition UInt16,
    billable_units  SimpleAggregateFunction(sum, UInt64),
    top_offset      SimpleAggregateFunction(max, UInt64)
)
ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMM(bucket)
ORDER BY (api_key_id, bucket, kafka_partition)
SETTINGS non_replicated_deduplication_window = 1000;

-- What was stored before this table existed (raw rows retention deleted before cannot come back). Run
-- migrations with the sinks stopped: then the table holds nothing but this backfill until the view below
-- exists, and emptying it first makes a migration interrupted mid-insert and run again count once.
TRUNCATE TABLE usage_units_per_minute;

INSERT INTO usage_units_per_minute
SELECT api_key_id, toStartOfMinute(event_time) AS bucket, kafka_partition,
       sumIf(cost, NOT usage_events.edge_blocked) AS billable_units, max(kafka_offset) AS top_offset
FROM usage_events
GROUP BY api_key_id, bucket, kafka_partition;

CREATE MATERIALIZED VIEW IF NOT EXISTS usage_units_per_minute_mv TO usage_units_per_minute AS
SELECT api_key_id, toStartOfMinute(event_time) AS bucket, kafka_partition,
       sumIf(cost, NOT usage_events.edge_blocked) AS billable_units, max(kafka_offset) AS top_offset
FROM usage_events
GROUP BY api_key_id, bucket, kafka_partition
