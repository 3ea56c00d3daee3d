"""The key registry and the edge key cache against a real Kafka and Redis: revocation reaches an edge
at once, unknown keys cost one Redis call, and a Redis that restarts empty gets its view back."""

from __future__ import annotations

import asyncio
import getpass
import subprocess
import time
import uuid
from collections.abc import Callable

import msgspec
import pytest
from redis.asyncio import Redis

from throttlex.api.audit import AuditTrail
from throttlex.ingest import denylist_entries
from throttlex.ingest.denylist_entries import limit_key
from throttlex.ingest.clock import wall_clock_ms
from throttlex.ingest.events import key_id_for
from throttlex.ingest.keys import EdgeKeys, KeyRecord, key_view
from throttlex.ingest.settings import ConnectionSettings
from throttlex.processors.core.policy import parse_policies
from throttlex.processors.registry import PoliciesConflict, issue_key, open_registry
from tests.conftest import EventSender, RoleProcess, Sandbox, eventually, redis_answers
from tests.factories import make_event
from tests.unit.api.test_cli import throttlex

pytestmark = pytest.mark.integration


async def test_revocation_reaches_the_edge_within_a_second_and_unknown_keys_cost_one_lookup(sandbox: Sandbox) -> None:
    settings = sandbox.settings(ConnectionSettings)
    edge = EdgeKeys(sandbox.redis_url, settings.redis_prefix, unknown_size=8, unknown_ttl_s=60)
    await edge.start()
    try:
        async with open_registry(settings) as registry:
            _, record = await issue_key(registry, settings.key_salt_bytes, tenant="acme", plan="pro")
            assert await edge.usable(record.key_id) == record
            lookups = edge.lookups
            for _ in range(100):
                assert await edge.usable(record.key_id) == record
            assert edge.lookups == lookups  # known: answered from the cache

            for _ in range(100):
                assert await edge.usable("0" * 24) is None
            assert edge.lookups == lookups + 1  # unknown: one Redis call, then the negative cache
            for n in range(50):
                await edge.usable(f"{n:024x}")
            assert len(edge._unknown) <= 8  # bounded

            revoked_at = time.monotonic()
            await registry.put_key(msgspec.structs.replace(record, status="revoked"))
            await eventually(lambda: _refused(edge, record.key_id), timeout_s=1, what="the revocation at the edge")
            print(f"revocation seen at the edge after {(time.monotonic() - revoked_at) * 1000:.1f} ms")

            # a key first seen as unknown works as soon as it is registered (the notice clears the entry)
            late = KeyRecord(key_id="f" * 24, tenant="acme")
            assert await edge.usable(late.key_id) is None
            await registry.put_key(late)
            await eventually(lambda: _usable(edge, late.key_id), timeout_s=1, what="the new key at the edge")

            expiring = await registry.put_key(KeyRecord(key_id="e" * 24, tenant="acme", expires_at_ms=wall_clock_ms() + 1_000))
            assert await edge.usable(expiring.key_id) == expiring
            await eventually(lambda: _refused(edge, expiring.key_id), timeout_s=3, what="the key to expire")
    finally:
        await edge.stop()


async def _refused(edge: EdgeKeys, key_id: str) -> bool:
    return await edge.usable(key_id) is None


async def _usable(edge: EdgeKeys, key_id: str) -> bool:
    return await edge.usable(key_id) is not None


async def test_a_redis_restarted_empty_gets_the_key_view_back(
    sandbox: Sandbox, private_redis: tuple[str, list[subprocess.Popen[bytes]]]
) -> None:
    url, processes = private_redis
    settings = ConnectionSettings(
        kafka_bootstrap=sandbox.kafka_bootstrap, redis_url=url, redis_prefix="restart",
        registry_topic=sandbox.env["THROTTLEX_REGISTRY_TOPIC"],
    )  # fmt: skip
    client = Redis.from_url(url)
    await eventually(lambda: redis_answers(client), timeout_s=10, what="the private Redis")
    try:
        async with open_registry(settings) as registry:
            keys = [(await issue_key(registry, b"salt", tenant="acme"))[1] for _ in range(3)]

            processes[0].kill()
            processes[0].wait()
            await client.connection_pool.disconnect()
            processes.append(subprocess.Popen(processes[0].args, stdout=subprocess.DEVNULL))
            await eventually(lambda: redis_answers(client), timeout_s=10, what="Redis to restart")
            assert not await client.exists(key_view("restart", keys[0].key_id))  # empty
            restarted = time.monotonic()
            follower = asyncio.create_task(registry.follow(_ignore))
            try:
                await eventually(
                    lambda: _all_present(client, [k.key_id for k in keys]), timeout_s=5, what="the key view to be rewritten"
                )
                print(f"key view rewritten {time.monotonic() - restarted:.2f} s after Redis answered again")
            finally:
                follower.cancel()
                await asyncio.gather(follower, return_exceptions=True)
    finally:
        await client.aclose()


async def _ignore(_: object) -> None:
    return None


async def _all_present(client: Redis, key_ids: list[str]) -> bool:
    return bool(await client.exists(*[key_view("restart", k) for k in key_ids]) == len(key_ids))


async def test_a_policy_document_in_the_registry_reaches_a_running_worker_process(
    sandbox: Sandbox, spawn: Callable[..., RoleProcess], producer: EventSender, redis: Redis
) -> None:
    """What `PUT /v1/admin/policies` writes, a separate `throttlex worker` applies without a restart."""
    settings = sandbox.settings(ConnectionSettings)
    key_id = "d" * 24
    worker = spawn("worker", "--policy-file", str(sandbox.write_policy(limit=1_000, window_s=60)))
    block_key = denylist_entries.block_key(settings.redis_prefix, limit_key([("api_key", key_id)]))
    usage_key = f"{settings.redis_prefix}:usage:{limit_key([('api_key', key_id)])}"
    start_ms = wall_clock_ms() - 1_000
    for n in range(5):
        await producer(make_event(event_id=uuid.uuid4(), api_key_id=key_id, event_time_ms=start_ms + n, cost=1))
    await eventually(lambda: redis.exists(usage_key), timeout_s=60, what="the worker to count the five events")
    assert not await redis.exists(block_key)  # five of 1,000

    tight = parse_policies("policies: [{name: tight, key: [api_key], algorithm: {type: fixed_window, limit: 3, window_s: 3600}}]", "test")
    async with open_registry(settings) as registry:
        await registry.put_policies(tight)
    written_at = time.monotonic()
    await eventually(lambda: '"policies": ["tight"]' in worker.log(), timeout_s=10, what="the worker to take the new policy")
    applied_s = time.monotonic() - written_at
    for n in range(3):  # a new policy counts from when it is in force: three more reach its limit
        await producer(make_event(event_id=uuid.uuid4(), api_key_id=key_id, event_time_ms=start_ms + 10 + n, cost=1))
    await eventually(lambda: redis.exists(block_key), timeout_s=5, what="the block under the registry's policy")
    raw = await redis.get(block_key)
    assert raw is not None and denylist_entries.decode_block(raw).policy == "tight"
    print(f"registry policy applied by the worker process {applied_s:.2f} s after the write")


async def test_a_key_made_on_the_command_line_is_in_the_registry_and_the_audit_trail(sandbox: Sandbox) -> None:
    result = await asyncio.to_thread(throttlex, "keys", "create", "--tenant", "acme", "--name", "cli-made", env=sandbox.env)
    assert result.returncode == 0, result.stderr[-2000:]
    plain = result.stdout.strip()
    settings = sandbox.settings(ConnectionSettings)
    async with open_registry(settings) as registry:
        [record] = [record for record in registry.keys.values() if record.name == "cli-made"]
    assert record.key_id == key_id_for(plain, settings.key_salt_bytes) and record.version == 1
    trail = AuditTrail(sandbox.kafka_bootstrap, sandbox.env["THROTTLEX_AUDIT_TOPIC"])
    [entry] = await trail.recent(10)
    assert (entry.actor, entry.action, entry.target) == (f"cli:{getpass.getuser()}", "key.create", record.key_id)
    assert entry.after["name"] == "cli-made" and plain not in str(entry)


async def test_of_two_processes_changing_the_policy_document_at_once_the_first_in_the_log_wins_everywhere(
    sandbox: Sandbox,
) -> None:
    """Two API processes each hold version N and each write N+1: one wins, the other is told (and its record
    changes nothing anywhere); a process started afterwards holds the winner too."""
    settings = sandbox.settings(ConnectionSettings)
    documents = [parse_policies(f"policies: []\nplans: {{{name}: {{monthly_units: 5}}}}\ndefault_plan: {name}", "test")
                 for name in ("left", "right")]  # fmt: skip
    async with open_registry(settings) as one, open_registry(settings) as other:
        base = one.policies_version
        assert other.policies_version == base
        outcomes = await asyncio.gather(one.put_policies(documents[0]), other.put_policies(documents[1]), return_exceptions=True)
        [won] = [n for n, outcome in enumerate(outcomes) if outcome == base + 1]
        [lost] = [outcome for outcome in outcomes if isinstance(outcome, PoliciesConflict)]
        assert lost.version == base + 1
        await eventually(lambda: one.policies == other.policies == documents[won], timeout_s=10, what="both to hold the winner")
    async with open_registry(settings) as later:
        assert (later.policies, later.policies_version) == (documents[won], base + 1)


async def test_a_policy_change_on_top_of_a_version_read_elsewhere_is_judged_once_this_process_has_read_it(
    sandbox: Sandbox,
) -> None:
    """A change whose expected version another process wrote a moment ago is made on top of it (this process reads
    the topic to its end first); one on top of a version nobody wrote is a conflict naming the version in force."""
    settings = sandbox.settings(ConnectionSettings)
    documents = [parse_policies(f"policies: []\nplans: {{p{n}: {{monthly_units: 5}}}}\ndefault_plan: p{n}", "test") for n in range(3)]
    async with open_registry(settings) as behind, open_registry(settings) as ahead:
        written = await ahead.put_policies(documents[0])
        assert behind.policies_version == written - 1  # not following: it has not read the change
        assert await behind.put_policies(documents[1], expected_version=written) == written + 1
        with pytest.raises(PoliciesConflict, match=f"version {written + 1} is in force"):
            await behind.put_policies(documents[2], expected_version=written + 7)
