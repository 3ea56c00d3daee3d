"""Settings of the API role and of the all-in-one `throttlex run`, read from ``THROTTLEX_*`` variables."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

from pydantic import Field, SecretStr, model_validator

from throttlex.api.credentials import Credential, parse_admin, parse_ingest
from throttlex.api.ingest_scope import Bounds
from throttlex.ingest.settings import GatewaySettings
from throttlex.processors.accounting.readonly_sql import SqlLimits
from throttlex.processors.settings import SinkSettings, WorkerSettings


class ApiSettings(WorkerSettings, SinkSettings):
    """The API reads the policy file (to interpret live usage) and may read ClickHouse."""

    api_host: str = Field("127.0.0.1", description="address the HTTP API listens on")
    api_port: int = Field(8080, ge=1, le=65535, description="port the HTTP API listens on")
    admin_tokens: SecretStr = Field(
        SecretStr(""), description="comma-separated admin credentials, each <name>:<token>; the name is the audit trail's actor"
    )
    admin_tokens_file: Path | None = Field(
        None, description="a file (e.g. a mounted secret) with more admin credentials, one per line or comma-separated"
    )
    ingest_tokens: SecretStr = Field(
        SecretStr(""),
        description="comma-separated credentials for POST /v1/events, each <name>[;<option>...]:<tenant>[+<tenant>...]:<token> "
        "(tenant * for every tenant; options: gateway, max_cost=<n>, past=<duration>, future=<duration>; docs: security)",
    )
    ingest_tokens_file: Path | None = Field(None, description="a file with more ingest credentials, like admin_tokens_file")
    audit_topic: str = Field("throttlex.audit", description="topic keeping the audit trail of admin changes (kept for ever)")
    ingest_max_events: int = Field(1000, ge=1, description="most events in one POST /v1/events")
    ingest_max_bytes: int = Field(1024 * 1024, ge=1024, description="largest POST /v1/events body")
    ingest_max_cost: int = Field(1000, ge=0, le=1_000_000, description="highest cost of one posted event, unless its token says")
    ingest_max_past_s: float = Field(
        3600.0, ge=0, description="how far before now a posted event may be dated, unless its token says (past=<duration>)"
    )
    ingest_max_future_s: float = Field(
        60.0, ge=0, description="how far after now a posted event may be dated, unless its token says (future=<duration>)"
    )
    ingest_deadline_s: float = Field(
        10.0, gt=0, description="longest POST /v1/events waits for Kafka before it answers 503 with Retry-After"
    )
    ingest_delivery_timeout_s: float = Field(
        120.0, gt=0, description="longest a posted event may wait for Kafka before it fails (after its request was answered)"
    )
    ingest_dedup_window_s: float = Field(
        900.0, gt=0, description="how long the ids of posted events are kept in Redis: a copy sent within it is not counted again"
    )
    ingest_routes: str = Field(
        "", description="comma-separated route templates or shell globs of the deployment: a posted event of an upload "
        "token (or of any token, once set) whose route matches none is counted under the route 'other'",
    )  # fmt: skip
    dry_run_max_events: int = Field(2_000_000, ge=1, description="most stored events one policy dry-run replays")
    usage_max_buckets: int = Field(10_000, ge=1, description="most time buckets one usage query may span")
    analyst_max_execution_time_s: float = Field(30.0, gt=0, description="longest an analyst SQL query may run")
    analyst_max_result_rows: int = Field(1_000_000, ge=1, description="most rows an analyst SQL query may return")
    analyst_max_result_bytes: int = Field(256 * 1024 * 1024, ge=1, description="largest result of an analyst SQL query")
    analyst_max_memory_bytes: int = Field(1024**3, ge=1, description="most memory an analyst SQL query may use")
    analyst_max_threads: int = Field(2, ge=1, description="most threads an analyst SQL query may use (the sink needs some)")

    @cached_property
    def ingest_bounds(self) -> Bounds:
        routes = tuple(route.strip() for route in self.ingest_routes.split(",") if route.strip())
        return Bounds(self.ingest_max_cost, self.ingest_max_past_s, self.ingest_max_future_s, routes)

    def analyst_limits(self) -> SqlLimits:
        return SqlLimits(self.analyst_max_execution_time_s, self.analyst_max_result_rows, self.analyst_max_result_bytes,
                         self.analyst_max_memory_bytes, self.analyst_max_threads)  # fmt: skip

    @model_validator(mode="after")
    def _read_credentials(self) -> ApiSettings:
        for name in ("admin_tokens", "ingest_tokens"):
            path: Path | None = getattr(self, f"{name}_file")
            if path is not None:
                try:
                    text = path.read_text()
                except OSError as exc:
                    raise ValueError(f"cannot read {path}: {exc.strerror}") from None
                object.__setattr__(self, name, SecretStr(f"{getattr(self, name).get_secret_value()},{text}"))
        if not self.ingest_deadline_s < self.ingest_delivery_timeout_s < self.ingest_dedup_window_s:
            raise ValueError("THROTTLEX_INGEST_DEADLINE_S < THROTTLEX_INGEST_DELIVERY_TIMEOUT_S < THROTTLEX_INGEST_DEDUP_WINDOW_S "
                             "must hold: an event's fate is known before its id is forgotten")  # fmt: skip
        if {c.token for c in self.admin_credentials} & {c.token for c in self.ingest_credentials}:
            raise ValueError("THROTTLEX_ADMIN_TOKENS and THROTTLEX_INGEST_TOKENS share a token: each credential needs its own")
        self.refuse_placeholders("admin_tokens", [credential.token for credential in self.admin_credentials])
        self.refuse_placeholders("ingest_tokens", [credential.token for credential in self.ingest_credentials])
        return self

    @cached_property
    def admin_credentials(self) -> list[Credential]:
        return parse_admin(self.admin_tokens.get_secret_value(), "THROTTLEX_ADMIN_TOKENS")

    @cached_property
    def ingest_credentials(self) -> list[Credential]:
        return parse_ingest(self.ingest_tokens.get_secret_value(), "THROTTLEX_INGEST_TOKENS")


class RunSettings(ApiSettings):
    """Everything in one process: worker, sink and API (the embedded default)."""


class LoadgenSettings(GatewaySettings):
    """The load generator runs a demo gateway, so it takes the gateway's settings."""
