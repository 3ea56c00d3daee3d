"""Named credentials: who an admin is, and which tenants a gateway may send events for.

Both lists are comma-separated (or one entry per line, in a tokens file):

- an admin token is ``<name>:<token>``; the name is what the audit trail records as the actor;
- an ingest token is ``<name>[;<option>...]:<tenants>:<token>``, ``<tenants>`` being tenant names joined
  with ``+`` (``eu-gateways:acme+globex:…``) or ``*`` for every tenant. An event for another tenant is
  refused, and the events a token sends are stored with ``source = ingest:<name>``. The options say what
  else the token may put in an event (`api.ingest_scope`): ``gateway`` (client addresses, edge refusals,
  plans of unknown keys), ``max_cost=<n>``, ``past=<duration>``, ``future=<duration>``, as in
  ``edge-eu;gateway;past=6h:*:…``. A token without options is an upload token with the deployment's bounds.

Names are letters, digits, ``.``, ``_`` and ``-``; a token is everything after the last separator it needs,
so it may itself hold ``:``. A malformed entry stops the API at start-up with the entry's position and the
expected form (never the token itself).
"""

from __future__ import annotations

import hmac
import re
from dataclasses import dataclass, field

from throttlex.api.ingest_scope import GATEWAY, TokenScope, parse_options

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
ANY_TENANT = "*"


@dataclass(frozen=True)
class Credential:
    name: str
    token: str = field(repr=False)
    tenants: frozenset[str] | None = None
    """The tenants an ingest token may send events for; None: every tenant (and every admin token)."""
    scope: TokenScope = GATEWAY
    """What the token may say in an event (an admin token: as a gateway)."""

    def allows(self, tenant: str) -> bool:
        return self.tenants is None or tenant in self.tenants

    def describe_tenants(self) -> str:
        return "every tenant" if self.tenants is None else ", ".join(sorted(self.tenants))


def entries(text: str) -> list[str]:
    return [entry.strip() for entry in re.split(r"[,\s]+", text) if entry.strip()]


def parse_admin(text: str, variable: str) -> list[Credential]:
    """``name:token`` entries."""
    credentials = []
    for position, entry in enumerate(entries(text), 1):
        name, separator, token = entry.partition(":")
        if not separator or not _NAME.fullmatch(name) or not token:
            raise ValueError(f"{variable} entry {position} is not <name>:<token> (the name is recorded in the audit trail)")
        credentials.append(Credential(name, token))
    return _distinct(credentials, variable)


def parse_ingest(text: str, variable: str) -> list[Credential]:
    """``name[;option...]:tenant+tenant:token`` entries (``*`` for every tenant)."""
    credentials = []
    for position, entry in enumerate(entries(text), 1):
        parts = entry.split(":", 2)
        name, *options = parts[0].split(";")
        tenants = parts[1].split("+") if len(parts) == 3 else []
        if len(parts) != 3 or not _NAME.fullmatch(name) or not parts[2] or not tenants or not all(
            tenant == ANY_TENANT or _NAME.fullmatch(tenant) for tenant in tenants
        ):  # fmt: skip
            raise ValueError(
                f"{variable} entry {position} is not <name>[;<option>...]:<tenant>[+<tenant>...]:<token> "
                "(tenant * for every tenant)"
            )
        scope = parse_options(options, f"{variable} entry {position}")
        credentials.append(Credential(name, parts[2], None if ANY_TENANT in tenants else frozenset(tenants), scope))
    return _distinct(credentials, variable)


def _distinct(credentials: list[Credential], variable: str) -> list[Credential]:
    names = [credential.name for credential in credentials]
    if len(set(names)) != len(names):
        raise ValueError(f"{variable} names a credential twice: each name must be unique")
    if len({credential.token for credential in credentials}) != len(credentials):
        raise ValueError(f"{variable} gives one token twice: each credential needs its own")
    return credentials


def match(presented: str, credentials: list[Credential]) -> Credential | None:
    """The credential whose token was presented. Every token is compared, in constant time each, so the
    time taken does not depend on which one matched."""
    found = None
    for credential in credentials:
        if hmac.compare_digest(presented.encode(), credential.token.encode()):
            found = credential
    return found
