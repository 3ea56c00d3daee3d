-- When Kafka appended each event's record (the brokers' clock), beside the gateway's event_time and the
-- insert time: enforcement counts events by it, billing keeps event_time (docs/time.md). An expansion only:
-- a sink of the previous version inserts without it and the row takes its insert time, the nearest bound known.
ALTER TABLE usage_events ADD COLUMN IF NOT EXISTS appended_at DateTime64(3, 'UTC') DEFAULT inserted_at AFTER kafka_offset;

-- Where the sink is in each events partition, kept with the rows it stored: the offset after the highest one
-- stored. The sink resumes from here whenever Kafka has no committed offset for the partition (a new group, or
-- offsets expired while the group was idle longer than offsets.retention.minutes) or one behind it (a commit
-- that never landed): the stored rows, not the deduplication window, decide what is stored already.
CREATE TABLE IF NOT EXISTS sink_progress
(
    kafka_partition UInt16,
    next_offset     SimpleAggregateFunction(max, UInt64)
)
ENGINE = AggregatingMergeTree
ORDER BY kafka_partition
SETTINGS non_replicated_deduplication_window = 10000, replicated_deduplication_window = 10000,
    replicated_deduplication_window_seconds = 604800;

CREATE MATERIALIZED VIEW IF NOT EXISTS sink_progress_mv TO sink_progress AS
SELECT kafka_partition, max(kafka_offset) + 1 AS next_offset
FROM usage_events
GROUP BY kafka_partition;

-- Rows stored before this version (the view counts only later inserts; max() takes both).
INSERT INTO sink_progress
SELECT kafka_partition, max(kafka_offset) + 1 AS next_offset
FROM usage_events
GROUP BY kafka_partition;
