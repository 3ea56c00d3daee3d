"""The denylist as it sits in Redis: written by workers, read by every gateway's edge cache.

Layout (all names under one configurable prefix, default ``throttlex``):

- ``{prefix}:block:{limit_key}`` — a string holding the encoded `Block`, with a TTL that ends exactly
  at ``until_ms``; Redis expiry removes it when the policy admits again.
- ``{prefix}:blocks`` — a pub/sub channel carrying each new or changed `Block`, so edge caches update
  without polling. A `Block` whose ``until_ms`` is in the past is an unblock.

A limit key names what a policy counts, as ``dimension=value`` pairs joined by ``|`` in the policy's
dimension order, e.g. ``api_key=3f9a…`` or ``tenant=acme|route=/v1/search``.
"""

from __future__ import annotations

import msgspec


class Block(msgspec.Struct, frozen=True):
    limit_key: str
    until_ms: int
    policy: str
    published_ms: int = 0
    """When the worker wrote it (0 if unknown): edges measure their sync lag from it."""


_decoder = msgspec.json.Decoder(Block)


def encode_block(block: Block) -> bytes:
    return msgspec.json.encode(block)


def decode_block(raw: bytes | str) -> Block:
    return _decoder.decode(raw)


def block_key(prefix: str, limit_key: str) -> str:
    return f"{prefix}:block:{limit_key}"


def block_key_pattern(prefix: str) -> str:
    return f"{prefix}:block:*"


def channel(prefix: str) -> str:
    return f"{prefix}:blocks"


def limit_key(pairs: list[tuple[str, str]]) -> str:
    return "|".join(f"{dim}={value}" for dim, value in pairs)
