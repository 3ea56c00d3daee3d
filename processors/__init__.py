"""Stream side of ThrottleX (`throttlex.processors`), in three parts:

- `throttlex.processors.core` — the policy core, pure: policies, window arithmetic, the engine, dry-runs;
- `throttlex.processors.worker` — the stream worker: consumer loop, partition state and its changelog,
  regrouping, the denylist writer and live usage in Redis;
- `throttlex.processors.accounting` — usage in ClickHouse: the sink, the store and its schema, queries,
  reconciliation, analysts' read-only SQL.

Beside them: settings and metrics of these roles, Kafka topic creation and lag, the registry of keys,
plans and policies, and the policy file watch. Depends on `throttlex.ingest` only for its contract
modules (`throttlex.ingest.events`, `throttlex.ingest.denylist_entries`); never on `throttlex.api`.
"""

if __name__ != "throttlex.processors":  # imported from a checkout's top level: a second copy of every module and metric
    raise ImportError(f"import ThrottleX as throttlex.processors, not {__name__} (install the checkout: pip install -e .)")
