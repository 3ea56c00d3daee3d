-- Who sent an event that did not come from a gateway's middleware: 'ingest:<token name>' for events posted
-- to POST /v1/events with a named ingest token ('' for the middleware's own events).
ALTER TABLE usage_events ADD COLUMN IF NOT EXISTS source LowCardinality(String) DEFAULT '' AFTER plan;
