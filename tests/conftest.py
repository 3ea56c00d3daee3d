"""Fixtures for tests that use the real services and real ThrottleX processes.

Kafka and Redis are the ones `deploy/local/services.sh up` starts (`make test` does it); their
addresses come from THROTTLEX_KAFKA_BOOTSTRAP and THROTTLEX_REDIS_URL. A missing service fails the
test with the command to run; nothing here skips. Each test gets its own topics, consumer groups,
Redis prefix and chDB directory, so tests never see each other's data.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import httpx
import pytest
from pydantic import SecretStr
from prometheus_client.parser import text_string_to_metric_families
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError
from redis.asyncio import Redis
from redis.exceptions import RedisError

from throttlex.ingest.events import UsageEvent, decode, encode, key_id_for
from throttlex.ingest.keys import KeyRecord
from throttlex.ingest.settings import ConnectionSettings
from throttlex.processors.core.policy import PolicySet
from throttlex.processors.core.state import KeyState, decode_key_state
from throttlex.processors.registry import open_registry
from throttlex.processors.worker.changelog import changelog_topic
from throttlex.processors.worker.changelog import restore as restore_changelog
from throttlex.processors.accounting.store import UsageStore
from throttlex.processors.topics import APPEND_TIME, ensure_topics

# Tests build settings with the development salt; a role outside them refuses it (ingest/settings.py).
os.environ.setdefault("THROTTLEX_ALLOW_DEV_SECRETS", "1")

S = TypeVar("S", bound=ConnectionSettings)

READY_TIMEOUT_S = 30.0
EVENTS_PARTITIONS = 4


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def eventually(check: Callable[[], object], *, timeout_s: float = 20.0, what: str) -> None:
    """Poll an async or sync check until it returns a truthy value; fail naming ``what`` otherwise."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s}s waiting for {what}")
        await asyncio.sleep(0.1)


@dataclass
class Sandbox:
    """Names and settings private to one test."""

    kafka_bootstrap: str
    redis_url: str
    root: Path
    tag: str = field(default_factory=lambda: secrets.token_hex(4))
    replication_factor: int = 1
    """Of the topics the roles create: 3 on the local cluster (tests/cluster)."""

    @property
    def env(self) -> dict[str, str]:
        return {
            "THROTTLEX_KAFKA_BOOTSTRAP": self.kafka_bootstrap,
            "THROTTLEX_REDIS_URL": self.redis_url,
            "THROTTLEX_EVENTS_TOPIC": f"test-{self.tag}.events",
            "THROTTLEX_DEAD_LETTER_TOPIC": f"test-{self.tag}.deadletter",
            "THROTTLEX_REGISTRY_TOPIC": f"test-{self.tag}.registry",
            "THROTTLEX_AUDIT_TOPIC": f"test-{self.tag}.audit",
            "THROTTLEX_WORKER_GROUP": f"test-{self.tag}-worker",
            "THROTTLEX_SINK_GROUP": f"test-{self.tag}-sink",
            "THROTTLEX_REDIS_PREFIX": f"test-{self.tag}",
            "THROTTLEX_CLICKHOUSE_DSN": f"chdb://{self.root / 'chdb'}",
            "THROTTLEX_KEY_SALT": f"salt-{self.tag}",
            "THROTTLEX_METRICS_PORT": "0",
            "THROTTLEX_LOG_LEVEL": "INFO",
            "THROTTLEX_POLICY_FILE": str(self.root / "policies.yaml"),
            "THROTTLEX_TOPIC_REPLICATION_FACTOR": str(self.replication_factor),
        }

    def settings(self, cls: type[S]) -> S:
        env = self.env
        return cls(
            kafka_bootstrap=env["THROTTLEX_KAFKA_BOOTSTRAP"],
            redis_url=env["THROTTLEX_REDIS_URL"],
            events_topic=env["THROTTLEX_EVENTS_TOPIC"],
            redis_prefix=env["THROTTLEX_REDIS_PREFIX"],
            registry_topic=env["THROTTLEX_REGISTRY_TOPIC"],
            key_salt=SecretStr(env["THROTTLEX_KEY_SALT"]),
        )

    def write_policy(self, limit: int, window_s: float, bucket_s: float = 1.0, *, monthly_units: int | None = None) -> Path:
        """One sliding-window policy named ``test-limit``; with ``monthly_units``, a default plan too."""
        path = self.root / "policies.yaml"
        text = (
            "policies:\n"
            "  - name: test-limit\n"
            "    key: [api_key]\n"
            f"    algorithm: {{type: sliding_window, limit: {limit}, window_s: {window_s}, bucket_s: {bucket_s}}}\n"
        )
        if monthly_units is not None:
            text += f"plans:\n  test-plan: {{monthly_units: {monthly_units}}}\ndefault_plan: test-plan\n"
        path.write_text(text)
        return path


@pytest.fixture(scope="session")
def service_addresses() -> tuple[str, str]:
    """Check once that Kafka and Redis answer; fail with the command that starts them if not."""
    kafka = os.environ.get("THROTTLEX_KAFKA_BOOTSTRAP", "127.0.0.1:9092")
    redis_url = os.environ.get("THROTTLEX_REDIS_URL", "redis://127.0.0.1:6379/0")

    async def probe() -> None:
        admin = AIOKafkaAdminClient(bootstrap_servers=kafka, request_timeout_ms=5000)
        await admin.start()
        try:
            await admin.describe_cluster()
            while True:  # a just-started broker may still be creating its group coordinator
                try:
                    await admin.list_consumer_group_offsets("throttlex-readiness-probe")
                    break
                except KafkaError:
                    await asyncio.sleep(0.1)
        finally:
            await admin.close()
        client = Redis.from_url(redis_url, socket_connect_timeout=2)
        try:
            await client.ping()
        finally:
            await client.aclose()

    try:
        asyncio.run(asyncio.wait_for(probe(), READY_TIMEOUT_S))
    except Exception as exc:
        pytest.fail(
            f"Kafka ({kafka}) or Redis ({redis_url}) is not answering: {exc!r}. "
            "Start them with `deploy/local/services.sh up` (or run `make test`, which does)."
        )
    return kafka, redis_url


@pytest.fixture
def sandbox(service_addresses: tuple[str, str], tmp_path: Path) -> Sandbox:
    kafka, redis_url = service_addresses
    sandbox = Sandbox(kafka_bootstrap=kafka, redis_url=redis_url, root=tmp_path)
    sandbox.write_policy(limit=1_000, window_s=60)  # tests that care write their own
    return sandbox


@dataclass
class RoleProcess:
    """A `throttlex` command running as its own process, its output captured to a file."""

    args: list[str]
    log_path: Path
    process: subprocess.Popen[bytes]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 30.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            pytest.fail(f"`throttlex {' '.join(self.args)}` did not stop within {timeout_s}s:\n{self.log()[-3000:]}")


LAUNCH = "from throttlex.api.cli import main; main()"


def start_role(
    sandbox: Sandbox, args: list[str], extra_env: dict[str, str] | None = None, *, launch: str = LAUNCH
) -> RoleProcess:
    """Start `throttlex <args>` as its own process with the sandbox's settings, output to a log file.
    ``launch`` is the Python code that runs the command line (fault tests wrap a client first)."""
    log_path = sandbox.root / f"{args[0]}-{secrets.token_hex(3)}.log"
    env = {**os.environ, **sandbox.env, **(extra_env or {})}
    with log_path.open("wb") as output:  # the child keeps its own descriptor
        process = subprocess.Popen(
            [sys.executable, "-c", launch, *args],
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
            cwd=sandbox.root,
        )
    return RoleProcess(args, log_path, process)


def stop_role(role: RoleProcess) -> None:
    role.stop()
    print(f"--- log of throttlex {' '.join(role.args)} ---\n{role.log()[-5000:]}")


@pytest.fixture
def spawn(sandbox: Sandbox) -> Iterator[Callable[..., RoleProcess]]:
    """Start `throttlex <args>` for this test; stopped (and its log shown) at teardown."""
    started: list[RoleProcess] = []

    def start(*args: str, extra_env: dict[str, str] | None = None) -> RoleProcess:
        started.append(start_role(sandbox, list(args), extra_env))
        return started[-1]

    yield start
    for role in started:
        stop_role(role)


class EventSender:
    """Sends events to the sandbox's events topic exactly as a gateway does (keyed by key id)."""

    def __init__(self, client: AIOKafkaProducer, topic: str) -> None:
        self._client = client
        self._topic = topic

    async def __call__(self, event: UsageEvent | bytes, key: bytes | None = None) -> None:
        if isinstance(event, UsageEvent):
            key = event.api_key_id.encode()
            event = encode(event)
        await self._client.send_and_wait(self._topic, event, key=key)

    async def send_all(self, events: list[UsageEvent]) -> None:
        """Many events at once: queued in order, then all acknowledged."""
        deliveries = [await self._client.send(self._topic, encode(e), key=e.api_key_id.encode()) for e in events]
        await asyncio.gather(*deliveries)


@pytest.fixture
async def producer(sandbox: Sandbox) -> AsyncIterator[EventSender]:
    topic = sandbox.env["THROTTLEX_EVENTS_TOPIC"]
    # Created as the worker and the sink create it (records stamped with Kafka's append time).
    await ensure_topics(sandbox.kafka_bootstrap, {topic: EVENTS_PARTITIONS, sandbox.env["THROTTLEX_DEAD_LETTER_TOPIC"]: 1},
                        configs={topic: APPEND_TIME})  # fmt: skip
    client = AIOKafkaProducer(
        bootstrap_servers=sandbox.kafka_bootstrap, acks="all", enable_idempotence=True, linger_ms=5
    )
    await client.start()
    try:
        yield EventSender(client, topic)
    finally:
        await client.stop()


@pytest.fixture
async def redis(sandbox: Sandbox) -> AsyncIterator[Redis]:
    client = Redis.from_url(sandbox.redis_url)
    try:
        yield client
    finally:
        async for key in client.scan_iter(match=f"{sandbox.env['THROTTLEX_REDIS_PREFIX']}:*"):
            await client.delete(key)
        await client.aclose()


async def register_keys(sandbox: Sandbox, keys: dict[str, str], plan: str = "") -> dict[str, str]:
    """Register API keys (plain key → tenant) in the sandbox's registry, as `POST /v1/admin/keys`
    stores them; returns plain key → key id. Tests use fixed plain keys so their logs can be searched."""
    settings = sandbox.settings(ConnectionSettings)
    ids = {plain: key_id_for(plain, settings.key_salt_bytes) for plain in keys}
    async with open_registry(settings) as registry:
        for plain, tenant in keys.items():
            await registry.put_key(KeyRecord(key_id=ids[plain], tenant=tenant, plan=plan, hint=plain[-4:]))
    return ids


@pytest.fixture
def private_redis() -> Iterator[tuple[str, list[subprocess.Popen[bytes]]]]:
    """A Redis of the test's own, without persistence, so the test can restart it empty: its URL and
    its processes (the last one is the one running)."""
    port = free_port()
    command = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    processes = [subprocess.Popen(command, stdout=subprocess.DEVNULL)]
    yield f"redis://127.0.0.1:{port}/0", processes
    for process in processes:
        process.kill()
        process.wait()


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def role_metrics(port: int) -> Samples:
    """A role's /metrics as (name, sorted labels) -> value; empty while the role does not answer."""
    try:
        async with httpx.AsyncClient(timeout=5) as client:
            text = (await client.get(f"http://127.0.0.1:{port}/metrics", headers={"Accept-Encoding": "identity"})).text
    except httpx.TransportError:
        return {}
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def stored_events(sandbox: Sandbox) -> tuple[int, int]:
    """Rows and distinct event ids in the sandbox's chDB (opens only once no role holds it)."""
    store = UsageStore(sandbox.env["THROTTLEX_CLICKHOUSE_DSN"])
    await store.open()
    try:
        [(rows, unique)] = await store.query("SELECT count(), uniqExact(event_id) FROM usage_events")
    finally:
        await store.close()
    return rows, unique


async def events_stored_twice(sandbox: Sandbox) -> list[tuple[object, ...]]:
    """Each event id stored more than once, with the Kafka offsets its rows came from: the same offset
    twice is the sink inserting a record again, two offsets are the record written to Kafka twice."""
    return await stored_events_where(sandbox, "SELECT event_id, groupArray((kafka_partition, kafka_offset)) FROM usage_events "
                                              "GROUP BY event_id HAVING count() > 1 LIMIT 20")


async def owns_partitions(port: int, at_least: int) -> bool:
    """Whether the worker serving metrics on ``port`` owns ``at_least`` input partitions."""
    return (await role_metrics(port)).get(("throttlex_worker_assigned_partitions", ()), 0.0) >= at_least


async def stored_events_where(sandbox: Sandbox, sql: str) -> list[tuple[object, ...]]:
    """The rows of ``sql`` over the sandbox's chDB (opens only once no role holds it)."""
    store = UsageStore(sandbox.env["THROTTLEX_CLICKHOUSE_DSN"])
    await store.open()
    try:
        return await store.query(sql)
    finally:
        await store.close()


async def redis_answers(client: Redis) -> bool:
    try:
        return bool(await client.ping())
    except (RedisError, OSError):
        return False


SERVICES = Path(__file__).parents[1] / "deploy" / "local" / "services.sh"


@dataclass
class PrivateKafka:
    """A single-node Kafka broker of the test's own (started by `deploy/local/services.sh`), so the
    test can stop and start it; its data survives a restart."""

    bootstrap: str
    env: dict[str, str]

    def run(self, action: str) -> None:
        """``up`` or ``down``: start (waits until it answers) or stop (controlled shutdown) the broker."""
        done = subprocess.run(["bash", str(SERVICES), action, "kafka"], env=self.env, capture_output=True, text=True)
        if done.returncode != 0:
            pytest.fail(f"services.sh {action} kafka failed:\n{done.stdout}\n{done.stderr}")


@pytest.fixture
def private_kafka(tmp_path: Path) -> Iterator[PrivateKafka]:
    port = free_port()
    env = {**os.environ, "THROTTLEX_KAFKA_PORT": str(port), "THROTTLEX_KAFKA_CONTROLLER_PORT": str(free_port()),
           "THROTTLEX_KAFKA_SASL_SSL_PORT": str(free_port()), "THROTTLEX_LOCAL_DIR": str(tmp_path / "kafka")}  # fmt: skip
    kafka = PrivateKafka(f"127.0.0.1:{port}", env)
    kafka.run("up")
    try:
        yield kafka
    finally:
        kafka.run("down")


async def topic_ends(sandbox: Sandbox, topics: list[str]) -> dict[TopicPartition, int]:
    """The end offset of every partition of ``topics``."""
    consumer = AIOKafkaConsumer(bootstrap_servers=sandbox.kafka_bootstrap)
    await consumer.start()
    try:
        partitions = [TopicPartition(topic, p) for topic in topics for p in range(EVENTS_PARTITIONS)]
        ends: dict[TopicPartition, int] = await consumer.end_offsets(partitions)
        return ends
    finally:
        await consumer.stop()


async def events_on_topic(sandbox: Sandbox, topic: str) -> list[UsageEvent]:
    """Every event on ``topic`` now, read from the start of each partition to its end (30 s at most)."""
    ends = await topic_ends(sandbox, [topic])
    consumer = AIOKafkaConsumer(bootstrap_servers=sandbox.kafka_bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        consumer.assign(list(ends))
        await consumer.seek_to_beginning()
        values: list[bytes] = []
        deadline = time.monotonic() + 30
        while len(values) < sum(ends.values()):
            assert time.monotonic() < deadline, f"read {len(values)} of {sum(ends.values())} events"
            batch = await consumer.getmany(timeout_ms=1000)
            values += [record.value for partition in batch.values() for record in partition if record.value is not None]
        return [decode(value) for value in values]
    finally:
        await consumer.stop()


async def wait_until_worker_committed(
    sandbox: Sandbox, timeout_s: float = 60.0, *, past: dict[TopicPartition, int] | None = None
) -> None:
    """Wait until the workers have committed everything on the events and regroup topics, so every
    event sent so far is applied and its state written (forwards the workers make meanwhile included).
    With ``past``, until they have committed at least those offsets: for traffic that does not stop,
    whose end moves on."""
    events = sandbox.env["THROTTLEX_EVENTS_TOPIC"]

    async def committed() -> bool:
        ends = past if past is not None else await topic_ends(sandbox, [events, f"{events}.regrouped"])
        done = await worker_committed(sandbox)
        return all(done.get(tp, 0) >= end for tp, end in ends.items())

    await eventually(committed, timeout_s=timeout_s, what="the workers to commit every event")


async def worker_committed(sandbox: Sandbox) -> dict[TopicPartition, int]:
    """The offsets the workers' group has committed, by partition."""
    return await group_committed(sandbox, sandbox.env["THROTTLEX_WORKER_GROUP"])


async def group_committed(sandbox: Sandbox, group: str) -> dict[TopicPartition, int]:
    """The offsets consumer group ``group`` has committed, by partition."""
    admin = AIOKafkaAdminClient(bootstrap_servers=sandbox.kafka_bootstrap)
    await admin.start()
    try:
        return {tp: meta.offset for tp, meta in (await admin.list_consumer_group_offsets(group)).items()}
    finally:
        await admin.close()


async def wait_until_sink_committed(sandbox: Sandbox, timeout_s: float = 60.0) -> None:
    """Wait until the sink has committed the events topic's end: every event sent so far is stored."""
    events = sandbox.env["THROTTLEX_EVENTS_TOPIC"]

    async def committed() -> bool:
        ends = await topic_ends(sandbox, [events])
        done = await group_committed(sandbox, sandbox.env["THROTTLEX_SINK_GROUP"])
        return all(done.get(tp, 0) >= end for tp, end in ends.items())

    await eventually(committed, timeout_s=timeout_s, what="the sink to commit every event")


def changelog_partitions(sandbox: Sandbox) -> list[TopicPartition]:
    """Every partition of the workers' changelogs (one per events and regroup partition)."""
    group = sandbox.env["THROTTLEX_WORKER_GROUP"]
    events = sandbox.env["THROTTLEX_EVENTS_TOPIC"]
    return [TopicPartition(changelog_topic(group, topic), p)
            for topic in (events, f"{events}.regrouped") for p in range(EVENTS_PARTITIONS)]  # fmt: skip


async def worker_state(sandbox: Sandbox, policies: PolicySet) -> dict[str, KeyState]:
    """Every limit key's state as the workers' changelogs hold it (what a new worker would restore)."""
    sources = changelog_partitions(sandbox)
    states = await restore_changelog(sandbox.kafka_bootstrap, sources, policies)
    return {key: state for keys in states.values() for key, state in keys.items()}


async def compacted_state(sandbox: Sandbox, policies: PolicySet) -> dict[str, KeyState]:
    """Every limit key's state as compaction will leave the workers' changelogs: the last committed record of
    each key, whatever its version says (a restore today may still see an older one beside it)."""
    sources = changelog_partitions(sandbox)
    consumer = AIOKafkaConsumer(bootstrap_servers=sandbox.kafka_bootstrap, enable_auto_commit=False,
                                auto_offset_reset="earliest", isolation_level="read_committed")  # fmt: skip
    await consumer.start()
    try:
        consumer.assign(sources)
        ends = await consumer.end_offsets(sources)
        await consumer.seek_to_beginning(*sources)
        last: dict[str, bytes | None] = {}
        deadline = time.monotonic() + 30
        while [tp for tp in sources if await consumer.position(tp) < ends[tp]]:
            assert time.monotonic() < deadline, "could not read the changelogs to their ends"
            for records in (await consumer.getmany(timeout_ms=500)).values():
                for record in records:
                    if record.key is not None and record.offset < ends[TopicPartition(record.topic, record.partition)]:
                        last[record.key.decode()] = record.value
    finally:
        await consumer.stop()
    return {key: decode_key_state(value, policies) for key, value in last.items() if value is not None}


def window_counts(states: dict[str, KeyState], policy: str, now_ms: int) -> dict[str, int]:
    """Units each key's window of ``policy`` holds at ``now_ms`` (keys without that window left out)."""
    return {key: state.windows[policy].used_at(now_ms) for key, state in states.items() if policy in state.windows}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The cluster tests (tests/cluster) run last: the cluster they start stays up until the session ends,
    and the other tests should not share the machine with it."""
    items.sort(key=lambda item: item.get_closest_marker("cluster") is not None)
