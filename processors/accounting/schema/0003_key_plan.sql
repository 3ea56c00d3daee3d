-- The calling key's plan, as the gateway knew it ('' = the deployment's default plan), so usage can be
-- billed and backtested per plan.
ALTER TABLE usage_events ADD COLUMN IF NOT EXISTS plan LowCardinality(String) DEFAULT '' AFTER edge_blocked;
