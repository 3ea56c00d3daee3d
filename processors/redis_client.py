"""The Redis client every ThrottleX service role uses."""

from __future__ import annotations

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from throttlex.ingest.redis_connection import connect_redis


def redis_client(url: str, timeout_s: float) -> Redis:
    """A Redis client for ``url`` (one server, or a primary through Sentinel: `connect_redis`) that retries
    dropped connections and timeouts with backoff before giving up."""
    return connect_redis(
        url,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), retries=3),
        retry_on_error=[RedisConnectionError, RedisTimeoutError],
    )


async def redis_server_id(redis: Redis) -> str:
    """The run id of the Redis server ``redis`` reaches now: another one after the server restarted or a Sentinel
    failover moved the primary, when what was written to the one before may be gone."""
    return str((await redis.info("server"))["run_id"])
