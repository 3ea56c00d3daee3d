"""The contracts the Envoy rate-limit service (Go, `ingest/rls`) shares with the Python roles, as
`tests/conformance/vectors.json` states them: this side must still compute every vector; `go test` in
`ingest/rls` checks the Go side against the same file. A deliberate change to a contract is made by writing
the vectors again (``python -m tests.conformance.generate``), which then fails the Go side until it agrees."""

from __future__ import annotations

import json

from throttlex.ingest import events
from tests.conformance.generate import PATH, vectors


def test_the_python_roles_compute_every_conformance_vector() -> None:
    assert json.loads(PATH.read_text()) == vectors(), "a shared contract changed: python -m tests.conformance.generate"


def test_every_event_vector_is_a_valid_event_of_the_contract() -> None:
    for raw in json.loads(PATH.read_text())["events"]:
        assert json.loads(events.encode(events.decode(json.dumps(raw).encode()))) == raw


def test_the_vectors_cover_both_stages_and_the_edge_cases_of_each_contract() -> None:
    stated = json.loads(PATH.read_text())
    assert {event["stage"] for event in stated["events"]} == {"response", "check"}
    assert any(not case["api_key"] for case in stated["key_ids"]) and any(len(case["api_key"]) > 128 for case in stated["key_ids"])
    assert len({case["partition"] for case in stated["partitions"] if case["partitions"] == 31}) > 1
    assert any(case["client"] != case["peer"] for case in stated["client_addresses"])
    assert any(case["client"] == case["peer"] and case["trusted_proxies"] for case in stated["client_addresses"])
