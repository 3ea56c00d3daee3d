"""Gateway side of ThrottleX (`throttlex.ingest`): the event contract, the Kafka producer, the edge denylist
and key caches, and the ASGI and WSGI middleware.

This package depends on nothing else in ThrottleX; `throttlex.processors` and `throttlex.api` import its
contract modules (`throttlex.ingest.events`, `throttlex.ingest.denylist_entries`).
"""

if __name__ != "throttlex.ingest":  # imported from a checkout's top level: a second copy of every module and metric
    raise ImportError(f"import ThrottleX as throttlex.ingest, not {__name__} (install the checkout: pip install -e .)")
