"""Keys, plans and policies through the admin API, against `throttlex run` and `throttlex gateway` on
real Kafka, Redis and chDB: the authorisation matrix, revocation at the edge, live plan and policy
changes, the dry-run against a brute-force computation, and no plain key left anywhere."""

from __future__ import annotations

import asyncio
import json
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from redis.asyncio import Redis

from throttlex.ingest.events import UsageEvent, encode
from throttlex.processors.accounting.store import UsageStore
from tests.conftest import RoleProcess, Sandbox, stop_role
from tests.e2e.deployment import INGEST, OPS, POLICIES, admin, create_key, start_deployment, wait_healthy
from tests.factories import make_event

pytestmark = pytest.mark.e2e

# Stored history for the dry-run: 2026-11-02 10:00 to 10:05 UTC.
HISTORY_START = datetime(2026, 11, 2, 10, 0, tzinfo=UTC)
HISTORY_MS = int(HISTORY_START.timestamp() * 1000)
DRY_RUN_LIMIT, DRY_RUN_WINDOW_S = 5, 10


@dataclass
class Deployment:
    sandbox: Sandbox
    api_url: str
    gateway_url: str
    run: RoleProcess
    gateway: RoleProcess
    keys: dict[str, dict[str, Any]] = field(default_factory=dict)
    """name → the admin API's answer to its creation (``key`` is the plain key)."""
    history: list[UsageEvent] = field(default_factory=list)

    @property
    def plain_keys(self) -> list[str]:
        return [key["key"] for key in self.keys.values()]


@pytest.fixture(scope="module")
def deployment(service_addresses: tuple[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    kafka, redis_url = service_addresses
    sandbox = Sandbox(kafka_bootstrap=kafka, redis_url=redis_url, root=Path(tmp_path_factory.mktemp("admin")))
    run, gateway, api_url, gateway_url = start_deployment(sandbox)
    deployment = Deployment(sandbox, api_url, gateway_url, run, gateway)
    try:
        with httpx.Client(base_url=api_url, timeout=10) as api:
            wait_healthy(api, run)
            deployment.keys["own"] = create_key(api, tenant="acme", name="own")
            deployment.keys["other"] = create_key(api, tenant="globex", plan="pro")
            deployment.keys["revoked"] = create_key(api, tenant="acme")
            assert api.delete(f"/v1/admin/keys/{deployment.keys['revoked']['key_id']}", headers=admin()).status_code == 200
            deployment.history = dry_run_history(deployment.keys["own"], deployment.keys["other"])
            body = b"[" + b",".join(encode(e) for e in deployment.history) + b"]"
            response = api.post("/v1/events", content=body, headers={"authorization": f"Bearer {INGEST}"})
            assert response.status_code == 202 and response.json()["accepted"] == len(deployment.history), response.text
            stored_by = time.monotonic() + 60
            while stored_requests(api) != len(deployment.history):
                assert time.monotonic() < stored_by, "the sink did not store the history"
                time.sleep(0.3)
        with httpx.Client(base_url=gateway_url, timeout=10) as client:
            wait_healthy(client, gateway, "/metrics")
        yield deployment
    finally:
        stop_role(gateway)
        stop_role(run)


def dry_run_history(*keys: dict[str, Any]) -> list[UsageEvent]:
    """Bursts and pauses of two keys (each under its own tenant) over five minutes, on whole and fractional
    milliseconds."""
    events = []
    for n, key in enumerate(keys):
        t = HISTORY_MS + n * 700
        for step in range(120):
            t += (250, 400, 1300, 90, 3000, 600)[(step + n) % 6] * (1 + (step // 40) % 2)
            events.append(
                make_event(event_id=uuid.uuid4(), api_key_id=key["key_id"], tenant=key["tenant"], event_time_ms=t,
                           cost=1 + step % 2, plan=key["plan"] or "")
            )
    return events


def stored_requests(api: httpx.Client) -> int:
    params = {"from": "2026-11-02T00:00:00Z", "to": "2026-11-03T00:00:00Z", "granularity": "day"}
    response = api.get("/v1/usage", params=params, headers=admin())
    return sum(row["requests"] for row in response.json()["rows"]) if response.status_code == 200 else -1


@pytest.fixture
def api(deployment: Deployment) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=deployment.api_url, timeout=10) as client:
        yield client


@pytest.fixture
def gateway(deployment: Deployment) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=deployment.gateway_url, timeout=10) as client:
        yield client


CREDENTIALS = ("none", "bad key", "revoked key", "other tenant's key", "own key", "admin")


def credential_headers(deployment: Deployment, credential: str) -> dict[str, str]:
    return {
        "none": {},
        "bad key": {"x-api-key": "tx_not-a-key-anyone-was-given"},
        "revoked key": {"x-api-key": deployment.keys["revoked"]["key"]},
        "other tenant's key": {"x-api-key": deployment.keys["other"]["key"]},
        "own key": {"x-api-key": deployment.keys["own"]["key"]},
        "admin": admin(),
    }[credential]


def test_authorisation_matrix(deployment: Deployment, api: httpx.Client) -> None:
    own = deployment.keys["own"]["key_id"]
    day = {"from": "2026-11-02T00:00:00Z", "to": "2026-11-03T00:00:00Z", "granularity": "day"}
    plans = api.get("/v1/admin/plans", headers=admin()).json()
    policies = {"policies": api.get("/v1/admin/policies", headers=admin()).json()["policies"]}
    proposal = {"policy": policies["policies"][0], "from": "2026-11-02T10:00:00Z", "to": "2026-11-02T10:05:00Z"}
    A = (401, 401, 401, 403, 403)  # admin endpoints: no, bad or revoked credential; then either key
    matrix: list[tuple[str, str, dict[str, Any], tuple[int, ...]]] = [
        ("GET", "/healthz", {}, (200,) * 6),
        ("GET", "/v1/quota", {}, (401, 401, 401, 200, 200, 400)),
        ("GET", "/v1/usage", {"params": day}, (401, 401, 401, 200, 200, 200)),
        ("GET", "/v1/usage", {"params": {**day, "api_key_id": own}}, (401, 401, 401, 403, 200, 200)),
        ("GET", "/v1/usage/export", {"params": {"period": "2026-11"}}, (401, 401, 401, 200, 200, 200)),
        ("POST", "/v1/events", {"content": b"[]"}, (401, 401, 401, 401, 401, 202)),
        ("GET", "/v1/admin/keys", {}, (*A, 200)),
        ("POST", "/v1/admin/keys", {"json": {"tenant": "matrix"}}, (*A, 201)),
        ("GET", "/v1/admin/keys/{own}", {}, (*A, 200)),
        ("PATCH", "/v1/admin/keys/{own}", {"json": {"name": "own"}}, (*A, 200)),
        ("DELETE", "/v1/admin/keys/{victim}", {}, (*A, 200)),
        ("GET", "/v1/admin/plans", {}, (*A, 200)),
        ("PUT", "/v1/admin/plans", {"json": plans}, (*A, 200)),
        ("GET", "/v1/admin/policies", {}, (*A, 200)),
        ("PUT", "/v1/admin/policies", {"json": policies}, (*A, 200)),
        ("GET", "/v1/admin/policies/per-key/dry-run", {"params": {"from": "2026-11-02T10:00:00Z", "to": "2026-11-02T10:05:00Z"}}, (*A, 200)),
        ("POST", "/v1/admin/policies/dry-run", {"json": proposal}, (*A, 200)),
    ]
    got, lines = [], []
    for method, path, request, expected in matrix:
        statuses = []
        for credential in CREDENTIALS:
            target = path.replace("{own}", own)
            if "{victim}" in path:  # a key of its own for each call, so every call has one to revoke
                target = path.format(victim=create_key(api, tenant="victims")["key_id"])
            response = api.request(method, target, headers=credential_headers(deployment, credential), **request)
            statuses.append(response.status_code)
            if response.status_code >= 400:
                assert "detail" in response.json(), response.text  # every refusal says why
        got.append(tuple(statuses))
        shown = path + ("?api_key_id=<own key>" if "api_key_id" in request.get("params", {}) else "")
        lines.append(f"| {method} {shown} | " + " | ".join(map(str, statuses)) + " |")
    print("\n| endpoint | " + " | ".join(CREDENTIALS) + " |\n|---|" + "---|" * len(CREDENTIALS))
    print("\n".join(lines))
    assert got == [expected for *_, expected in matrix]


def test_a_tenant_in_the_query_cannot_widen_what_a_key_sees(deployment: Deployment, api: httpx.Client) -> None:
    params = {"from": "2026-11-02T00:00:00Z", "to": "2026-11-03T00:00:00Z", "granularity": "day", "group_by": "api_key_id"}
    other = credential_headers(deployment, "other tenant's key")
    rows = api.get("/v1/usage", params={**params, "tenant": "acme"}, headers=other).json()["rows"]
    assert {row["api_key_id"] for row in rows} <= {deployment.keys["other"]["key_id"]}
    everyone = api.get("/v1/usage", params=params, headers=admin()).json()["rows"]
    assert {row["api_key_id"] for row in everyone} == {deployment.keys["own"]["key_id"], deployment.keys["other"]["key_id"]}
    acme = api.get("/v1/usage", params={**params, "tenant": "acme"}, headers=admin()).json()["rows"]
    assert {row["api_key_id"] for row in acme} == {deployment.keys["own"]["key_id"]}


def test_gateway_refuses_unknown_revoked_and_expired_keys(deployment: Deployment, api: httpx.Client, gateway: httpx.Client) -> None:
    key = create_key(api, tenant="acme", name="to revoke")
    deployment.keys["gateway"] = key
    assert gateway.get("/v1/items/1", headers={"x-api-key": key["key"]}).status_code == 200
    assert gateway.get("/v1/items/1", headers={"x-api-key": "tx_unknown"}).status_code == 401
    assert gateway.get("/v1/items/1").status_code == 401
    assert gateway.get("/v1/items/1", headers=credential_headers(deployment, "revoked key")).status_code == 401

    revoked_at = time.monotonic()
    assert api.delete(f"/v1/admin/keys/{key['key_id']}", headers=admin()).status_code == 200
    while gateway.get("/v1/items/1", headers={"x-api-key": key["key"]}).status_code != 401:
        assert time.monotonic() - revoked_at < 1.0, "the revoked key still passes the gateway after 1 s"
    print(f"revoked key refused by the gateway {(time.monotonic() - revoked_at) * 1000:.0f} ms after DELETE returned")

    suspended = create_key(api, tenant="acme")
    deployment.keys["suspended"] = suspended
    assert api.patch(f"/v1/admin/keys/{suspended['key_id']}", json={"status": "suspended"}, headers=admin()).status_code == 200
    assert gateway.get("/v1/items/1", headers={"x-api-key": suspended["key"]}).status_code == 401
    assert api.patch(f"/v1/admin/keys/{suspended['key_id']}", json={"status": "active"}, headers=admin()).status_code == 200
    deadline = time.monotonic() + 1
    while gateway.get("/v1/items/1", headers={"x-api-key": suspended["key"]}).status_code != 200:
        assert time.monotonic() < deadline, "the reactivated key is still refused after 1 s"

    expires_at = time.time() + 2
    expiring = create_key(api, tenant="acme", expires_at=datetime.fromtimestamp(expires_at, tz=UTC).isoformat())
    deployment.keys["expiring"] = expiring
    assert gateway.get("/v1/items/1", headers={"x-api-key": expiring["key"]}).status_code == 200
    while (status := gateway.get("/v1/items/1", headers={"x-api-key": expiring["key"]}).status_code) == 200:
        assert time.time() < expires_at + 1, "the expired key is still admitted 1 s after its expiry"
        time.sleep(0.05)
    assert status == 401 and time.time() >= expires_at, "refused before its expiry"
    assert api.get("/v1/quota", headers={"x-api-key": expiring["key"]}).status_code == 401


def test_keys_are_listed_with_filters_and_pages(deployment: Deployment, api: httpx.Client) -> None:
    made = {create_key(api, tenant="paged", plan="pro")["key_id"] for _ in range(5)}
    seen: list[str] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"tenant": "paged", "limit": 2, **({"cursor": cursor} if cursor else {})}
        page = api.get("/v1/admin/keys", params=params, headers=admin()).json()
        assert len(page["keys"]) <= 2
        seen += [key["key_id"] for key in page["keys"]]
        assert all(key["plan"] == "pro" and key["tenant"] == "paged" and "key" not in key for key in page["keys"])
        if (cursor := page["next_cursor"]) is None:
            break
    assert sorted(seen) == sorted(made)
    revoked = api.get("/v1/admin/keys", params={"status": "revoked"}, headers=admin()).json()["keys"]
    assert deployment.keys["revoked"]["key_id"] in {key["key_id"] for key in revoked}
    assert api.post("/v1/admin/keys", json={"tenant": "acme", "plan": "gold"}, headers=admin()).status_code == 422
    assert api.patch(f"/v1/admin/keys/{deployment.keys['revoked']['key_id']}", json={"status": "active"}, headers=admin()).status_code == 409
    assert api.get(f"/v1/admin/keys/{'0' * 24}", headers=admin()).status_code == 404


def test_a_plan_change_shows_in_the_quota_report(deployment: Deployment, api: httpx.Client) -> None:
    key = create_key(api, tenant="acme")
    deployment.keys["plan-change"] = key
    headers = {"x-api-key": key["key"]}
    assert api.get("/v1/quota", headers=headers).json()["plan"]["plan"] == "free"
    assert api.patch(f"/v1/admin/keys/{key['key_id']}", json={"plan": "pro"}, headers=admin()).status_code == 200
    report = api.get("/v1/quota", headers=headers).json()["plan"]
    assert (report["plan"], report["limit_units"]) == ("pro", 100_000)

    plans = {"plans": {"free": {"monthly_units": 1000}, "pro": {"monthly_units": 250_000}}, "default_plan": "free"}
    assert api.put("/v1/admin/plans", json=plans, headers=admin()).status_code == 200
    assert api.get("/v1/quota", headers=headers).json()["plan"]["limit_units"] == 250_000
    bad = api.put("/v1/admin/plans", json={"plans": {"pro": {"monthly_units": 5}}, "default_plan": "free"}, headers=admin())
    assert bad.status_code == 422 and "default_plan 'free'" in bad.json()["detail"]


def test_two_admins_changing_plans_and_policies_at_once_do_not_revert_each_other(
    deployment: Deployment, api: httpx.Client
) -> None:
    """Both read the document, both change it on top of what they read: the second gets 409 instead of
    silently putting back what the first removed. Every read says the version, in the body and the ETag."""
    plans = api.get("/v1/admin/plans", headers=admin()).json()
    policies = api.get("/v1/admin/policies", headers=admin())
    read = policies.json()["version"]
    assert plans["version"] == read and policies.headers["etag"] == f'"{read}"'
    first = {"plans": {**plans["plans"], "first-admins": {"monthly_units": 7}}, "default_plan": plans["default_plan"]}
    second = {"plans": {**plans["plans"], "second-admins": {"monthly_units": 9}}, "default_plan": plans["default_plan"]}
    made = api.put("/v1/admin/plans", json=first, headers={**admin(), "if-match": f'"{read}"'})
    assert made.status_code == 200 and made.json()["version"] == read + 1, made.text
    lost = api.put("/v1/admin/plans", json=second, headers={**admin(OPS), "if-match": f'"{read}"'})
    assert lost.status_code == 409 and f"version {read + 1} is in force" in lost.json()["detail"]
    stale_policies = api.put("/v1/admin/policies", json={"policies": policies.json()["policies"]},
                             headers={**admin(OPS), "if-match": str(read)})  # fmt: skip
    assert stale_policies.status_code == 409  # one document, one version: plans and policies alike
    now = api.get("/v1/admin/plans", headers=admin()).json()
    assert "first-admins" in now["plans"] and "second-admins" not in now["plans"] and now["version"] == read + 1


def test_a_plan_that_keys_use_is_removed_only_with_somewhere_for_its_keys_to_go(
    deployment: Deployment, api: httpx.Client
) -> None:
    plans = api.get("/v1/admin/plans", headers=admin()).json()
    with_trial = {"plans": {**plans["plans"], "trial": {"monthly_units": 50}}, "default_plan": plans["default_plan"]}
    assert api.put("/v1/admin/plans", json=with_trial, headers=admin()).status_code == 200
    keys = [create_key(api, tenant="trialists", plan="trial") for _ in range(2)]
    without_trial = {"plans": plans["plans"], "default_plan": plans["default_plan"]}
    refused = api.put("/v1/admin/plans", json=without_trial, headers=admin())
    assert refused.status_code == 409 and "2 keys still use plan(s) trial" in refused.json()["detail"], refused.text
    assert "trial" in api.get("/v1/admin/plans", headers=admin()).json()["plans"]  # nothing changed
    nowhere = api.put("/v1/admin/plans", params={"move_keys_to": "trial"}, json=without_trial, headers=admin())
    assert nowhere.status_code == 422 and nowhere.json()["detail"].startswith("move_keys_to:")
    moved = api.put("/v1/admin/plans", params={"move_keys_to": "pro"}, json=without_trial, headers=admin())
    assert moved.status_code == 200, moved.text
    assert {api.get(f"/v1/admin/keys/{key['key_id']}", headers=admin()).json()["plan"] for key in keys} == {"pro"}
    assert api.get("/v1/quota", headers={"x-api-key": keys[0]["key"]}).json()["plan"]["plan"] == "pro"


def test_a_policy_put_through_the_api_blocks_at_the_gateway_within_5_seconds(
    deployment: Deployment, api: httpx.Client, gateway: httpx.Client
) -> None:
    key = create_key(api, tenant="acme")
    deployment.keys["policy"] = key
    headers = {"x-api-key": key["key"]}
    for _ in range(5):
        assert gateway.get("/v1/search", headers=headers).status_code == 200  # no policy on searches yet
    current = api.get("/v1/admin/policies", headers=admin()).json()["policies"]
    tight = {"name": "searches", "match": {"routes": ["/v1/search"]}, "key": ["api_key", "route"],
             "algorithm": {"type": "sliding_window", "limit": 3, "window_s": 60, "bucket_s": 1}}  # fmt: skip
    broken = api.put("/v1/admin/policies", json={"policies": [*current, {**tight, "key": ["nose"]}]}, headers=admin())
    assert broken.status_code == 422
    response = api.put("/v1/admin/policies", json={"policies": [*current, tight]}, headers=admin())
    assert response.status_code == 200 and response.json()["origin"] == "registry"
    put_at = time.monotonic()
    while gateway.get("/v1/search", headers=headers).status_code != 429:
        assert time.monotonic() - put_at < 5, "the new policy did not block at the gateway within 5 s"
        time.sleep(0.1)
    print(f"new policy enforced at the gateway {time.monotonic() - put_at:.2f} s after PUT returned")
    assert gateway.get("/v1/items/1", headers=headers).status_code == 200  # other routes: still admitted


def brute_force_blocks(events: list[UsageEvent], limit: int, window_s: int) -> dict[str, list[tuple[int, int]]]:
    """Per key: a sliding window of whole seconds, over the admitted events, in time order; a key is
    blocked from the event that brings it to ``limit`` until enough seconds have left the window."""
    blocks: dict[str, list[tuple[int, int]]] = {}
    admitted: dict[str, list[tuple[int, int]]] = {}  # key → (second, cost)
    for event in sorted(events, key=lambda e: e.event_time_ms):
        key = f"api_key={event.api_key_id}"
        if blocks.get(key) and blocks[key][-1][1] > event.event_time_ms:
            continue
        second = event.event_time_ms // 1000
        admitted.setdefault(key, []).append((second, event.cost))

        def used_in_window_ending(s: int) -> int:
            return sum(cost for t, cost in admitted[key] if s - window_s < t <= s)

        if used_in_window_ending(second) >= limit:
            later = next(s for s in range(second + 1, second + window_s + 1) if used_in_window_ending(s) < limit)
            blocks.setdefault(key, []).append((event.event_time_ms, later * 1000))
    return blocks


def test_dry_run_reports_exactly_the_blocks_a_brute_force_replay_gives(deployment: Deployment, api: httpx.Client) -> None:
    policy = {"name": "proposal", "key": ["api_key"],
              "algorithm": {"type": "sliding_window", "limit": DRY_RUN_LIMIT, "window_s": DRY_RUN_WINDOW_S, "bucket_s": 1}}  # fmt: skip
    span = {"from": "2026-11-02T10:00:00Z", "to": "2026-11-02T11:00:00Z"}
    body: dict[str, Any] = {"policy": policy, **span}
    response = api.post("/v1/admin/policies/dry-run", json=body, headers=admin())
    assert response.status_code == 200, response.text
    report = response.json()
    assert report["events_replayed"] == len(deployment.history)
    got = {
        key["limit_key"]: [(_ms(b["start"]), _ms(b["until"])) for b in key["blocks"]] for key in report["keys"]
    }
    expected = brute_force_blocks(deployment.history, DRY_RUN_LIMIT, DRY_RUN_WINDOW_S)
    assert sum(len(v) for v in expected.values()) >= 10  # the history does cross the limit, often
    assert got == expected
    for key in report["keys"]:
        assert key["blocked_s"] == pytest.approx(sum(b["seconds"] for b in key["blocks"]))

    in_force = api.get("/v1/admin/policies/per-key/dry-run", params=span, headers=admin())
    assert in_force.status_code == 200 and in_force.json()["keys"] == []  # 1000 a minute: never reached
    assert api.get("/v1/admin/policies/nope/dry-run", params=span, headers=admin()).status_code == 404
    backwards = api.post("/v1/admin/policies/dry-run", json={**body, "to": body["from"]}, headers=admin())
    assert backwards.status_code == 422


def test_every_admin_change_is_in_the_audit_trail_with_who_and_what_before_and_after(
    deployment: Deployment, api: httpx.Client
) -> None:
    created = create_key(api, tenant="acme", name="audited")
    key_id = created["key_id"]
    assert api.patch(f"/v1/admin/keys/{key_id}", json={"name": "renamed"}, headers=admin()).status_code == 200
    assert api.delete(f"/v1/admin/keys/{key_id}", headers=admin(OPS)).status_code == 200
    assert api.delete(f"/v1/admin/keys/{key_id}", headers=admin(OPS)).status_code == 200  # already revoked: no change
    plans = api.get("/v1/admin/plans", headers=admin()).json()
    changed_plans = {**plans, "plans": {**plans["plans"], "audited": {"monthly_units": 5}}}
    assert api.put("/v1/admin/plans", json=changed_plans, headers=admin(OPS)).status_code == 200

    trail = api.get("/v1/admin/audit", params={"target": key_id}, headers=admin())
    assert trail.status_code == 200, trail.text
    entries = trail.json()["entries"]
    assert [(e["action"], e["actor"]) for e in entries] == [
        ("key.revoke", "admin:ops"), ("key.change", "admin:root"), ("key.create", "admin:root")]  # fmt: skip
    revoke, change, create = entries
    assert create["before"] is None and create["after"]["name"] == "audited" and create["after"]["hint"] == created["hint"]
    assert (change["before"]["name"], change["after"]["name"]) == ("audited", "renamed")
    assert (revoke["before"]["status"], revoke["after"]["status"]) == ("active", "revoked")
    assert created["key"] not in trail.text  # never the plain key
    assert datetime.fromisoformat(create["at"]) <= datetime.fromisoformat(revoke["at"])

    [plan_change] = api.get("/v1/admin/audit", params={"target": "plans", "limit": 1}, headers=admin()).json()["entries"]
    assert plan_change["actor"] == "admin:ops" and "audited" not in plan_change["before"]["plans"]
    assert plan_change["after"]["plans"]["audited"]["monthly_units"] == 5
    by_ops = api.get("/v1/admin/audit", params={"actor": "admin:ops"}, headers=admin()).json()["entries"]
    assert [e["action"] for e in by_ops][:2] == ["plans.replace", "key.revoke"]

    logged = [json.loads(line) for line in deployment.run.log().splitlines() if '"throttlex.audit"' in line]
    assert [(line["level"], line["audit"]["action"]) for line in logged if line["audit"]["target"] == key_id] == [
        ("INFO", "key.create"), ("INFO", "key.change"), ("INFO", "key.revoke")]  # fmt: skip
    key_holder = api.get("/v1/admin/audit", headers={"x-api-key": deployment.keys["own"]["key"]})
    assert key_holder.status_code == 403


LOAD_EVENTS = 200_000
LOAD_DAY_MS = int(datetime(2026, 10, 5, 10, tzinfo=UTC).timestamp() * 1000)


def test_a_large_dry_run_leaves_the_api_answering(deployment: Deployment, api: httpx.Client) -> None:
    """While a dry run replays 200,000 stored events, `/healthz` and `/v1/quota` answer within 100 ms each.
    (When the events were made into objects and replayed on the event loop, both waited for the whole replay.)"""
    ingest = {"authorization": f"Bearer {INGEST}"}
    for first in range(0, LOAD_EVENTS, 1_000):
        body = b"[" + b",".join(
            encode(make_event(event_id=uuid.uuid4(), api_key_id=f"load-{n % 50}", event_time_ms=LOAD_DAY_MS + n * 10))
            for n in range(first, first + 1_000)
        ) + b"]"  # fmt: skip
        response = api.post("/v1/events", content=body, headers=ingest)
        assert response.status_code == 202 and response.json()["accepted"] == 1_000, response.text
    day = {"from": "2026-10-05T00:00:00Z", "to": "2026-10-06T00:00:00Z"}
    stored_by = time.monotonic() + 120
    while (stored := api.get("/v1/usage", params={**day, "granularity": "day"}, headers=admin())).status_code != 200 or sum(
        row["requests"] for row in stored.json()["rows"]
    ) != LOAD_EVENTS:  # fmt: skip
        assert time.monotonic() < stored_by, f"the sink did not store the {LOAD_EVENTS} events: {stored.text[:300]}"
        time.sleep(0.3)

    policy = {"name": "proposal", "key": ["api_key"], "algorithm": {"type": "fixed_window", "limit": 50, "window_s": 60}}
    answer: dict[str, httpx.Response] = {}

    def dry_run() -> None:
        with httpx.Client(base_url=deployment.api_url, timeout=300) as client:
            answer["dry run"] = client.post("/v1/admin/policies/dry-run", json={"policy": policy, **day}, headers=admin())

    running = threading.Thread(target=dry_run)
    running.start()
    own = {"x-api-key": deployment.keys["own"]["key"]}
    waits: list[float] = []
    while running.is_alive():
        for path, headers in (("/healthz", {}), ("/v1/quota", own)):
            began = time.perf_counter()
            assert api.get(path, headers=headers).status_code == 200
            waits.append(time.perf_counter() - began)
        time.sleep(0.02)  # pacing the probes, not waiting for anything
    running.join()
    assert answer["dry run"].status_code == 200, answer["dry run"].text
    assert answer["dry run"].json()["events_replayed"] == LOAD_EVENTS
    assert len(waits) >= 20, f"the dry run was over after {len(waits)} probes: too short to show anything"
    assert max(waits) < 0.1, f"slowest answers during the dry run: {sorted(waits)[-5:]}"


def _ms(iso: str) -> int:
    return round(datetime.fromisoformat(iso).timestamp() * 1000)


def test_no_plain_key_in_redis_kafka_clickhouse_or_the_logs(deployment: Deployment) -> None:
    """Last in this module: stops the deployment, then searches everything it wrote."""
    stop_role(deployment.gateway)
    stop_role(deployment.run)
    plain = [key.encode() for key in deployment.plain_keys]
    key_id = deployment.keys["own"]["key_id"].encode()  # what must be found, so the search is known to work
    assert len(plain) >= 8

    found = asyncio.run(everything_stored(deployment.sandbox))
    for place, blobs in found.items():
        assert any(key_id in blob for blob in blobs), f"the search of {place} does not see the key id"
        leaked = [key for key in plain if any(key in blob for blob in blobs)]
        assert not leaked, f"plain keys found in {place}"
        print(f"{place}: {len(blobs)} records searched, no plain key")
    logs = deployment.run.log() + deployment.gateway.log()
    assert not [key for key in deployment.plain_keys if key in logs], "plain keys in the logs"


async def everything_stored(sandbox: Sandbox) -> dict[str, list[bytes]]:
    """Every Redis entry, every record of the sandbox's Kafka topics and every ClickHouse row, as bytes."""
    found: dict[str, list[bytes]] = {"redis": [], "kafka": [], "clickhouse": []}
    redis = Redis.from_url(sandbox.redis_url)
    try:
        async for name in redis.scan_iter(match=f"{sandbox.env['THROTTLEX_REDIS_PREFIX']}:*"):
            kind = _text(await redis.type(name))
            value = await redis.get(name) if kind == "string" else repr(await _collection(redis, kind, name)).encode()
            found["redis"].append(name + b" " + (value or b""))
    finally:
        await redis.aclose()

    admin_client = AIOKafkaAdminClient(bootstrap_servers=sandbox.kafka_bootstrap)
    await admin_client.start()
    try:
        topics = [t for t in await admin_client.list_topics() if t.startswith(f"test-{sandbox.tag}")]
        described = await admin_client.describe_topics(topics)
    finally:
        await admin_client.close()
    partitions = [TopicPartition(d["topic"], p["partition"]) for d in described for p in d["partitions"]]
    consumer = AIOKafkaConsumer(bootstrap_servers=sandbox.kafka_bootstrap, group_id=None, enable_auto_commit=False)
    await consumer.start()
    try:
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        ends = await consumer.end_offsets(partitions)
        while [tp for tp, end in ends.items() if await consumer.position(tp) < end]:
            for records in (await consumer.getmany(timeout_ms=1000)).values():
                found["kafka"] += [(r.key or b"") + b" " + (r.value or b"") for r in records]
    finally:
        await consumer.stop()

    store = UsageStore(sandbox.env["THROTTLEX_CLICKHOUSE_DSN"])
    await store.open()
    try:
        text_columns = await store.query(
            "SELECT table, groupArray(name) FROM system.columns WHERE database = currentDatabase() "
            "AND type LIKE '%String%' GROUP BY table"
        )  # aggregate states do not read back as Python values; keys could only be in text columns
        for table, columns in text_columns:
            selected = ", ".join(f"`{column}`" for column in columns)
            found["clickhouse"] += [repr(row).encode() for row in await store.query(f"SELECT {selected} FROM `{table}`")]
    finally:
        await store.close()
    return found


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


async def _collection(redis: Redis, kind: str, name: bytes) -> object:
    if kind == "hash":
        return await redis.hgetall(name)
    if kind == "list":
        return await redis.lrange(name, 0, -1)
    if kind == "set":
        return await redis.smembers(name)
    if kind == "zset":
        return await redis.zrange(name, 0, -1, withscores=True)
    return kind


def test_keys_plans_and_policies_survive_a_restart_of_every_process_and_of_redis(
    sandbox: Sandbox, private_redis: tuple[str, list[subprocess.Popen[bytes]]]
) -> None:
    """Kafka stays; `throttlex run`, the gateway and Redis (no persistence: it comes back empty) restart."""
    url, redis_processes = private_redis
    sandbox = Sandbox(kafka_bootstrap=sandbox.kafka_bootstrap, redis_url=url, root=sandbox.root, tag=sandbox.tag)
    run, gateway, api_url, _ = start_deployment(sandbox)
    try:
        with httpx.Client(base_url=api_url, timeout=10) as api:
            wait_healthy(api, run)
            kept = create_key(api, tenant="acme", plan="pro")
            gone = create_key(api, tenant="acme")
            assert api.delete(f"/v1/admin/keys/{gone['key_id']}", headers=admin()).status_code == 200
            plans = {"plans": {"free": {"monthly_units": 1000}, "pro": {"monthly_units": 100000},
                               "enterprise": {"monthly_units": 10**9}}, "default_plan": "free"}  # fmt: skip
            assert api.put("/v1/admin/plans", json=plans, headers=admin()).status_code == 200
            policies = api.get("/v1/admin/policies", headers=admin()).json()["policies"]
            extra = {"name": "extra", "key": ["ip"], "algorithm": {"type": "fixed_window", "limit": 5000, "window_s": 60}}
            assert api.put("/v1/admin/policies", json={"policies": [*policies, extra]}, headers=admin()).status_code == 200
    finally:
        stop_role(gateway)
        stop_role(run)

    redis_processes[-1].kill()
    redis_processes[-1].wait()
    redis_processes.append(subprocess.Popen(redis_processes[0].args, stdout=subprocess.DEVNULL))
    (sandbox.root / "policies.yaml").write_text(POLICIES)  # the file still says what it said at first
    run, gateway, api_url, gateway_url = start_deployment(sandbox)
    try:
        with httpx.Client(base_url=api_url, timeout=10) as api, httpx.Client(base_url=gateway_url, timeout=10) as edge:
            wait_healthy(api, run)
            wait_healthy(edge, gateway, "/metrics")
            listed = {key["key_id"]: key for key in api.get("/v1/admin/keys", headers=admin()).json()["keys"]}
            assert (listed[kept["key_id"]]["status"], listed[kept["key_id"]]["plan"]) == ("active", "pro")
            assert listed[gone["key_id"]]["status"] == "revoked"
            assert api.get("/v1/admin/plans", headers=admin()).json()["plans"]["enterprise"] == {"monthly_units": 10**9, "daily_units": None}
            in_force = api.get("/v1/admin/policies", headers=admin()).json()
            assert in_force["origin"] == "registry" and [p["name"] for p in in_force["policies"]] == ["per-key", "extra"]
            report = api.get("/v1/quota", headers={"x-api-key": kept["key"]})
            assert report.status_code == 200 and report.json()["plan"]["plan"] == "pro"
            assert api.get("/v1/quota", headers={"x-api-key": gone["key"]}).status_code == 401
            assert edge.get("/v1/items/1", headers={"x-api-key": kept["key"]}).status_code == 200
            assert edge.get("/v1/items/1", headers={"x-api-key": gone["key"]}).status_code == 401
    finally:
        stop_role(gateway)
        stop_role(run)

