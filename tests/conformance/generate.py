"""Write `vectors.json`: the contracts the Python side and the Envoy rate-limit service (Go, `ingest/rls`)
must agree on, computed by the Python implementation. Both test suites read the file
(`tests/unit/test_conformance.py`, `ingest/rls/contract/contract_test.go`), so a change to a contract on
either side fails the other side's tests until the vectors are written again and both agree.

    .venv/bin/python -m tests.conformance.generate
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

from aiokafka.partitioner import murmur2

from throttlex.api.envoy_import import DESCRIPTOR_ROLES
from throttlex.ingest import events
from throttlex.ingest.client_address import ClientAddress
from throttlex.ingest.denylist_entries import Block, encode_block, request_limit_key

PATH = Path(__file__).with_name("vectors.json")
SALT = "conformance-salt"
API_KEYS = ["tx_live_4f9a0c2e7d1b", "", "k", "ключ-ünïcödé-🔑", "x" * 300, "key with spaces\tand\ttabs"]
LIMIT_KEYS = [
    (("api_key",), {"api_key": "3f9a6b0c1d2e3f4a5b6c7d8e"}),
    (("tenant", "route"), {"tenant": "acme", "route": "/v1/search/{id}"}),
    (("api_key", "tenant", "ip", "route", "method"),
     {"api_key": "ab", "tenant": "t", "ip": "2001:db8::1", "route": "/r", "method": "GET"}),
    (("ip",), {}),
    (("tenant", "method"), {"tenant": "a|b=c", "method": "POST"}),
]  # fmt: skip
BLOCKS = [
    Block(limit_key="api_key=3f9a6b0c1d2e3f4a5b6c7d8e", until_ms=1_765_000_000_000, policy="per-key-minute",
          published_ms=1_764_999_999_000),
    Block(limit_key="tenant=acme|route=/v1/search/{id}", until_ms=1_765_000_060_000, policy="search",
          published_ms=0, dims=("tenant", "route")),
]  # fmt: skip
EVENTS = [
    events.UsageEvent(event_id=uuid.UUID("0c8f5d2a-7b3e-4f1a-9c6d-2e4b8a1f3d5c"), event_time_ms=1_765_000_000_123,
                      api_key_id="3f9a6b0c1d2e3f4a5b6c7d8e", tenant="acme", route="/v1/search/{id}", method="GET",
                      status=200, latency_ms=0.0, response_bytes=0, cost=3, client_ip="203.0.113.7",
                      plan="pro", source="rls:edge-1", stage="check"),
    events.UsageEvent(event_id=uuid.UUID("9a1b2c3d-4e5f-4a6b-8c7d-0e1f2a3b4c5d"), event_time_ms=1_765_000_000_456,
                      api_key_id="ab", tenant="default", route="other", method="POST", status=429, latency_ms=0.0,
                      response_bytes=0, edge_blocked=True, source="rls:edge-1", stage="check"),
    events.UsageEvent(event_id=uuid.UUID("1d2e3f40-5a6b-4c7d-8e9f-a0b1c2d3e4f5"), event_time_ms=1_765_000_000_789,
                      api_key_id="3f9a6b0c1d2e3f4a5b6c7d8e", tenant="acme", route="/v1/items/{item_id}", method="GET",
                      status=503, latency_ms=12.5, response_bytes=2048, client_ip="2001:db8::7", source="gateway:web-1"),
]  # fmt: skip
PARTITION_KEYS = ["3f9a6b0c1d2e3f4a5b6c7d8e", "ab", "", "partitioned-7", "ключ", "x" * 100]
PARTITION_COUNTS = [1, 4, 12, 31]
CLIENTS = [  # trusted proxies, peer, X-Forwarded-For, Forwarded
    ([], "198.51.100.9", "203.0.113.7", None),
    (["10.0.0.0/8"], "10.1.2.3", "203.0.113.7, 10.9.9.9", None),
    (["10.0.0.0/8"], "10.1.2.3", "6.6.6.6, 203.0.113.7", None),
    (["10.0.0.0/8"], "198.51.100.9", "203.0.113.7", None),
    (["10.0.0.0/8"], "10.1.2.3", None, 'for="[2001:db8::7]:4711";proto=https'),
    (["10.0.0.0/8"], "10.1.2.3", "garbage, 10.2.2.2", None),
    (["10.0.0.0/8"], "10.1.2.3", "10.3.3.3, 10.2.2.2", None),
    (["10.0.0.0/8", "2001:db8::/32"], "10.1.2.3", "203.0.113.7:5555", None),
    (["10.0.0.0/8"], "10.1.2.3", None, None),
]  # fmt: skip


def vectors() -> dict[str, object]:
    salt = SALT.encode()
    return {
        "salt": SALT,
        "key_ids": [{"api_key": key, "key_id": events.key_id_for(key, salt)} for key in API_KEYS],
        "limit_keys": [{"dims": list(dims), "values": values, "limit_key": request_limit_key(dims, values)}
                       for dims, values in LIMIT_KEYS],  # fmt: skip
        "blocks": [json.loads(encode_block(block)) for block in BLOCKS],
        "events": [json.loads(events.encode(event)) for event in EVENTS],
        "partitions": [{"key": key, "partitions": count, "partition": (murmur2(key.encode()) & 0x7FFFFFFF) % count}
                       for key in PARTITION_KEYS for count in PARTITION_COUNTS],  # fmt: skip
        "descriptor_roles": DESCRIPTOR_ROLES,
        "client_addresses": [
            {"trusted_proxies": trusted, "peer": peer, "x_forwarded_for": xff, "forwarded": forwarded,
             "client": ClientAddress(trusted).of(peer, xff, forwarded)}
            for trusted, peer, xff, forwarded in CLIENTS
        ],  # fmt: skip
    }


def main() -> None:
    PATH.write_text(json.dumps(vectors(), indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {PATH}")


if __name__ == "__main__":
    main()
