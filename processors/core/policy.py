"""Policies: what is limited, by which key, with which algorithm. Loaded from YAML and validated.

Example (``deploy/config/policies.yaml`` has one policy per algorithm)::

    policies:
      - name: per-key-burst
        match: {routes: ["/v1/*"], methods: [GET, POST]}
        key: [api_key]
        algorithm: {type: sliding_window, limit: 100, window_s: 10, bucket_s: 1}
      - name: monthly-quota
        key: [api_key]
        algorithm: {type: quota, period: month, time_zone: Europe/Berlin}   # limit from the plan
    plans:
      free: {monthly_units: 100000}
    default_plan: free
"""

from __future__ import annotations

import fnmatch
from functools import cached_property
from pathlib import Path
from typing import Annotated, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

from throttlex.ingest.denylist_entries import DIMENSIONS, Dimension, event_limit_key
from throttlex.ingest.events import UsageEvent
from throttlex.processors.core.windows import CalendarQuota, FixedWindow, Limiter, Period, SlidingWindow, TokenBucket


MAX_UNITS = 10**15
"""Largest limit, burst, rate or plan quota: far above any real use, small enough for exact arithmetic."""
MAX_WINDOW_S = 366 * 86_400
MAX_BUCKETS = 100_000
"""Buckets per sliding window: each is a number in every key's state."""
MAX_ORIGIN_S = 10**10


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Match(_Strict):
    routes: list[str] = Field(default_factory=lambda: ["*"], description="shell-style route globs")
    methods: list[str] | None = Field(None, description="HTTP methods; all when omitted")
    tenants: list[str] | None = Field(None, description="tenants; all when omitted")
    plans: list[str] | None = Field(None, description="plans of the calling key; all when omitted")

    def applies_to(self, route: str, method: str, tenant: str, plan: str | None) -> bool:
        if self.methods is not None and method.upper() not in self.methods:
            return False
        if self.tenants is not None and tenant not in self.tenants:
            return False
        if self.plans is not None and plan not in self.plans:
            return False
        return any(fnmatch.fnmatchcase(route, pattern) for pattern in self.routes)

    @model_validator(mode="after")
    def _upper_methods(self) -> Match:
        if self.methods is not None:
            object.__setattr__(self, "methods", [method.upper() for method in self.methods])
        return self


class SlidingWindowAlgorithm(_Strict):
    type: Literal["sliding_window"]
    limit: int = Field(gt=0, le=MAX_UNITS, description="cost units allowed in any window")
    window_s: float = Field(ge=0.001, le=MAX_WINDOW_S, description="window length in seconds")
    bucket_s: float = Field(1.0, ge=0.001, le=MAX_WINDOW_S, description="resolution at which the window is exact")

    @property
    def window_ms(self) -> int:
        return round(self.window_s * 1000)

    @property
    def bucket_ms(self) -> int:
        return round(self.bucket_s * 1000)

    def new_window(self, lateness_ms: int) -> SlidingWindow:
        return SlidingWindow(self.window_ms, self.bucket_ms, lateness_ms)

    @model_validator(mode="after")
    def _whole_buckets(self) -> SlidingWindowAlgorithm:
        if self.bucket_ms <= 0 or self.window_ms % self.bucket_ms:
            raise ValueError("window_s must be a whole multiple of bucket_s (at millisecond precision)")
        if self.window_ms // self.bucket_ms > MAX_BUCKETS:
            raise ValueError(f"at most {MAX_BUCKETS} buckets per window: make bucket_s larger")
        return self


class FixedWindowAlgorithm(_Strict):
    type: Literal["fixed_window"]
    limit: int = Field(gt=0, le=MAX_UNITS, description="cost units allowed per window")
    window_s: float = Field(ge=0.001, le=MAX_WINDOW_S, description="window length in seconds")
    origin_s: float = Field(0, ge=0, le=MAX_ORIGIN_S, description="windows start at origin + k * window (Unix seconds)")

    def new_window(self, lateness_ms: int) -> FixedWindow:
        return FixedWindow(round(self.window_s * 1000), round(self.origin_s * 1000), lateness_ms)


class TokenBucketAlgorithm(_Strict):
    type: Literal["token_bucket"]
    rate_per_s: float = Field(ge=1e-6, le=MAX_UNITS, description="tokens (cost units) refilled per second")
    burst: int = Field(gt=0, le=MAX_UNITS, description="bucket size: units a full bucket admits at once")

    @property
    def limit(self) -> int:
        return self.burst

    @property
    def window_s(self) -> float:
        """The time an empty bucket takes to fill."""
        return self.burst / self.rate_per_s

    def new_window(self, lateness_ms: int) -> TokenBucket:
        return TokenBucket(self.rate_per_s, self.burst, lateness_ms)


class QuotaAlgorithm(_Strict):
    type: Literal["quota"]
    period: Period = Field(description="day or month, in time_zone")
    time_zone: str = Field("UTC", description="IANA time zone whose midnights start the periods")
    limit: int | None = Field(
        None, gt=0, le=MAX_UNITS, description="units per period; when omitted, the key's plan's daily_units or monthly_units"
    )

    @property
    def window_s(self) -> float:
        return 86_400.0 if self.period == "day" else 31 * 86_400.0

    @cached_property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.time_zone)

    def new_window(self, lateness_ms: int) -> CalendarQuota:
        return CalendarQuota(self.period, self.zone, lateness_ms)

    @model_validator(mode="after")
    def _known_zone(self) -> QuotaAlgorithm:
        try:
            ZoneInfo(self.time_zone)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {self.time_zone!r} (use an IANA name such as Europe/Berlin)") from None
        return self


Algorithm = Annotated[
    SlidingWindowAlgorithm | FixedWindowAlgorithm | TokenBucketAlgorithm | QuotaAlgorithm,
    Field(discriminator="type"),
]


class OnBreach(_Strict):
    min_block_s: float = Field(
        0, ge=0, le=MAX_WINDOW_S, description="block at least this long after the breaching event; 0: until the window admits again"
    )


class Policy(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    match: Match = Field(default_factory=Match)
    key: tuple[Dimension, ...] = Field(min_length=1, description="what is counted together, e.g. [tenant, route]")
    algorithm: Algorithm
    route_costs: dict[str, Annotated[int, Field(ge=0, le=1_000_000)]] = Field(
        default_factory=dict, description="route glob to cost units; the first match overrides the event's cost"
    )
    on_breach: OnBreach = Field(default_factory=OnBreach)
    allowed_lateness_s: float = Field(5.0, ge=0, le=86_400, description=(
        "how much of a token bucket's history is kept to place late events in time order (older ones count at its "
        "start); windows and quotas count every event of a period still open"))
    shadow: bool = Field(False, description="count and report, never block")

    @model_validator(mode="after")
    def _canonical_key(self) -> Policy:
        if len(set(self.key)) != len(self.key):
            raise ValueError("key names a dimension twice")
        object.__setattr__(self, "key", tuple(dim for dim in DIMENSIONS if dim in self.key))
        return self

    @property
    def partitioned_by_api_key(self) -> bool:
        """Events arrive partitioned by API key; a key without ``api_key`` needs them regrouped first."""
        return "api_key" in self.key

    def limit_key(self, event: UsageEvent) -> str:
        return event_limit_key(self.key, event)

    def cost(self, event: UsageEvent) -> int:
        route_cost = self.route_cost(event.route)
        return event.cost if route_cost is None else route_cost

    def route_cost(self, route: str) -> int | None:
        """The cost ``route_costs`` sets for ``route``, or None: the event's own cost counts."""
        for pattern, cost in self.route_costs.items():
            if fnmatch.fnmatchcase(route, pattern):
                return cost
        return None

    def new_window(self) -> Limiter:
        return self.algorithm.new_window(round(self.allowed_lateness_s * 1000))


class Plan(_Strict):
    monthly_units: int = Field(gt=0, le=MAX_UNITS, description="billable cost units per calendar month")
    daily_units: int | None = Field(None, gt=0, le=MAX_UNITS, description="billable cost units per day (quota policies)")

    def units(self, period: Period) -> int | None:
        return self.monthly_units if period == "month" else self.daily_units


class PolicySet(_Strict):
    policies: list[Policy]
    plans: dict[str, Plan] = Field(default_factory=dict, description="plan name to its quotas")
    default_plan: str | None = Field(None, description="the plan of keys that name none")
    _by_name: dict[str, Policy] = PrivateAttr(default_factory=dict)

    @model_validator(mode="after")
    def _unique_names(self) -> PolicySet:
        names = [policy.name for policy in self.policies]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"policy names must be unique; repeated: {', '.join(duplicates)}")
        if self.default_plan is not None and self.default_plan not in self.plans:
            raise ValueError(f"default_plan {self.default_plan!r} is not one of the plans: {', '.join(self.plans) or 'none'}")
        for policy in self.policies:
            algorithm = policy.algorithm
            plan_limit = isinstance(algorithm, QuotaAlgorithm) and algorithm.limit is None
            if isinstance(algorithm, QuotaAlgorithm) and plan_limit:
                if not any(plan.units(algorithm.period) for plan in self.plans.values()):
                    field = "monthly_units" if algorithm.period == "month" else "daily_units"
                    raise ValueError(f"policy {policy.name!r}: a quota without a limit needs plans with {field}")
            _check_plans_on_shared_key(policy, plan_limit)
        self._by_name.update((policy.name, policy) for policy in self.policies)
        return self

    def plan_of(self, event: UsageEvent) -> str | None:
        """The calling key's plan: the one the event names, else the default plan."""
        return event.plan or self.default_plan

    def matching(self, event: UsageEvent) -> list[Policy]:
        plan = self.plan_of(event)
        return [p for p in self.policies if p.match.applies_to(event.route, event.method, event.tenant, plan)]

    def limit_of(self, policy: Policy, plan: str | None) -> int | None:
        """The policy's limit for a key on ``plan``; None when that plan sets no limit for it."""
        algorithm = policy.algorithm
        if isinstance(algorithm, QuotaAlgorithm):
            if algorithm.limit is not None:
                return algorithm.limit
            known = self.plans.get(plan) if plan is not None else None
            return known.units(algorithm.period) if known is not None else None
        return algorithm.limit

    def known_plan(self, plan: str | None) -> str:
        """``plan`` as a key stores it ('' for the default plan); ValueError if it is not one of the plans."""
        if plan and plan not in self.plans:
            raise ValueError(f"unknown plan {plan!r}; plans: {', '.join(sorted(self.plans)) or 'none'}")
        return plan or ""

    def by_name(self, name: str) -> Policy | None:
        return self._by_name.get(name)


def _check_plans_on_shared_key(policy: Policy, plan_limit: bool) -> None:
    """The rule for plans on shared keys. A limit key without ``api_key`` (``[tenant]``, ``[ip]``…) is shared
    by keys that may be on different plans, and its one block refuses them all. So such a policy may
    neither take its limit from the calling key's plan (it would change with whichever key's event came,
    and a free key's event would block a tenant's pro keys) nor match on plans (its block would refuse
    the keys of the plans it does not match): it is refused when the policies are read."""
    if "api_key" in policy.key:
        return
    shared = f"policy {policy.name!r}: keyed on [{', '.join(policy.key)}], which keys of different plans share,"
    if plan_limit:
        raise ValueError(f"{shared} it cannot take its limit from the calling key's plan; give it a limit, or key it on api_key")
    if policy.match.plans is not None:
        raise ValueError(f"{shared} it cannot match on plans (its block would refuse keys of every plan); "
                         "drop match.plans, or key it on api_key")  # fmt: skip


class PolicyFileError(ValueError):
    """A policy file that cannot be used; the message names the file, the policy and the defect."""


def load_policies(path: Path) -> PolicySet:
    try:
        text = path.read_text()
    except OSError as exc:
        raise PolicyFileError(f"{path}: cannot read policy file: {exc.strerror}") from None
    return parse_policies(text, str(path))


def parse_policies(text: str, source: str) -> PolicySet:
    """Validate a policy document; errors name ``source`` (a file name), the policy and the defect."""
    path = source
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise PolicyFileError(f"{path}: not valid YAML: {exc}") from None
    try:
        return PolicySet.model_validate(document)
    except ValidationError as exc:
        raise PolicyFileError(f"{path}: {_describe(document, exc)}") from None


def _describe(document: object, exc: ValidationError) -> str:
    problems = []
    for error in exc.errors():
        location = list(error["loc"])
        where = ".".join(str(part) for part in location) or "(top level)"
        if len(location) >= 2 and location[0] == "policies" and isinstance(location[1], int):
            where = f"policy {_policy_name(document, location[1])}: " + ".".join(str(p) for p in location[2:])
        problems.append(f"{where}: {error['msg']}")
    return "; ".join(problems)


def _policy_name(document: object, index: int) -> str:
    if isinstance(document, dict):
        policies = document.get("policies")
        if isinstance(policies, list) and index < len(policies) and isinstance(policies[index], dict):
            name = policies[index].get("name")
            if name:
                return repr(name)
    return f"#{index + 1}"
