"""Stream side of ThrottleX: the policy engine, the Faust worker, the denylist writer and the usage sink.

Depends on `ingest` only for its contract modules (`ingest.events`, `ingest.blocklist`); never on `api`.
"""
