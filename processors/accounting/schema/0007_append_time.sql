-- When Kafka appended each event's record (the brokers' clock), beside the gateway's event_time and the
-- insert time: enforcement counts events by it, billing keeps event_time (docs/time.md). An expansion only:
-- a sink of the previous version inserts without it and the row takes its insert time, the nearest bound known.
ALTER TABLE usage_events ADD COLUMN IF NOT EXISTS appended_at DateTime64(3, 'UTC') DEFAULT inserted_at AFTER kafka_offset;
