"""What an ingest token may say in the events it sends to ``POST /v1/events``.

An event's fields decide what it counts against and what it bills, so a token may set only what its holder
is trusted with. Two kinds of holder send events:

- a **gateway** (infrastructure the operator runs, like the Python middleware) reports the client's
  address, the requests it refused itself and the plan of keys it knows: its token carries ``gateway``;
- a **tenant's upload** (a batch of usage from a tenant's own systems) may say none of that: an event of
  such a token that sets ``client_ip`` or ``edge_blocked``, or a ``plan`` for a key the registry does not
  know, is refused. (A registered key's event always takes the key's own plan.)

Every token is bounded, whatever its kind: the cost of one event (`Bounds.max_cost`, or the token's
``max_cost``), the event time (from ``past`` before now to ``future`` after it; a gateway flushing a
backlog after a Kafka outage needs a ``past`` as long as the outage it should survive), and the method
(HTTP methods and ``WEBSOCKET``). Routes of an upload token are counted under the deployment's route
templates (`Bounds.routes`, shell globs) or, when none matches, under `OTHER_ROUTE`, so an upload cannot
mint route values without end; a gateway's routes are its own templates, and are held to the list too when
one is configured.

A refusal names the field (``cost: 1000000 is above ...``), as the response's ``errors`` list shows it.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass

import msgspec

from throttlex.ingest.events import UsageEvent
from throttlex.ingest.routes import UNMATCHED

OTHER_ROUTE = "other"
"""The route an upload's event is counted under when the deployment's templates do not include its own."""

METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT", "WEBSOCKET"})

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhd]?)")


@dataclass(frozen=True)
class TokenScope:
    """A token's own bounds; None takes the deployment's (`Bounds`)."""

    gateway: bool = False
    max_cost: int | None = None
    past_s: float | None = None
    future_s: float | None = None

    def describe(self) -> str:
        return "gateway" if self.gateway else "upload"


GATEWAY = TokenScope(gateway=True)
"""An admin token's scope when it sends events."""


@dataclass(frozen=True)
class Bounds:
    """The deployment's defaults (settings ``THROTTLEX_INGEST_*``)."""

    max_cost: int
    past_s: float
    future_s: float
    routes: tuple[str, ...] = ()


class Refused(ValueError):
    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")


def parse_options(options: list[str], where: str) -> TokenScope:
    """``gateway``, ``max_cost=<n>``, ``past=<duration>``, ``future=<duration>`` (a duration is seconds, or a
    number with ``s``, ``m``, ``h`` or ``d``)."""
    values: dict[str, object] = {}
    for option in options:
        name, equals, value = option.partition("=")
        if name == "gateway" and not equals:
            values["gateway"] = True
        elif name == "max_cost" and value.isdigit() and int(value) <= 1_000_000:
            values["max_cost"] = int(value)
        elif name in ("past", "future") and (duration := _DURATION.fullmatch(value)):
            values[f"{name}_s"] = float(duration[1]) * _UNITS[duration[2] or "s"]
        else:
            raise ValueError(f"{where}: option {option!r} is not gateway, max_cost=<0..1000000>, past=<duration> or "
                             "future=<duration> (a duration: 90, 90s, 15m, 6h or 30d)")  # fmt: skip
    return TokenScope(**values)  # type: ignore[arg-type]


def admit(event: UsageEvent, scope: TokenScope, bounds: Bounds, now_ms: int, key_plan: str | None) -> UsageEvent:
    """The event as stored, or `Refused` naming the first field the token may not say. ``key_plan`` is the plan
    of the event's key if it is registered (the event takes it, whatever it says), else None."""
    max_cost = bounds.max_cost if scope.max_cost is None else scope.max_cost
    if event.cost > max_cost:
        raise Refused("cost", f"{event.cost} is above this token's ceiling of {max_cost}")
    past_s = bounds.past_s if scope.past_s is None else scope.past_s
    future_s = bounds.future_s if scope.future_s is None else scope.future_s
    if event.event_time_ms < now_ms - past_s * 1000:
        raise Refused("event_time_ms", f"more than {past_s:g} s before now, the most this token may date an event back")
    if event.event_time_ms > now_ms + future_s * 1000:
        raise Refused("event_time_ms", f"more than {future_s:g} s after now, the most this token may date an event ahead")
    if event.method not in METHODS:
        raise Refused("method", f"{event.method!r} is not an HTTP method ({', '.join(sorted(METHODS))})")
    if not scope.gateway:
        claimed = {"client_ip": event.client_ip != "", "edge_blocked": event.edge_blocked,
                   "plan": event.plan != "" and key_plan is None}  # fmt: skip
        for field, set_ in claimed.items():
            if set_:
                raise Refused(field, "only a gateway's token may set it (the token's kind is upload)")
    route = event.route
    if route != UNMATCHED and (bounds.routes or not scope.gateway):
        if not any(fnmatch.fnmatchcase(route, pattern) for pattern in bounds.routes):
            route = OTHER_ROUTE
    plan = event.plan if key_plan is None else key_plan
    return event if (route, plan) == (event.route, event.plan) else msgspec.structs.replace(event, route=route, plan=plan)
