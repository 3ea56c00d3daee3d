"""The registry: API keys, plans and policies, kept in one log-compacted Kafka topic.

Kafka is the source of truth, so no other database is needed: the topic is compacted, so it holds
the latest record of every entry for ever, and every process that needs the registry reads it from
the beginning at start-up and then follows it. Records (key → JSON value):

- ``key/{key_id}/v{version}/{writer}`` → a `KeyRecord`: the key's creation (version 1) or a change to it.
  A writer writes the version after the one it has read. Every process reads the topic in the same order
  and applies a record only if its version is above the one in force: of concurrent changes made on top
  of one version, the first in the log wins everywhere; the others are ignored everywhere, and their
  writers answer 409. Each write has a Kafka key of its own, so compaction never drops a winning record
  for a losing one.
- ``revoked/{key_id}`` → the key's revocation. Final: once read, no later record changes the key, and
  no later write under another Kafka key can ever replace it.
- ``key/{key_id}`` → a `KeyRecord` written before records were versioned (read as version 0).
- ``policies/v{version}/{writer}`` → the policy document (policies, plans, default plan: the shape of the
  policy file), versioned like a key: of the changes made on top of one version, the first in the log wins,
  and the others' writers answer 409. Until one is written, the policy file is in force.
- ``policies`` → the same document without a version: what releases before versioning wrote and read. The
  writer of a winning version writes it here too, so processes of the release before keep following the
  document during a rolling upgrade; this release reads it only while no versioned document is in force.

The topic stays as small as the live entries. A record no longer in force (a version its successor
replaced, a change that lost, a second revocation) is *stale*: the writer whose change made it stale
writes a tombstone for its Kafka key once it has read its own record back, and any process that starts
writes tombstones for the stale records it read that have none (a writer that crashed in between, or
history from a release before tombstones). Compaction then removes them, so a start reads the live
entries. A compacted log is read the same way as the whole history: versions only go up, so the first
record of a key read may have any version.

Every process that follows the registry also mirrors the keys into Redis (``{prefix}:apikey:*``,
see `ingest.keys`), which is what gateways read, as it applies them. A writer waits until it has read
its own record back (milliseconds), so a change reaches gateways at once; the mirror only ever moves a
view to a later version (a script in Redis compares), so a follower that is behind cannot put an older
record back. A Redis that restarted empty, or a primary that a Sentinel failover replaced (whose replica
may have missed the last writes), is noticed within a second (another server run id answers, or a marker
key is gone) and rewritten from the registry.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import msgspec
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from redis.asyncio import Redis
from aiokafka.errors import KafkaError
from redis.exceptions import RedisError

from throttlex.ingest.clock import wall_clock_ms
from throttlex.ingest.events import key_id_for
from throttlex.ingest.kafka_access import KafkaAccess
from throttlex.ingest.keys import RESYNC, KeyRecord, decode_key, encode_key, key_channel, key_view
from throttlex.ingest.redis_connection import RedisUrlError, refuse_cluster
from throttlex.ingest.settings import ConnectionSettings
from throttlex.processors import metrics
from throttlex.processors.core.policy import PolicyFileError, PolicySet, parse_policies
from throttlex.processors.redis_client import redis_client, redis_server_id
from throttlex.processors.topics import ensure_topics

log = logging.getLogger(__name__)

POLICIES = "policies"
_POLICIES_VERSION = "policies/v"
_KEY = "key/"
_REVOKED = "revoked/"
_SOURCE = "the registry's policy document"

_MIRROR = """
local current = redis.call('GET', KEYS[1])
if current then
  local held = cjson.decode(current)
  if held.status == 'revoked' then return 0 end
  if ARGV[3] ~= 'revoked' and (tonumber(held.version) or 0) > tonumber(ARGV[2]) then return 0 end
end
redis.call('SET', KEYS[1], ARGV[1])
if ARGV[4] == '1' then redis.call('PUBLISH', KEYS[2], ARGV[1]) end
return 1
"""
"""Write a key's view unless it holds a revocation or a later version; publish it if asked (`Registry._mirror`)."""


class KeyConflict(Exception):
    """Another change to the key landed first: ``version`` is the one in force now."""

    def __init__(self, version: int) -> None:
        super().__init__(f"the key changed meanwhile: version {version} is in force; read it again")
        self.version = version


class KeyRevoked(Exception):
    """The key is revoked: it cannot change any more."""


class PoliciesConflict(Exception):
    """Another change to the policy document landed first: ``version`` is the one in force now."""

    def __init__(self, version: int) -> None:
        super().__init__(f"the plans and policies changed meanwhile: version {version} is in force; read them again")
        self.version = version


class RegistryLag(Exception):
    """A change was written to the registry but this process did not read it back in time: it may or may not
    have landed (read the key again)."""


_READ_BACK_S = 15.0
REGISTRY_TOPIC_CONFIGS = {
    "cleanup.policy": "compact",
    "segment.ms": str(3_600_000),  # the head segment is compacted too, within the hour
    "min.cleanable.dirty.ratio": "0.1",
    "max.compaction.lag.ms": str(3_600_000),  # and cleaned again within the hour, however little changed: tombstones go
    "delete.retention.ms": str(3_600_000),  # a start reads the whole topic in seconds; an hour of tombstones is plenty
}
"""The registry topic's settings, given when ThrottleX creates it (docs/clusters.md has the command for a topic
made by an older release)."""


class Registry:
    def __init__(self, kafka: KafkaAccess | str, topic: str, redis: Redis | None, prefix: str, *, replication_factor: int = 1) -> None:
        self._kafka = KafkaAccess.of(kafka)
        self._topic = topic
        self._redis = redis
        self._prefix = prefix
        self._mirrored_to: str | None = None  # the run id of the Redis server the key view was last written to
        self._replication_factor = replication_factor
        self._partition = TopicPartition(topic, 0)
        self._producer: AIOKafkaProducer | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self.keys: dict[str, KeyRecord] = {}
        self.policies: PolicySet | None = None
        """The registry's policy document, or None while the policy file is in force."""
        self.policies_version = 0
        """The version of the document in force: 0 until a versioned one is written (the policy file, or a document
        an earlier release wrote)."""
        self._policy_winners: dict[int, str] = {}
        """Version -> the Kafka key of the record that won it (the first of that version in the log)."""
        self._on_policies: Callable[[PolicySet], Awaitable[None]] | None = None
        self._next_offset = 0
        """The offset after the last record applied."""
        self._reading = asyncio.Lock()
        """One reader of the topic at a time: the follower, or a writer catching up to its own record."""
        self._in_force: dict[str, str] = {}
        """Key id -> the Kafka key of the record in force for it."""
        self._stale: dict[str, str] = {}
        """Kafka key of a record no longer in force, with no tombstone read yet -> its key id."""
        self.records_read_at_start = 0

    async def start(self) -> None:
        """Create the topic if needed and read it to its end, so `keys` and `policies` are current."""
        await ensure_topics(
            self._kafka, {self._topic: 1}, replication_factor=self._replication_factor,
            configs={self._topic: REGISTRY_TOPIC_CONFIGS},
        )  # fmt: skip
        self._producer = AIOKafkaProducer(**self._kafka.aiokafka_options(), acks="all", enable_idempotence=True)
        self._consumer = AIOKafkaConsumer(**self._kafka.aiokafka_options(), group_id=None, enable_auto_commit=False)
        await self._producer.start()
        await self._consumer.start()
        self._consumer.assign([self._partition])
        await self._consumer.seek_to_beginning(self._partition)
        end = (await self._consumer.end_offsets([self._partition]))[self._partition]
        while await self._consumer.position(self._partition) < end:
            self.records_read_at_start += await self._read(timeout_ms=1000)
        await self._mirror_all()
        log.info("registry loaded", extra={"keys": len(self.keys), "policy_document": self.policies is not None,
                                           "records_read": self.records_read_at_start, "stale": len(self._stale)})  # fmt: skip
        await self._tombstone(list(self._stale))

    async def stop(self) -> None:
        if self._consumer is not None and self._producer is not None:
            await self._consumer.stop()
            await self._producer.stop()

    @property
    def _started(self) -> tuple[AIOKafkaProducer, AIOKafkaConsumer]:
        if self._consumer is None or self._producer is None:
            raise RuntimeError("Registry.start() first")
        return self._producer, self._consumer

    async def follow(self, on_policies: Callable[[PolicySet], Awaitable[None]]) -> None:
        """Apply records other processes write, and rewrite the Redis view if Redis lost it. Never returns."""
        self._on_policies = on_policies
        while True:
            async with self._reading:
                await self._read(timeout_ms=500)
            if not await self._redis_has_view():
                await self._mirror_all()

    async def put_key(self, record: KeyRecord, *, expected_version: int | None = None) -> KeyRecord:
        """Write ``record`` as the key's next version and return the record in force once it is applied here.

        The change is made on top of ``expected_version`` (default: the version this process holds now):
        `KeyConflict` if that is not the version in force, or if another change landed first; `KeyRevoked`
        if the key is revoked. A record with ``status: revoked`` revokes the key (`revoke_key`). Raises
        `KafkaError` if Kafka refuses.
        """
        if record.status == "revoked":
            return await self.revoke_key(record.key_id, record)
        current = self.keys.get(record.key_id)
        if current is not None and current.status == "revoked":
            raise KeyRevoked(record.key_id)
        base = current.version if current is not None else 0
        if expected_version is not None and expected_version != base:
            raise KeyConflict(base)
        mine = msgspec.structs.replace(record, version=base + 1, writer=secrets.token_hex(8))
        name = f"{_KEY}{record.key_id}/v{mine.version}/{mine.writer}"
        await self._write(name, encode_key(mine))
        now = self.keys.get(record.key_id)  # what the log says right after this record (the tombstones' wait may read on)
        await self._tombstone([stale for stale, key_id in self._stale.items() if key_id == record.key_id])
        if now is not None and now.writer == mine.writer:
            return now
        if now is not None and now.status == "revoked":
            raise KeyRevoked(record.key_id)
        raise KeyConflict(now.version if now is not None else 0)

    async def revoke_key(self, key_id: str, record: KeyRecord | None = None) -> KeyRecord:
        """Revoke a key for good and return its record once the revocation is applied here. ``record``
        stands for a key this process has not read (a revocation may come first); KeyError if neither."""
        current = self.keys.get(key_id) or record
        if current is None:
            raise KeyError(key_id)
        if current.status != "revoked" or key_id not in self.keys:
            writer = secrets.token_hex(8)  # a Kafka key per revocation: compaction keeps the first one too
            await self._write(f"{_REVOKED}{key_id}/{writer}", encode_key(msgspec.structs.replace(current, status="revoked", writer=writer)))
            await self._tombstone([stale for stale, stale_key_id in self._stale.items() if stale_key_id == key_id])
        return self.keys[key_id]

    async def _tombstone(self, names: list[str]) -> None:
        """Write a tombstone for each of these stale records (Kafka errors are logged: a later start retries)."""
        if not names:
            return
        producer = self._started[0]
        try:
            await asyncio.gather(*[await producer.send(self._topic, None, key=name.encode()) for name in names])
        except KafkaError as exc:
            log.warning("tombstones for stale registry records not written; the next start writes them",
                        extra={"records": len(names), "error": str(exc)})  # fmt: skip
            return
        for name in names:
            self._stale.pop(name, None)
        log.info("stale registry records tombstoned", extra={"records": len(names)})

    async def _write(self, name: str, value: bytes) -> None:
        """Write a record and read the topic up to it (applied, and a key mirrored, here, in log order).
        `RegistryLag` if it is not read back within `_READ_BACK_S`: written, but not confirmed."""
        sent = await self._started[0].send_and_wait(self._topic, value, key=name.encode())
        try:
            async with asyncio.timeout(_READ_BACK_S):
                while self._next_offset <= sent.offset:
                    async with self._reading:
                        if self._next_offset <= sent.offset:
                            await self._read(timeout_ms=200)
        except TimeoutError:
            raise RegistryLag(f"the change was written but not read back within {_READ_BACK_S:g} s") from None

    async def catch_up(self) -> None:
        """Read the topic to its end now; `RegistryLag` if that takes longer than `_READ_BACK_S`."""
        consumer = self._started[1]
        end = (await consumer.end_offsets([self._partition]))[self._partition]
        try:
            async with asyncio.timeout(_READ_BACK_S):
                while self._next_offset < end:
                    async with self._reading:
                        if self._next_offset < end:
                            await self._read(timeout_ms=200)
        except TimeoutError:
            raise RegistryLag(f"the registry was not read to its end within {_READ_BACK_S:g} s") from None

    async def put_policies(self, policies: PolicySet, *, expected_version: int | None = None) -> int:
        """Store a validated policy document as the next version, made on top of ``expected_version`` (default:
        the version this process holds), and return its version once it is in force here. `PoliciesConflict` if
        that is not the version in force or another change landed first; `KafkaError` if Kafka refuses."""
        if expected_version is not None and expected_version > self.policies_version:
            await self.catch_up()  # read elsewhere, perhaps, and not here yet
        base = self.policies_version
        if expected_version is not None and expected_version != base:
            raise PoliciesConflict(base)
        document = policies.model_dump_json(exclude_defaults=True).encode()
        name = f"{_POLICIES_VERSION}{base + 1}/{secrets.token_hex(8)}"
        await self._write(name, document)
        won = self._policy_winners.get(base + 1) == name  # (later records may have been read already)
        await self._tombstone([stale for stale, owner in self._stale.items() if owner == POLICIES])
        if not won:
            raise PoliciesConflict(self.policies_version)
        try:  # for processes of the release before, during a rolling upgrade: the change stands without it
            await self._started[0].send_and_wait(self._topic, document, key=POLICIES.encode())
        except KafkaError as exc:
            log.warning("unversioned copy of the policy document not written", extra={"error": str(exc)})
        return base + 1

    async def _read(self, *, timeout_ms: int) -> int:
        """Apply the next records; returns how many were read."""
        records = (await self._started[1].getmany(self._partition, timeout_ms=timeout_ms)).get(self._partition, [])
        for record in records:
            name = record.key.decode() if record.key else ""
            if record.value is None:
                self._stale.pop(name, None)  # tombstoned
            elif name.startswith((_KEY, _REVOKED)):
                read = decode_key(record.value)
                key = self._applied(name, read)
                if key is None:
                    self._stale[name] = read.key_id
                else:
                    if (replaced := self._in_force.get(key.key_id)) is not None and replaced != name:
                        self._stale[replaced] = key.key_id
                    self._in_force[key.key_id] = name
                    self.keys[key.key_id] = key
                    await self._mirror(key)
            elif name == POLICIES:  # the unversioned copy: in force only until a versioned document is
                if self.policies_version == 0:
                    await self._apply_policies(record.value.decode())
            elif name.startswith(_POLICIES_VERSION):
                version = int(name.removeprefix(_POLICIES_VERSION).partition("/")[0] or 0)
                if version > self.policies_version:  # else made on top of a version another change replaced first
                    if (replaced := self._in_force.get(POLICIES)) is not None:
                        self._stale[replaced] = POLICIES
                    self._in_force[POLICIES] = name
                    self._policy_winners[version] = name
                    self.policies_version = version
                    await self._apply_policies(record.value.decode())
                else:
                    self._stale[name] = POLICIES
            self._next_offset = record.offset + 1
        return len(records)

    def _applied(self, name: str, record: KeyRecord) -> KeyRecord | None:
        """What a key record read from the topic makes of the key, or None if it changes nothing. The same
        for every process, which reads the same records in the same order."""
        current = self.keys.get(record.key_id)
        if current is not None and current.status == "revoked":
            return None  # final
        if name.startswith(_REVOKED) or record.status == "revoked":  # a legacy key/<id> record may revoke too
            held = current if current is not None else record
            return msgspec.structs.replace(held, status="revoked", version=held.version + 1, writer=record.writer)
        if name.count("/") == 1:  # written before versions: the latest record is the key
            return record if current is None or current.version == 0 else None
        if record.version > (current.version if current is not None else 0):  # (its predecessors may be compacted away)
            return record
        return None  # made on top of a version another change replaced first

    async def _apply_policies(self, text: str) -> None:
        try:
            policies = parse_policies(text, _SOURCE)
        except PolicyFileError as exc:  # written by another version, say: keep what is in force
            metrics.POLICY_RELOADS.labels(outcome="refused").inc()
            log.error("registry policy document refused; the policies in force stay", extra={"reason": str(exc)})
            return
        if policies == self.policies:
            return
        self.policies = policies
        if self._on_policies is not None:
            await self._on_policies(policies)

    async def _mirror(self, record: KeyRecord) -> None:
        if self._redis is None:
            return
        try:
            await self._redis.eval(_MIRROR, 2, *self._mirror_args(record, publish=True))
        except (RedisError, OSError) as exc:  # the marker check rewrites the view once Redis is back
            metrics.REDIS_ERRORS.labels(kind=type(exc).__name__).inc()
            log.warning("key view not written to Redis; rewritten when it answers", extra={"error": str(exc)})

    async def _redis_has_view(self) -> bool:
        if self._redis is None:
            return True
        try:
            return await redis_server_id(self._redis) == self._mirrored_to and bool(await self._redis.exists(self._marker))
        except (RedisError, OSError):
            return True  # unreachable: nothing to rewrite into yet

    async def _mirror_all(self) -> None:
        if self._redis is None:
            return
        try:
            server = await redis_server_id(self._redis)
            async with self._redis.pipeline(transaction=False) as pipe:
                for record in self.keys.values():
                    pipe.eval(_MIRROR, 2, *self._mirror_args(record, publish=False))
                pipe.set(self._marker, b"1")
                pipe.publish(key_channel(self._prefix), RESYNC)
                await pipe.execute()
        except (RedisError, OSError) as exc:
            metrics.REDIS_ERRORS.labels(kind=type(exc).__name__).inc()
            log.warning("key view not rewritten; trying again", extra={"error": str(exc)})
            return
        self._mirrored_to = server
        log.info("key view written to Redis", extra={"keys": len(self.keys)})

    def _mirror_args(self, record: KeyRecord, *, publish: bool) -> list[str | bytes | int]:
        return [key_view(self._prefix, record.key_id), key_channel(self._prefix), encode_key(record), record.version,
                record.status, "1" if publish else "0"]  # fmt: skip

    @property
    def _marker(self) -> str:
        return f"{self._prefix}:apikeys:mirrored"



async def issue_key(
    registry: Registry, salt: bytes, *, tenant: str, plan: str = "", name: str = "", expires_at_ms: int = 0
) -> tuple[str, KeyRecord]:
    """Create and store a new API key; returns the plain key (to show once) and its record."""
    plain = "tx_" + secrets.token_urlsafe(32)
    record = KeyRecord(
        key_id=key_id_for(plain, salt), tenant=tenant, plan=plan, name=name, expires_at_ms=expires_at_ms,
        created_ms=wall_clock_ms(), hint=plain[-4:],
    )  # fmt: skip
    return plain, await registry.put_key(record)


@asynccontextmanager
async def open_registry(settings: ConnectionSettings, *, replication_factor: int = 1) -> AsyncIterator[Registry]:
    """A started registry that mirrors keys into the settings' Redis; stopped on exit. Every service role opens
    one at its start: a Redis Cluster is refused here (`RedisUrlError`)."""
    redis = redis_client(settings.redis_url, settings.redis_timeout_s)
    try:
        await refuse_cluster(redis)
    except (RedisError, OSError):
        pass  # not reachable yet: the registry mirrors the keys once it is
    except RedisUrlError:
        await redis.aclose()
        raise
    registry = Registry(
        settings.kafka, settings.registry_topic, redis, settings.redis_prefix,
        replication_factor=replication_factor,
    )  # fmt: skip
    try:
        await registry.start()
        yield registry
    finally:
        await registry.stop()
        await redis.aclose()
