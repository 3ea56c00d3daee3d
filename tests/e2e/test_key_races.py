"""Changes to one key racing each other on two `throttlex api` processes that share a registry, on real Kafka
and Redis: a revocation is final wherever the changes come from, and a change made on top of a version that
another change replaced first is refused with 409, the same way on both processes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import httpx
import pytest

from throttlex.ingest.keys import EdgeKeys
from throttlex.ingest.settings import ConnectionSettings
from tests.conftest import RoleProcess, Sandbox, eventually, free_port

pytestmark = pytest.mark.e2e

ADMIN = "admin-token-for-key-races"
HEADERS = {"authorization": f"Bearer {ADMIN}"}
ROUNDS = 15
MAX_ROUNDS = 60
"""Rounds go on past ROUNDS until a change has landed before a revocation at least once: which one lands
first is up to the machine, and in one CI run the revocation won all of the first 15."""


@pytest.fixture
async def apis(sandbox: Sandbox, spawn: Callable[..., RoleProcess]) -> AsyncIterator[tuple[httpx.AsyncClient, httpx.AsyncClient]]:
    """Two API processes on the sandbox's registry."""
    policy = str(sandbox.write_policy(limit=1_000, window_s=60))
    clients = []
    for _ in range(2):
        port = free_port()
        spawn("api", "--policy-file", policy, "--api-port", str(port), extra_env={"THROTTLEX_ADMIN_TOKENS": f"root:{ADMIN}"})
        clients.append(httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10, headers=HEADERS))
    try:
        for client in clients:
            await eventually(lambda: _answers(client), timeout_s=60, what="`throttlex api` to answer")
        yield clients[0], clients[1]
    finally:
        for client in clients:
            await client.aclose()


async def _answers(client: httpx.AsyncClient) -> bool:
    try:
        return (await client.get("/v1/admin/keys", params={"limit": 1})).status_code == 200
    except httpx.TransportError:
        return False


async def _key_on_both(first: httpx.AsyncClient, second: httpx.AsyncClient) -> str:
    created = await first.post("/v1/admin/keys", json={"tenant": "acme"})
    assert created.status_code == 201, created.text
    key_id: str = created.json()["key_id"]

    async def known() -> bool:
        return (await second.get(f"/v1/admin/keys/{key_id}")).status_code == 200

    await eventually(known, timeout_s=10, what="the new key on the other process")
    return key_id


async def _status(client: httpx.AsyncClient, key_id: str) -> str:
    status: str = (await client.get(f"/v1/admin/keys/{key_id}")).json()["status"]
    return status


async def test_a_revocation_racing_changes_on_another_process_is_final(
    sandbox: Sandbox, apis: tuple[httpx.AsyncClient, httpx.AsyncClient]
) -> None:
    """Each round: four changes of the key's status on one process and its revocation on the other, sent at
    once. Whatever order they land in, the key ends revoked on both processes and at the edge, and stays so."""
    first, second = apis
    settings = sandbox.settings(ConnectionSettings)
    edge = EdgeKeys(sandbox.redis_url, settings.redis_prefix)
    await edge.start()
    revoked, changed_before_revocation = [], 0
    try:
        rounds = 0
        while rounds < ROUNDS or (not changed_before_revocation and rounds < MAX_ROUNDS):
            rounds += 1
            key_id = await _key_on_both(first, second)
            *changes, revocation = await asyncio.gather(
                *(first.patch(f"/v1/admin/keys/{key_id}", json={"status": status})
                  for status in ("suspended", "active", "suspended", "active")),
                second.delete(f"/v1/admin/keys/{key_id}"),
            )  # fmt: skip
            assert revocation.status_code == 200 and revocation.json()["status"] == "revoked", revocation.text
            assert {change.status_code for change in changes} <= {200, 409}, [change.text for change in changes]
            changed_before_revocation += any(change.status_code == 200 for change in changes)
            revoked.append(key_id)
            for client in (first, second):
                await eventually(lambda: _is(client, key_id, "revoked"), timeout_s=10, what="the revocation on both")
            await eventually(lambda: _refused(edge, key_id), timeout_s=5, what="the revocation at the edge")
        # Every revocation still stands once every change has been read everywhere.
        for client in (first, second):
            listed = await client.get("/v1/admin/keys", params={"status": "revoked", "limit": 500})
            assert sorted(key["key_id"] for key in listed.json()["keys"]) == sorted(revoked)
        for key_id in revoked:
            assert await edge.usable(key_id) is None
            refused = await first.patch(f"/v1/admin/keys/{key_id}", json={"status": "active"})
            assert refused.status_code == 409 and "revoked" in refused.text
    finally:
        await edge.stop()
    assert changed_before_revocation > 0  # the changes did race the revocation, not only follow it


async def _is(client: httpx.AsyncClient, key_id: str, status: str) -> bool:
    return await _status(client, key_id) == status


async def _refused(edge: EdgeKeys, key_id: str) -> bool:
    return await edge.usable(key_id) is None


async def test_a_change_on_top_of_a_replaced_version_gets_409_on_either_process(
    apis: tuple[httpx.AsyncClient, httpx.AsyncClient],
) -> None:
    """Two changes of the same version, one per process, sent at once: exactly one lands, the other gets 409,
    and both processes then hold the one that landed."""
    first, second = apis
    for _ in range(ROUNDS):
        key_id = await _key_on_both(first, second)
        version = (await first.get(f"/v1/admin/keys/{key_id}")).json()["version"]
        answers = await asyncio.gather(
            first.patch(f"/v1/admin/keys/{key_id}", json={"name": "first"}, headers={"if-match": f'"{version}"'}),
            second.patch(f"/v1/admin/keys/{key_id}", json={"name": "second"}, headers={"if-match": f'"{version}"'}),
        )
        assert sorted(answer.status_code for answer in answers) == [200, 409], [answer.text for answer in answers]
        [landed] = [answer.json() for answer in answers if answer.status_code == 200]
        assert landed["version"] == version + 1

        async def agreed() -> bool:
            held = [(await client.get(f"/v1/admin/keys/{key_id}")).json() for client in (first, second)]
            return all((key["name"], key["version"]) == (landed["name"], landed["version"]) for key in held)

        await eventually(agreed, timeout_s=10, what="both processes to hold the change that landed")
        stale = await second.patch(f"/v1/admin/keys/{key_id}", json={"name": "late"}, headers={"if-match": str(version)})
        assert stale.status_code == 409 and f"version {version + 1} is in force" in stale.text
