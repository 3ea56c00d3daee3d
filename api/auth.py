"""Who is calling: an admin (a named admin token), a gateway (a named ingest token, scoped to tenants) or an
API key.

Credentials come as ``Authorization: Bearer <token-or-key>`` or, for API keys, in the configured
key header (``x-api-key``). Tokens are compared in constant time (`api.credentials`). An API key is turned into its key
id and looked up in the registry this process follows; unknown, suspended, revoked and expired keys
get 401, like a missing credential. A valid key calling an admin endpoint gets 403.
"""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import HTTPException, Request

from throttlex.api import metrics
from throttlex.api.credentials import Credential, match
from throttlex.ingest.denylist_entries import limit_key
from throttlex.ingest.clock import wall_clock_ms
from throttlex.ingest.events import key_id_for
from throttlex.processors.registry import Registry


@dataclass(frozen=True)
class CallerKey:
    key_id: str
    limit_key: str
    tenant: str
    plan: str
    """Empty: the default plan."""


@dataclass(frozen=True)
class Caller:
    """An admin (``key`` is None; ``admin_name`` names the credential) or the holder of one API key."""

    key: CallerKey | None
    admin_name: str = ""

    @property
    def admin(self) -> bool:
        return self.key is None


def _bearer(request: Request) -> str | None:
    scheme, _, credential = request.headers.get("authorization", "").partition(" ")
    return credential.strip() or None if scheme.lower() == "bearer" else None


def _unauthorized(detail: str) -> HTTPException:
    metrics.AUTH_FAILURES.inc()
    return HTTPException(status_code=401, detail=detail, headers={"WWW-Authenticate": "Bearer"})


def caller(request: Request) -> Caller:
    """An admin or an API key; 401 if neither is presented."""
    settings = request.app.state.settings
    bearer = _bearer(request)
    admin_credential = match(bearer, settings.admin_credentials) if bearer is not None else None
    if admin_credential is not None:
        return Caller(key=None, admin_name=admin_credential.name)
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


def admin(request: Request) -> str:
    """An admin token's name; a valid API key gets 403, anything else 401."""
    who = caller(request)
    if who.key is not None:
        metrics.AUTH_FAILURES.inc()
        raise HTTPException(status_code=403, detail="admin endpoints need an admin token")
    return who.admin_name


def caller_key(request: Request) -> CallerKey:
    """The calling API key; admins have no quota of their own."""
    who = caller(request)
    if who.key is None:
        raise HTTPException(status_code=400, detail="an admin token has no quota; call with an API key")
    return who.key


def gateway(request: Request) -> Credential:
    """A gateway sending events: an ingest token, which may send events for its tenants only, or an admin
    token (every tenant). The credential's name is recorded on the events it sends."""
    settings = request.app.state.settings
    bearer = _bearer(request)
    if bearer is None:
        raise _unauthorized("missing credentials: send an ingest token as 'Authorization: Bearer <token>'")
    found = match(bearer, settings.ingest_credentials)
    if found is not None:
        return found
    found = match(bearer, settings.admin_credentials)
    if found is not None:
        return Credential(f"admin:{found.name}", found.token)  # every tenant, as a gateway
    metrics.AUTH_FAILURES.inc()
    raise HTTPException(status_code=403, detail="this token may not send events")
