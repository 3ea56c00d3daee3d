"""Policies: what is limited, by which key, with which algorithm. Loaded from YAML and validated.

Example (``deploy/config/policies.yaml``)::

    policies:
      - name: per-key-burst
        match: {routes: ["/v1/*"], methods: [GET, POST]}
        key: [api_key]
        algorithm: {type: sliding_window, limit: 100, window_s: 10, bucket_s: 1}
    plans:
      free: {monthly_units: 100000}
    default_plan: free
"""

from __future__ import annotations

import fnmatch
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ingest.blocklist import limit_key
from ingest.events import UsageEvent
from processors.windows import FixedWindow, SlidingWindow, TokenBucket

# Events are partitioned by api_key_id, so a worker sees every event of an API key. Other key
# dimensions need the stream repartitioned by that dimension first; until then they are refused.
Dimension = Literal["api_key"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Match(_Strict):
    routes: list[str] = Field(default_factory=lambda: ["*"], description="shell-style route globs")
    methods: list[str] | None = Field(None, description="HTTP methods; all when omitted")

    def applies_to(self, event: UsageEvent) -> bool:
        if self.methods is not None and event.method.upper() not in self.methods:
            return False
        return any(fnmatch.fnmatchcase(event.route, pattern) for pattern in self.routes)

    @model_validator(mode="after")
    def _upper_methods(self) -> Match:
        if self.methods is not None:
            object.__setattr__(self, "methods", [method.upper() for method in self.methods])
        return self


class SlidingWindowAlgorithm(_Strict):
    type: Literal["sliding_window"]
    limit: int = Field(gt=0, description="cost units allowed in any window")
    window_s: float = Field(gt=0, description="window length in seconds")
    bucket_s: float = Field(1.0, gt=0, description="resolution at which the window is exact")

    @property
    def window_ms(self) -> int:
        return round(self.window_s * 1000)

    @property
    def bucket_ms(self) -> int:
        return round(self.bucket_s * 1000)

    def new_window(self) -> SlidingWindow:
        return SlidingWindow(self.window_ms, self.bucket_ms)

    @model_validator(mode="after")
    def _whole_buckets(self) -> SlidingWindowAlgorithm:
        if self.bucket_ms <= 0 or self.window_ms % self.bucket_ms:
            raise ValueError("window_s must be a whole multiple of bucket_s (at millisecond precision)")
        return self


class FixedWindowAlgorithm(_Strict):
    type: Literal["fixed_window"]
    limit: int = Field(gt=0, description="cost units allowed per window")
    window_s: float = Field(gt=0, description="window length in seconds")
    origin_s: float = Field(0, description="windows start at origin + k * window (Unix seconds)")

    def new_window(self) -> FixedWindow:
        return FixedWindow(round(self.window_s * 1000), round(self.origin_s * 1000))


class TokenBucketAlgorithm(_Strict):
    type: Literal["token_bucket"]
    rate_per_s: float = Field(gt=0, description="tokens (cost units) refilled per second")
    burst: int = Field(gt=0, description="bucket size: units a full bucket admits at once")

    @property
    def limit(self) -> int:
        return self.burst

    @property
    def window_s(self) -> float:
        """The time an empty bucket takes to fill."""
        return self.burst / self.rate_per_s

    def new_window(self) -> TokenBucket:
        return TokenBucket(self.rate_per_s, self.burst)


Algorithm = Annotated[
    SlidingWindowAlgorithm | FixedWindowAlgorithm | TokenBucketAlgorithm, Field(discriminator="type")
]


class Policy(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    match: Match = Field(default_factory=Match)
    key: list[Dimension] = Field(min_length=1)
    algorithm: Algorithm
    shadow: bool = Field(False, description="count and report, never block")

    def limit_key(self, event: UsageEvent) -> str:
        return limit_key([(dim, event.api_key_id) for dim in self.key])


class Plan(_Strict):
    monthly_units: int = Field(gt=0, description="billable cost units per calendar month (UTC)")


class PolicySet(_Strict):
    policies: list[Policy]
    plans: dict[str, Plan] = Field(default_factory=dict, description="plan name to its quotas")
    default_plan: str | None = Field(None, description="the plan of keys that name none")

    @model_validator(mode="after")
    def _unique_names(self) -> PolicySet:
        names = [policy.name for policy in self.policies]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"policy names must be unique; repeated: {', '.join(duplicates)}")
        if self.default_plan is not None and self.default_plan not in self.plans:
            raise ValueError(f"default_plan {self.default_plan!r} is not one of the plans: {', '.join(self.plans) or 'none'}")
        return self

    def matching(self, event: UsageEvent) -> list[Policy]:
        return [policy for policy in self.policies if policy.match.applies_to(event)]

    def by_name(self, name: str) -> Policy | None:
        return next((policy for policy in self.policies if policy.name == name), None)


class PolicyFileError(ValueError):
    """A policy file that cannot be used; the message names the file, the policy and the defect."""


def load_policies(path: Path) -> PolicySet:
    try:
        document = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise PolicyFileError(f"{path}: cannot read policy file: {exc.strerror}") from None
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
