"""Accounting: every event stored once in ClickHouse (the sink), the schema and its migrations, usage
queries, exact plan usage, and reconciliation of live counts against the stored ones."""
