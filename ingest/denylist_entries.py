"""The denylist as it sits in Redis: written by workers, read by every gateway's edge cache.

Layout (all names under one configurable prefix, default ``throttlex``):

- ``{prefix}:block:{limit_key}`` — a string holding the encoded `Block`, with a TTL that ends exactly
  at ``until_ms``; Redis expiry removes it when the policy admits again.
- ``{prefix}:block-index`` — a sorted set of the limit keys blocked, each scored with its ``until_ms``: an
  edge's resynchronisation reads the blocks in force from it (and then their entries), never the keyspace.
  Writers drop ended blocks from it as they write new ones.
- ``{prefix}:blocks`` — a pub/sub channel carrying each new or changed `Block`, so edge caches update
  without polling. A `Block` whose ``until_ms`` is in the past is an unblock.

A limit key names what a policy counts, as ``dimension=value`` pairs joined by ``|`` in the fixed
order of `DIMENSIONS`, e.g. ``api_key=3f9a…`` or ``tenant=acme|route=/v1/search``. Workers build it
from an event and gateways from a request with the same function, so both name a key identically.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import msgspec

from throttlex.ingest.events import UsageEvent

Dimension = Literal["api_key", "tenant", "ip", "route", "method"]
DIMENSIONS: tuple[Dimension, ...] = ("api_key", "tenant", "ip", "route", "method")
EVENT_FIELD: dict[str, str] = {"api_key": "api_key_id", "tenant": "tenant", "ip": "client_ip", "route": "route",
                                "method": "method"}  # fmt: skip


class Block(msgspec.Struct, frozen=True):
    limit_key: str
    until_ms: int
    policy: str
    published_ms: int = 0
    """When the worker wrote it (0 if unknown): edges measure their sync lag from it."""
    dims: tuple[str, ...] = ("api_key",)
    """The dimensions of ``limit_key``, so an edge knows which keys to build for a request."""


_decoder = msgspec.json.Decoder(Block)


def encode_block(block: Block) -> bytes:
    return msgspec.json.encode(block)


def decode_block(raw: bytes | str) -> Block:
    return _decoder.decode(raw)


def block_key(prefix: str, limit_key: str) -> str:
    return f"{prefix}:block:{limit_key}"


def block_index(prefix: str) -> str:
    return f"{prefix}:block-index"


def channel(prefix: str) -> str:
    return f"{prefix}:blocks"


def limit_key(pairs: list[tuple[str, str]]) -> str:
    return "|".join(f"{dim}={value}" for dim, value in pairs)


def event_limit_key(dims: tuple[str, ...], event: UsageEvent) -> str:
    """The limit key of ``event`` for a policy keyed on ``dims`` (in `DIMENSIONS` order)."""
    if len(dims) == 1:  # the usual case, on every event: spare the join
        return f"{dims[0]}={getattr(event, EVENT_FIELD[dims[0]])}"
    return limit_key([(dim, getattr(event, EVENT_FIELD[dim])) for dim in dims])


def request_limit_key(dims: tuple[str, ...], values: Mapping[str, str]) -> str:
    """The same key built at the edge from a request's ``values`` by dimension name."""
    return limit_key([(dim, values.get(dim, "")) for dim in dims])


def api_key_of(key: str) -> str | None:
    """The API key id a limit key starts with, if it is keyed on ``api_key``."""
    if not key.startswith("api_key="):
        return None
    return key[len("api_key=") :].split("|", 1)[0]
