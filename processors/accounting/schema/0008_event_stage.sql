-- Whether an event was written when the gateway saw the response ('response', every gateway middleware's) or
-- at a rate-limit check before the upstream answered ('check': throttlex-rls, asked by Envoy, which knows no
-- upstream status, latency or size). Limits and billing count both; latency and error figures read 'response'.
-- An expansion only: a sink of the previous version inserts without it and the row is a 'response'.
ALTER TABLE usage_events ADD COLUMN IF NOT EXISTS stage LowCardinality(String) DEFAULT 'response' AFTER source;
