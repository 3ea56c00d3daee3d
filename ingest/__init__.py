"""Gateway side of ThrottleX: the event contract, the Kafka producer, the edge denylist and the ASGI middleware.

This package depends on nothing else in ThrottleX; `processors` and `api` import its contract modules
(`ingest.events`, `ingest.denylist_entries`).
"""
