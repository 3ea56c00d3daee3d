"""The registry: API keys, plans and policies, kept in one log-compacted Kafka topic.

Kafka is the source of truth, so no other database is needed: the topic is compacted, so it holds
the latest record of every entry for ever, and every process that needs the registry reads it from
the beginning at start-up and then follows it. Records (key → JSON value):

- ``key/{key_id}`` → a `KeyRecord` (revoking a key writes a record with ``status: revoked``);
- ``policies`` → the policy document in force, the same shape as the policy file (policies, plans,
  default plan). Until one is written, the policy file is in force.

Every process that follows the registry also mirrors the keys into Redis (``{prefix}:apikey:*``,
see `ingest.keys`), which is what gateways read. Writes go to Kafka first (acks=all) and then to
Redis at once, so a change reaches gateways in milliseconds; a Redis that restarted empty is noticed
within a second (a marker key is gone) and rewritten from the registry.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from redis.asyncio import Redis
from redis.exceptions import RedisError

from ingest.clock import wall_clock_ms
from ingest.events import key_id_for
from ingest.keys import RESYNC, KeyRecord, decode_key, encode_key, key_channel, key_view
from ingest.settings import ConnectionSettings
from processors import metrics
from processors.core.policy import PolicyFileError, PolicySet, parse_policies
from processors.redis_client import redis_client
from processors.topics import ensure_topics

log = logging.getLogger(__name__)

POLICIES = "policies"
_KEY = "key/"
_SOURCE = "the registry's policy document"


class Registry:
    def __init__(self, bootstrap: str, topic: str, redis: Redis | None, prefix: str, *, replication_factor: int = 1) -> None:
        self._bootstrap = bootstrap
        self._topic = topic
        self._redis = redis
        self._prefix = prefix
        self._replication_factor = replication_factor
        self._partition = TopicPartition(topic, 0)
        self._producer: AIOKafkaProducer | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self.keys: dict[str, KeyRecord] = {}
        self.policies: PolicySet | None = None
        """The registry's policy document, or None while the policy file is in force."""
        self._on_policies: Callable[[PolicySet], Awaitable[None]] | None = None

    async def start(self) -> None:
        """Create the topic if needed and read it to its end, so `keys` and `policies` are current."""
        await ensure_topics(
            self._bootstrap, {self._topic: 1}, replication_factor=self._replication_factor,
            configs={self._topic: {"cleanup.policy": "compact"}},
        )  # fmt: skip
        self._producer = AIOKafkaProducer(bootstrap_servers=self._bootstrap, acks="all", enable_idempotence=True)
        self._consumer = AIOKafkaConsumer(bootstrap_servers=self._bootstrap, group_id=None, enable_auto_commit=False)
        await self._producer.start()
        await self._consumer.start()
        self._consumer.assign([self._partition])
        await self._consumer.seek_to_beginning(self._partition)
        end = (await self._consumer.end_offsets([self._partition]))[self._partition]
        while await self._consumer.position(self._partition) < end:
            await self._read(timeout_ms=1000)
        await self._mirror_all()
        log.info("registry loaded", extra={"keys": len(self.keys), "policy_document": self.policies is not None})

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
            await self._read(timeout_ms=500)
            if not await self._redis_has_view():
                await self._mirror_all()

    async def put_key(self, record: KeyRecord) -> None:
        """Store a key record (Kafka first, then the Redis view); raises `KafkaError` if Kafka refuses."""
        await self._started[0].send_and_wait(self._topic, encode_key(record), key=f"{_KEY}{record.key_id}".encode())
        self.keys[record.key_id] = record
        await self._mirror(record)

    async def put_policies(self, policies: PolicySet) -> None:
        """Store a validated policy document; raises `KafkaError` if Kafka refuses."""
        document = policies.model_dump_json(exclude_defaults=True).encode()
        await self._started[0].send_and_wait(self._topic, document, key=POLICIES.encode())
        self.policies = policies

    async def _read(self, *, timeout_ms: int) -> None:
        batches = await self._started[1].getmany(self._partition, timeout_ms=timeout_ms)
        for record in batches.get(self._partition, []):
            name = record.key.decode() if record.key else ""
            if record.value is None:
                continue
            if name.startswith(_KEY):
                key = decode_key(record.value)
                self.keys[key.key_id] = key
                await self._mirror(key)
            elif name == POLICIES:
                await self._apply_policies(record.value.decode())

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
        encoded = encode_key(record)
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.set(key_view(self._prefix, record.key_id), encoded)
                pipe.publish(key_channel(self._prefix), encoded)
                await pipe.execute()
        except (RedisError, OSError) as exc:  # the marker check rewrites the view once Redis is back
            metrics.REDIS_ERRORS.labels(kind=type(exc).__name__).inc()
            log.warning("key view not written to Redis; rewritten when it answers", extra={"error": str(exc)})

    async def _redis_has_view(self) -> bool:
        if self._redis is None:
            return True
        try:
            return bool(await self._redis.exists(self._marker))
        except (RedisError, OSError):
            return True  # unreachable: nothing to rewrite into yet

    async def _mirror_all(self) -> None:
        if self._redis is None:
            return
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for record in self.keys.values():
                    pipe.set(key_view(self._prefix, record.key_id), encode_key(record))
                pipe.set(self._marker, b"1")
                pipe.publish(key_channel(self._prefix), RESYNC)
                await pipe.execute()
        except (RedisError, OSError) as exc:
            metrics.REDIS_ERRORS.labels(kind=type(exc).__name__).inc()
            log.warning("key view not rewritten; trying again", extra={"error": str(exc)})
            return
        log.info("key view written to Redis", extra={"keys": len(self.keys)})

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
    await registry.put_key(record)
    return plain, record


@asynccontextmanager
async def open_registry(settings: ConnectionSettings, *, replication_factor: int = 1) -> AsyncIterator[Registry]:
    """A started registry that mirrors keys into the settings' Redis; stopped on exit."""
    redis = redis_client(settings.redis_url, settings.redis_timeout_s)
    registry = Registry(
        settings.kafka_bootstrap, settings.registry_topic, redis, settings.redis_prefix,
        replication_factor=replication_factor,
    )  # fmt: skip
    try:
        await registry.start()
        yield registry
    finally:
        await registry.stop()
        await redis.aclose()
