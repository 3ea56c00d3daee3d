"""Stream side of ThrottleX, in three parts:

- `processors.core` — the policy core, pure: policies, window arithmetic, the engine, dry-runs;
- `processors.worker` — the stream worker: consumer loop, partition state and its changelog,
  regrouping, the denylist writer and live usage in Redis;
- `processors.accounting` — usage in ClickHouse: the sink, the store and its schema, queries,
  reconciliation.

Beside them: settings and metrics of these roles, Kafka topic creation and lag, the registry of keys,
plans and policies, and the policy file watch. Depends on `ingest` only for its contract modules
(`ingest.events`, `ingest.denylist_entries`); never on `api`.
"""
