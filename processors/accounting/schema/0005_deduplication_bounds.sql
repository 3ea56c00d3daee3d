-- The bounds of exactly-once (README, "Accounting"): a batch replayed after a crash is dropped as a
-- duplicate while its token is among the last 10,000 inserts into each table. Replicated tables (and
-- ClickHouse Cloud, which turns MergeTree into SharedMergeTree) also forget tokens older than
-- replicated_deduplication_window_seconds, one hour by default: shorter than a sink may be down, so
-- it is set to 7 days here. On a plain MergeTree the replicated_* settings are kept and have no effect.
ALTER TABLE usage_events MODIFY SETTING non_replicated_deduplication_window = 10000,
    replicated_deduplication_window = 10000, replicated_deduplication_window_seconds = 604800;
ALTER TABLE usage_per_minute MODIFY SETTING non_replicated_deduplication_window = 10000,
    replicated_deduplication_window = 10000, replicated_deduplication_window_seconds = 604800;
ALTER TABLE usage_per_hour MODIFY SETTING non_replicated_deduplication_window = 10000,
    replicated_deduplication_window = 10000, replicated_deduplication_window_seconds = 604800;
ALTER TABLE usage_per_day MODIFY SETTING non_replicated_deduplication_window = 10000,
    replicated_deduplication_window = 10000, replicated_deduplication_window_seconds = 604800;
ALTER TABLE usage_units_per_minute MODIFY SETTING non_replicated_deduplication_window = 10000,
    replicated_deduplication_window = 10000, replicated_deduplication_window_seconds = 604800
