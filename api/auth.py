"""Who is calling: the API key from the configured header (or ``Authorization: Bearer``)."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import HTTPException, Request

from api import metrics
from ingest.blocklist import limit_key
from ingest.events import key_id_for


@dataclass(frozen=True)
class CallerKey:
    key_id: str
    limit_key: str


def caller_key(request: Request) -> CallerKey:
    settings = request.app.state.settings
    api_key = request.headers.get(settings.api_key_header)
    if api_key is None:
        scheme, _, credential = request.headers.get("authorization", "").partition(" ")
        api_key = credential if scheme.lower() == "bearer" and credential else None
    if not api_key:
        metrics.AUTH_FAILURES.inc()
        raise HTTPException(
            status_code=401,
            detail=f"missing API key: send it in the {settings.api_key_header} header or as 'Authorization: Bearer <key>'",
            headers={"WWW-Authenticate": "Bearer"},
        )
    key_id = key_id_for(api_key, settings.key_salt_bytes)
    return CallerKey(key_id=key_id, limit_key=limit_key([("api_key", key_id)]))
