"""How every ThrottleX role reaches Redis: one URL names either one server or a primary found through Sentinel.

- ``redis://[user:password@]host:port/db`` (``rediss://`` for TLS, ``unix://`` for a socket): that server.
- ``redis+sentinel://[user:password@]host:port,host:port,…/service/db`` (``rediss+sentinel://`` for TLS): the
  primary that the Sentinels at those addresses name for ``service``. Every new connection asks them, so after a
  failover reconnecting reaches the new primary (and a connection still open to a demoted primary is dropped on
  its first refused write). The user and password are the data nodes'; Sentinels that want their own password
  take ``?sentinel_password=…``. TLS options (``ssl_ca_certs``, ``ssl_certfile``…) go in the query, as for
  ``rediss://``, and apply to the Sentinels and the data nodes alike.

Redis Cluster is refused (``redis+cluster://``, or a plain URL that reaches a cluster node, at a role's start):
docs/clusters.md says why.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

from redis.asyncio import Redis
from redis.asyncio.connection import parse_url
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.exceptions import ResponseError

SENTINEL_SCHEMES = {"redis+sentinel": False, "rediss+sentinel": True}  # scheme -> TLS
DEFAULT_SENTINEL_PORT = 26379
CLUSTER_REFUSED = (
    "Redis Cluster is not supported: ThrottleX needs one primary (its denylist is small and its edges follow one "
    "channel). Give it a single Redis, or a primary with replicas found through Sentinel "
    "(redis+sentinel://host:26379,host:26380/service/0); see docs/clusters.md"
)


class RedisUrlError(ValueError):
    """THROTTLEX_REDIS_URL cannot be used; the message says why and what to give instead."""


@dataclass(frozen=True)
class SentinelTarget:
    """What a ``redis+sentinel://`` URL names."""

    sentinels: list[tuple[str, int]]
    service: str
    data: dict[str, Any]
    """The data nodes' connection settings: credentials, database, TLS options."""
    tls: bool
    sentinel_password: str | None


def check_redis_url(url: str) -> str:
    """``url`` if a client can be made from it; `RedisUrlError` (a `ValueError`) saying what is wrong otherwise."""
    scheme = url.partition("://")[0].lower()
    if scheme.endswith("+cluster"):
        raise RedisUrlError(CLUSTER_REFUSED)
    if scheme in SENTINEL_SCHEMES:
        parse_sentinel_url(url)
    elif scheme not in ("redis", "rediss", "unix"):
        raise RedisUrlError(f"a Redis URL starts with redis://, rediss://, unix:// or redis+sentinel://, not {scheme}://")
    return url


def connect_redis(url: str, **options: Any) -> Redis:
    """A client for ``url`` (see the module's docstring); ``options`` (timeouts, retries) apply to every connection."""
    if url.partition("://")[0].lower() not in SENTINEL_SCHEMES:
        return Redis.from_url(check_redis_url(url), **options)
    target = parse_sentinel_url(url)
    sentinel_options = {name: value for name, value in options.items() if name.startswith("socket_")}
    if target.tls:
        sentinel_options.update(ssl=True, **{name: value for name, value in target.data.items() if name.startswith("ssl_")})
    if target.sentinel_password:
        sentinel_options["password"] = target.sentinel_password
    settings = {**target.data, **options}  # the caller's timeouts and retries over the URL's
    sentinel = Sentinel(target.sentinels, sentinel_kwargs=sentinel_options, **settings)  # type: ignore[no-untyped-call]
    primary: Redis = sentinel.master_for(target.service, redis_class=_SentinelPrimary, ssl=target.tls)
    return primary


class _SentinelPrimary(Redis):
    """The primary's client; closing it also closes its connections to the Sentinels."""

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        await super().aclose(close_connection_pool)
        pool = self.connection_pool
        assert isinstance(pool, SentinelConnectionPool)
        await pool.sentinel_manager.aclose()


def parse_sentinel_url(url: str) -> SentinelTarget:
    parts = urlsplit(url)
    credentials, _, hosts = parts.netloc.rpartition("@")
    sentinels = []
    for address in hosts.split(","):
        if address.startswith("["):  # an IPv6 address: [::1] or [::1]:26379
            host, _, rest = address[1:].partition("]")
            port = rest.removeprefix(":")
        else:
            host, _, port = address.partition(":")
        if not host or (port and not port.isdigit()):
            raise RedisUrlError(f"cannot read the Sentinel address {address!r} in the Redis URL: give host:port")
        sentinels.append((host, int(port or DEFAULT_SENTINEL_PORT)))
    path = [segment for segment in parts.path.split("/") if segment]
    if not path or len(path) > 2:
        raise RedisUrlError("a redis+sentinel:// URL names the service after the addresses: redis+sentinel://host:port/service[/db]")
    query = dict(parse_qsl(parts.query))
    sentinel_password = query.pop("sentinel_password", None)
    # The data nodes' settings, read as redis-py reads a plain URL: credentials, database, TLS options.
    tls = SENTINEL_SCHEMES[parts.scheme.lower()]
    data = parse_url(f"{'rediss' if tls else 'redis'}://{credentials + '@' if credentials else ''}sentinel/"
                     f"{path[1] if len(path) > 1 else 0}?{urlencode(query)}")  # fmt: skip
    settings = {name: value for name, value in data.items()
                if name not in ("host", "port", "connection_class") and (tls or not name.startswith("ssl_"))}  # fmt: skip
    return SentinelTarget(sentinels, path[0], settings, tls, sentinel_password)


async def refuse_cluster(redis: Redis) -> None:
    """Raise `RedisUrlError` if ``redis`` is a Redis Cluster node (call it once a role has reached Redis)."""
    try:
        info = await redis.info("cluster")
    except ResponseError:  # a server that does not know the section is no cluster node
        return
    if info.get("cluster_enabled"):
        raise RedisUrlError(CLUSTER_REFUSED)
