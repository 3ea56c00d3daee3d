"""`throttlex policies import-envoy`: an envoyproxy/ratelimit configuration as ThrottleX policies.

envoyproxy/ratelimit counts, per domain, the descriptors Envoy sends: a tree of ``key`` (and optionally
``value``) entries, each path with a ``rate_limit`` of ``requests_per_unit`` per ``unit`` (a fixed window
aligned to the unit). Each path with a rate limit becomes one policy:

- the path's keys become the policy's ``key`` (what is counted together), through the same mapping of
  descriptor keys to dimensions that throttlex-rls uses (`DESCRIPTOR_ROLES`: ``remote_address`` is ``ip``,
  ``generic_key`` and ``route`` are ``route``…);
- a ``value`` on a route, method or tenant key becomes the policy's ``match`` (the limit applies to that
  route, method or tenant only); a value on ``api_key`` or ``ip`` (one caller's own limit) has no policy form
  and is refused: give that key its own plan instead;
- the limit is a ``fixed_window`` of ``requests_per_unit`` over the unit (second to week), as envoyproxy/ratelimit
  counts it; ``shadow_mode`` becomes ``shadow``; ``unlimited`` paths make no policy.

What cannot be carried over is refused with its line and the reason, never dropped: an unknown descriptor key,
a dimension named twice on one path, a month or year unit (a plan's monthly units are the ThrottleX form),
``replaces`` (ThrottleX applies every policy that matches). The result is checked as a policy file before it
is written. One difference in meaning remains and is said in docs/envoy.md: envoyproxy/ratelimit applies the
most specific descriptor Envoy sent, ThrottleX every policy whose match holds.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import yaml

from throttlex.processors.core.policy import PolicyFileError, parse_policies

DESCRIPTOR_ROLES: dict[str, str] = {
    "remote_address": "ip",
    "api_key": "api_key",
    "tenant": "tenant",
    "route": "route",
    "generic_key": "route",
    "method": "method",
    "request_id": "request_id",
    "x-forwarded-for": "forwarded_for",
    "forwarded": "forwarded",
}
"""Descriptor entry key -> what throttlex-rls reads from it (its defaults; tests/conformance holds both sides)."""

UNIT_SECONDS = {"second": 1, "minute": 60, "hour": 3_600, "day": 86_400, "week": 604_800}
ROLES = {"api_key", "tenant", "ip", "route", "method", "request_id", "forwarded_for", "forwarded", "ignore"}
"""What a descriptor entry may carry (throttlex-rls refuses any other role in THROTTLEX_RLS_DESCRIPTORS)."""
_MATCHES = {"route": "routes", "method": "methods", "tenant": "tenants"}
_IGNORED = {"detailed_metric", "value_to_metric", "name"}
_DESCRIPTOR_FIELDS = {"key", "value", "rate_limit", "shadow_mode", "descriptors", *_IGNORED}
_LIMIT_FIELDS = {"unit", "requests_per_unit", "unlimited", "name", "replaces"}
_NAME_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def roles_from(setting: str) -> dict[str, str]:
    """`DESCRIPTOR_ROLES` with a deployment's ``THROTTLEX_RLS_DESCRIPTORS`` (``entry=role,…``) on top, as
    throttlex-rls reads it."""
    roles = dict(DESCRIPTOR_ROLES)
    for pair in filter(None, (part.strip() for part in setting.split(","))):
        entry, _, role = pair.partition("=")
        if not entry.strip() or role.strip() not in ROLES:
            raise EnvoyImportError(f"THROTTLEX_RLS_DESCRIPTORS: {pair!r} is not entry=role (roles: {', '.join(sorted(ROLES))})")
        roles[entry.strip()] = role.strip()
    return roles


class EnvoyImportError(ValueError):
    """The configuration cannot be read at all (not YAML, no descriptors)."""


@dataclass
class Imported:
    """The policies made, what was refused (line: reason) and what was left aside on purpose (line: note)."""

    policies: list[dict[str, Any]] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def document(self) -> str:
        return yaml.safe_dump({"policies": self.policies}, sort_keys=False, width=120)


def import_envoy(text: str, source: str, roles: dict[str, str] | None = None) -> Imported:
    """Translate one envoyproxy/ratelimit configuration (its YAML text); ``source`` names it in messages."""
    roles = DESCRIPTOR_ROLES if roles is None else roles
    try:
        root = yaml.compose(text)
    except yaml.YAMLError as exc:
        raise EnvoyImportError(f"{source}: not valid YAML: {exc}") from None
    if not isinstance(root, yaml.MappingNode):
        raise EnvoyImportError(f"{source}: an envoyproxy/ratelimit configuration is a mapping with domain and descriptors")
    top = _mapping(root)
    domain = _scalar(top.get("domain")) or "envoy"
    if "descriptors" not in top:
        raise EnvoyImportError(f"{source}: no descriptors")
    out = Imported()
    out.notes.append(f"{source}: domain {domain}: ThrottleX policies apply to every request throttlex-rls checks, "
                     "whatever its domain")  # fmt: skip
    _walk(top["descriptors"], [], domain, roles, source, out)
    if out.policies:
        try:
            parse_policies(out.document(), source)
        except PolicyFileError as exc:  # a translation this module should not make: say so, do not write it
            raise EnvoyImportError(f"{source}: the translation is not a valid policy file: {exc}") from None
    return out


@dataclass(frozen=True)
class _Step:
    key: str
    dimension: str
    value: str | None


def _walk(node: yaml.Node, path: list[_Step], domain: str, roles: dict[str, str], source: str, out: Imported) -> None:
    if not isinstance(node, yaml.SequenceNode):
        out.refused.append(f"{source}:{node.start_mark.line + 1}: descriptors must be a list")
        return
    for item in node.value:
        where = f"{source}:{item.start_mark.line + 1}"
        if not isinstance(item, yaml.MappingNode):
            out.refused.append(f"{where}: a descriptor is a mapping with a key")
            continue
        fields = _mapping(item)
        for name in sorted(set(fields) - _DESCRIPTOR_FIELDS):
            out.notes.append(f"{source}:{fields[name].start_mark.line + 1}: unknown field {name!r} left aside")
        key, value = _scalar(fields.get("key")), _scalar(fields.get("value"))
        dimension = roles.get(key or "")
        if not key:
            out.refused.append(f"{where}: a descriptor without a key")
            continue
        if dimension not in ("api_key", "tenant", "ip", "route", "method"):
            reason = "not a dimension ThrottleX counts by" if dimension else "unknown descriptor key"
            out.refused.append(f"{where}: descriptor key {key!r}: {reason} (known: {', '.join(sorted(roles))}); "
                               "map it with THROTTLEX_RLS_DESCRIPTORS or drop it")  # fmt: skip
            _refuse_nested(fields, where, out)
            continue
        if any(step.dimension == dimension for step in path):
            out.refused.append(f"{where}: descriptor key {key!r} names {dimension}, already on this path: nested beyond "
                               "ThrottleX's dimensions")  # fmt: skip
            _refuse_nested(fields, where, out)
            continue
        if value is not None and dimension not in _MATCHES:
            out.refused.append(f"{where}: a limit for one {dimension} value ({key}: {value}) has no policy form; "
                               "give that key its own plan or policy match instead")  # fmt: skip
            _refuse_nested(fields, where, out)
            continue
        here = [*path, _Step(key, dimension, value)]
        for name in sorted(set(fields) & _IGNORED):
            out.notes.append(f"{source}:{fields[name].start_mark.line + 1}: {name} left aside (metrics naming only)")
        if "rate_limit" in fields:
            _policy(fields["rate_limit"], fields.get("shadow_mode"), here, domain, f"{source}:{item.start_mark.line + 1}", out)
        if "descriptors" in fields:
            _walk(fields["descriptors"], here, domain, roles, source, out)


def _refuse_nested(fields: dict[str, yaml.Node], where: str, out: Imported) -> None:
    """A refused descriptor's nested descriptors go with it: said, not dropped."""
    nested = fields.get("descriptors")
    if isinstance(nested, yaml.SequenceNode) and nested.value:
        lines = ", ".join(str(item.start_mark.line + 1) for item in nested.value)
        out.refused.append(f"{where}: its nested descriptors (lines {lines}) are refused with it")


def _boolean(node: yaml.Node | None, name: str, where: str, out: Imported) -> bool | None:
    """A YAML boolean (envoyproxy/ratelimit reads YAML 1.1: true, yes, on…); None, with a refusal, if it is not one."""
    if node is None:
        return False
    if isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:bool":
        value: bool = yaml.safe_load(node.value)
        return value
    out.refused.append(f"{where}: {name} must be true or false, not {_scalar(node)!r}")
    return None


def _policy(node: yaml.Node, shadow_node: yaml.Node | None, path: list[_Step], domain: str, where: str, out: Imported) -> None:
    limit = _mapping(node) if isinstance(node, yaml.MappingNode) else {}
    for name in sorted(set(limit) - _LIMIT_FIELDS):
        out.notes.append(f"{where}: unknown rate_limit field {name!r} left aside")
    if "name" in limit:
        out.notes.append(f"{where}: rate_limit name left aside (the policy is named after its path)")
    if "replaces" in limit:
        out.refused.append(f"{where}: replaces has no ThrottleX form: every matching policy applies")
        return
    unlimited, shadow = _boolean(limit.get("unlimited"), "unlimited", where, out), _boolean(shadow_node, "shadow_mode", where, out)
    if unlimited is None or shadow is None:
        return
    if unlimited:
        out.notes.append(f"{where}: unlimited: no policy")
        return
    unit = (_scalar(limit.get("unit")) or "").lower()
    if unit not in UNIT_SECONDS:
        reason = "a calendar period: use a plan's monthly_units" if unit in ("month", "year") else "unknown unit"
        out.refused.append(f"{where}: unit {unit or '(none)'!r}: {reason}")
        return
    try:
        per_unit = int(_scalar(limit.get("requests_per_unit")) or "")
    except ValueError:
        out.refused.append(f"{where}: requests_per_unit must be a whole number")
        return
    if per_unit < 1:
        out.refused.append(f"{where}: requests_per_unit {per_unit}: a limit of nothing blocks every request; not imported")
        return
    match: dict[str, list[str]] = {}
    for step in path:
        if step.value is not None:
            match[_MATCHES[step.dimension]] = [step.value]
    name = _NAME_UNSAFE.sub("-", ".".join([domain, *(f"{s.key}-{s.value}" if s.value else s.key for s in path)]))[:64]
    policy: dict[str, Any] = {"name": name}
    if match:
        policy["match"] = match
    policy["key"] = [step.dimension for step in path]
    policy["algorithm"] = {"type": "fixed_window", "limit": per_unit, "window_s": UNIT_SECONDS[unit]}
    if shadow:
        policy["shadow"] = True
    if any(p["name"] == name for p in out.policies):
        out.refused.append(f"{where}: a second descriptor path named {name}")
        return
    out.policies.append(policy)


def _mapping(node: yaml.MappingNode) -> dict[str, yaml.Node]:
    return {key.value: value for key, value in node.value if isinstance(key, yaml.ScalarNode)}


def _scalar(node: yaml.Node | None) -> str | None:
    return node.value if isinstance(node, yaml.ScalarNode) else None
