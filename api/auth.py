"""Who is calling: an admin (a configured admin token), a gateway (an ingest token) or an API key.

Credentials come as ``Authorization: Bearer <token-or-key>`` or, for API keys, in the configured
key header (``x-api-key``). Tokens are compared in constant time. An API key is turned into its key
id and looked up in the registry this process follows; unknown, suspended, revoked and expired keys
get 401, like a missing credential. A valid key calling an admin endpoint gets 403.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass

from fastapi import HTTPException, Request

from api import metrics
from ingest.denylist_entries import limit_key
from ingest.clock import wall_clock_ms
from ingest.events import key_id_for
from processors.registry import Registry


@dataclass(frozen=True)
class CallerKey:
    key_id: str
    limit_key: str
    tenant: str
    plan: str
    """Empty: the default plan."""


@dataclass(frozen=True)
class Caller:
    """An admin (``key`` is None) or the holder of one API key."""

    key: CallerKey | None

    @property
    def admin(self) -> bool:
        return self.key is None


def _bearer(request: Request) -> str | None:
    scheme, _, credential = request.headers.get("authorization", "").partition(" ")
    return credential.strip() or None if scheme.lower() == "bearer" else None


def _matches(credential: str, tokens: list[str]) -> bool:
    found = False
    for token in tokens:  # no early exit: the time taken does not depend on which token matched
        found |= hmac.compare_digest(credential.encode(), token.encode())
    return found


def _unauthorized(detail: str) -> HTTPException:
    metrics.AUTH_FAILURES.inc()
    return HTTPException(status_code=401, detail=detail, headers={"WWW-Authenticate": "Bearer"})


def caller(request: Request) -> Caller:
    """An admin or an API key; 401 if neither is presented."""
    settings = request.app.state.settings
    bearer = _bearer(request)
    if bearer is not None and _matches(bearer, settings.admin_token_list):
        return Caller(key=None)
    api_key = request.headers.get(settings.api_key_header) or bearer
    if not api_key:
        raise _unauthorized(
            f"missing credentials: send an API key in the {settings.api_key_header} header "
            "or as 'Authorization: Bearer <key>'"
        )
    key_id = key_id_for(api_key, settings.key_salt_bytes)
    registry: Registry = request.app.state.registry
    record = registry.keys.get(key_id)
    if record is None or not record.admits(key_id, wall_clock_ms()):
        raise _unauthorized("unknown, suspended, revoked or expired API key")
    key = CallerKey(key_id=key_id, limit_key=limit_key([("api_key", key_id)]), tenant=record.tenant, plan=record.plan)
    return Caller(key=key)


def admin(request: Request) -> None:
    """An admin token; a valid API key gets 403, anything else 401."""
    if caller(request).key is not None:
        metrics.AUTH_FAILURES.inc()
        raise HTTPException(status_code=403, detail="admin endpoints need an admin token")


def caller_key(request: Request) -> CallerKey:
    """The calling API key; admins have no quota of their own."""
    who = caller(request)
    if who.key is None:
        raise HTTPException(status_code=400, detail="an admin token has no quota; call with an API key")
    return who.key


def gateway(request: Request) -> None:
    """A gateway sending events: an ingest token (or an admin token)."""
    settings = request.app.state.settings
    bearer = _bearer(request)
    if bearer is None:
        raise _unauthorized("missing credentials: send an ingest token as 'Authorization: Bearer <token>'")
    if not _matches(bearer, settings.ingest_token_list + settings.admin_token_list):
        metrics.AUTH_FAILURES.inc()
        raise HTTPException(status_code=403, detail="this token may not send events")
