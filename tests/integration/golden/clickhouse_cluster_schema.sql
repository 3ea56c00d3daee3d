CREATE TABLE IF NOT EXISTS throttlex_schema_migrations ON CLUSTER throttlex (
    version    UInt32,
    name       String,
    applied_at DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplicatedMergeTree('/clickhouse/tables/all/{database}/throttlex_schema_migrations', '{replica}')
ORDER BY version;

CREATE TABLE IF NOT EXISTS throttlex_migration_lock ON CLUSTER throttlex (
    turn   UInt64,
    owner  String,
    state  LowCardinality(String),
    at     DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplicatedMergeTree('/clickhouse/tables/all/{database}/throttlex_migration_lock', '{replica}')
ORDER BY (turn, state)
SETTINGS non_replicated_deduplication_window = 1000, replicated_deduplication_window = 1000;

CREATE TABLE IF NOT EXISTS usage_events_local ON CLUSTER throttlex (
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
ENGINE = ReplicatedMergeTree('/clickhouse/tables/{shard}/{database}/usage_events_local', '{replica}')
PARTITION BY toYYYYMM(event_time)
ORDER BY (tenant, api_key_id, event_time);

CREATE TABLE IF NOT EXISTS usage_events ON CLUSTER throttlex AS usage_events_local
ENGINE = Distributed(throttlex, currentDatabase(), usage_events_local, cityHash64(api_key_id));

ALTER TABLE usage_events_local ON CLUSTER throttlex MODIFY SETTING non_replicated_deduplication_window = 1000;

CREATE TABLE IF NOT EXISTS usage_per_minute_local ON CLUSTER throttlex (
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
ENGINE = ReplicatedAggregatingMergeTree('/clickhouse/tables/{shard}/{database}/usage_per_minute_local', '{replica}')
PARTITION BY toYYYYMM(bucket)
ORDER BY (tenant, api_key_id, bucket, route, status)
SETTINGS non_replicated_deduplication_window = 1000;

CREATE TABLE IF NOT EXISTS usage_per_minute ON CLUSTER throttlex AS usage_per_minute_local
ENGINE = Distributed(throttlex, currentDatabase(), usage_per_minute_local, cityHash64(api_key_id));

CREATE MATERIALIZED VIEW IF NOT EXISTS usage_per_minute_mv ON CLUSTER throttlex TO usage_per_minute_local AS
SELECT
    toStartOfMinute(event_time) AS bucket, tenant, api_key_id, route, status,
    count() AS requests, sum(cost) AS cost_units, sumIf(cost, NOT usage_events_local.edge_blocked) AS billable_units, sum(response_bytes) AS response_bytes,
    countIf(status >= 500) AS errors, countIf(edge_blocked) AS edge_blocked,
    quantilesState(0.5, 0.9, 0.99)(latency_ms) AS latency_ms
FROM usage_events_local
GROUP BY bucket, tenant, api_key_id, route, status;

CREATE TABLE IF NOT EXISTS usage_per_hour_local ON CLUSTER throttlex AS usage_per_minute_local
ENGINE = ReplicatedAggregatingMergeTree('/clickhouse/tables/{shard}/{database}/usage_per_hour_local', '{replica}')
PARTITION BY toYYYYMM(bucket)
ORDER BY (tenant, api_key_id, bucket, route, status)
SETTINGS non_replicated_deduplication_window = 1000;

CREATE TABLE IF NOT EXISTS usage_per_hour ON CLUSTER throttlex AS usage_per_hour_local
ENGINE = Distributed(throttlex, currentDatabase(), usage_per_hour_local, cityHash64(api_key_id));

CREATE MATERIALIZED VIEW IF NOT EXISTS usage_per_hour_mv ON CLUSTER throttlex TO usage_per_hour_local AS
SELECT
    toStartOfHour(event_time) AS bucket, tenant, api_key_id, route, status,
    count() AS requests, sum(cost) AS cost_units, sumIf(cost, NOT usage_events_local.edge_blocked) AS billable_units, sum(response_bytes) AS response_bytes,
    countIf(status >= 500) AS errors, countIf(edge_blocked) AS edge_blocked,
    quantilesState(0.5, 0.9, 0.99)(latency_ms) AS latency_ms
FROM usage_events_local
GROUP BY bucket, tenant, api_key_id, route, status;

CREATE TABLE IF NOT EXISTS usage_per_day_local ON CLUSTER throttlex AS usage_per_minute_local
ENGINE = ReplicatedAggregatingMergeTree('/clickhouse/tables/{shard}/{database}/usage_per_day_local', '{replica}')
PARTITION BY toYYYYMM(bucket)
ORDER BY (tenant, api_key_id, bucket, route, status)
SETTINGS non_replicated_deduplication_window = 1000;

CREATE TABLE IF NOT EXISTS usage_per_day ON CLUSTER throttlex AS usage_per_day_local
ENGINE = Distributed(throttlex, currentDatabase(), usage_per_day_local, cityHash64(api_key_id));

CREATE MATERIALIZED VIEW IF NOT EXISTS usage_per_day_mv ON CLUSTER throttlex TO usage_per_day_local AS
SELECT
    toStartOfDay(event_time) AS bucket, tenant, api_key_id, route, status,
    count() AS requests, sum(cost) AS cost_units, sumIf(cost, NOT usage_events_local.edge_blocked) AS billable_units, sum(response_bytes) AS response_bytes,
    countIf(status >= 500) AS errors, countIf(edge_blocked) AS edge_blocked,
    quantilesState(0.5, 0.9, 0.99)(latency_ms) AS latency_ms
FROM usage_events_local
GROUP BY bucket, tenant, api_key_id, route, status;

ALTER TABLE usage_events_local ON CLUSTER throttlex ADD COLUMN IF NOT EXISTS plan LowCardinality(String) DEFAULT '' AFTER edge_blocked;

ALTER TABLE usage_events ON CLUSTER throttlex ADD COLUMN IF NOT EXISTS plan LowCardinality(String) DEFAULT '' AFTER edge_blocked;

CREATE TABLE IF NOT EXISTS usage_units_per_minute_local ON CLUSTER throttlex (
    api_key_id      String,
    bucket          DateTime('UTC'),
    kafka_partition UInt16,
    billable_units  SimpleAggregateFunction(sum, UInt64),
    top_offset      SimpleAggregateFunction(max, UInt64)
)
ENGINE = ReplicatedAggregatingMergeTree('/clickhouse/tables/{shard}/{database}/usage_units_per_minute_local', '{replica}')
PARTITION BY toYYYYMM(bucket)
ORDER BY (api_key_id, bucket, kafka_partition)
SETTINGS non_replicated_deduplication_window = 1000;

CREATE TABLE IF NOT EXISTS usage_units_per_minute ON CLUSTER throttlex AS usage_units_per_minute_local
ENGINE = Distributed(throttlex, currentDatabase(), usage_units_per_minute_local, cityHash64(api_key_id));

TRUNCATE TABLE usage_units_per_minute_local ON CLUSTER throttlex;

INSERT INTO usage_units_per_minute
SELECT api_key_id, toStartOfMinute(event_time) AS bucket, kafka_partition,
       sumIf(cost, NOT usage_events.edge_blocked) AS billable_units, max(kafka_offset) AS top_offset
FROM usage_events
GROUP BY api_key_id, bucket, kafka_partition
SETTINGS distributed_foreground_insert = 1;

CREATE MATERIALIZED VIEW IF NOT EXISTS usage_units_per_minute_mv ON CLUSTER throttlex TO usage_units_per_minute_local AS
SELECT api_key_id, toStartOfMinute(event_time) AS bucket, kafka_partition,
       sumIf(cost, NOT usage_events_local.edge_blocked) AS billable_units, max(kafka_offset) AS top_offset
FROM usage_events_local
GROUP BY api_key_id, bucket, kafka_partition;

ALTER TABLE usage_events_local ON CLUSTER throttlex MODIFY SETTING non_replicated_deduplication_window = 10000,
    replicated_deduplication_window = 10000, replicated_deduplication_window_seconds = 604800;

ALTER TABLE usage_per_minute_local ON CLUSTER throttlex MODIFY SETTING non_replicated_deduplication_window = 10000,
    replicated_deduplication_window = 10000, replicated_deduplication_window_seconds = 604800;

ALTER TABLE usage_per_hour_local ON CLUSTER throttlex MODIFY SETTING non_replicated_deduplication_window = 10000,
    replicated_deduplication_window = 10000, replicated_deduplication_window_seconds = 604800;

ALTER TABLE usage_per_day_local ON CLUSTER throttlex MODIFY SETTING non_replicated_deduplication_window = 10000,
    replicated_deduplication_window = 10000, replicated_deduplication_window_seconds = 604800;

ALTER TABLE usage_units_per_minute_local ON CLUSTER throttlex MODIFY SETTING non_replicated_deduplication_window = 10000,
    replicated_deduplication_window = 10000, replicated_deduplication_window_seconds = 604800;

ALTER TABLE usage_events_local ON CLUSTER throttlex ADD COLUMN IF NOT EXISTS source LowCardinality(String) DEFAULT '' AFTER plan;

ALTER TABLE usage_events ON CLUSTER throttlex ADD COLUMN IF NOT EXISTS source LowCardinality(String) DEFAULT '' AFTER plan;

ALTER TABLE usage_events_local ON CLUSTER throttlex ADD COLUMN IF NOT EXISTS appended_at DateTime64(3, 'UTC') DEFAULT inserted_at AFTER kafka_offset;

ALTER TABLE usage_events ON CLUSTER throttlex ADD COLUMN IF NOT EXISTS appended_at DateTime64(3, 'UTC') DEFAULT inserted_at AFTER kafka_offset;

CREATE TABLE IF NOT EXISTS sink_progress_local ON CLUSTER throttlex (
    kafka_partition UInt16,
    next_offset     SimpleAggregateFunction(max, UInt64)
)
ENGINE = ReplicatedAggregatingMergeTree('/clickhouse/tables/{shard}/{database}/sink_progress_local', '{replica}')
ORDER BY kafka_partition
SETTINGS non_replicated_deduplication_window = 10000, replicated_deduplication_window = 10000,
    replicated_deduplication_window_seconds = 604800;

CREATE TABLE IF NOT EXISTS sink_progress ON CLUSTER throttlex AS sink_progress_local
ENGINE = Distributed(throttlex, currentDatabase(), sink_progress_local, kafka_partition);

CREATE MATERIALIZED VIEW IF NOT EXISTS sink_progress_mv ON CLUSTER throttlex TO sink_progress_local AS
SELECT kafka_partition, max(kafka_offset) + 1 AS next_offset
FROM usage_events_local
GROUP BY kafka_partition;

INSERT INTO sink_progress
SELECT kafka_partition, max(kafka_offset) + 1 AS next_offset
FROM usage_events
GROUP BY kafka_partition
SETTINGS distributed_foreground_insert = 1;

ALTER TABLE usage_events_local ON CLUSTER throttlex ADD COLUMN IF NOT EXISTS stage LowCardinality(String) DEFAULT 'response' AFTER source;

ALTER TABLE usage_events ON CLUSTER throttlex ADD COLUMN IF NOT EXISTS stage LowCardinality(String) DEFAULT 'response' AFTER source;

