"""Settings of the API role and of the all-in-one `throttlex run`, read from ``THROTTLEX_*`` variables."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr, model_validator

from ingest.settings import GatewaySettings
from processors.settings import SinkSettings, WorkerSettings


class ApiSettings(WorkerSettings, SinkSettings):
    """The API reads the policy file (to interpret live usage) and may read ClickHouse."""

    api_host: str = Field("127.0.0.1", description="address the HTTP API listens on")
    api_port: int = Field(8080, ge=1, le=65535, description="port the HTTP API listens on")
    admin_tokens: SecretStr = Field(SecretStr(""), description="comma-separated tokens that grant admin access")
    admin_tokens_file: Path | None = Field(
        None, description="a file (e.g. a mounted secret) with more admin tokens, one per line or comma-separated"
    )
    ingest_tokens: SecretStr = Field(SecretStr(""), description="comma-separated tokens gateways use for POST /v1/events")
    ingest_max_events: int = Field(1000, ge=1, description="most events in one POST /v1/events")
    ingest_max_bytes: int = Field(1024 * 1024, ge=1024, description="largest POST /v1/events body")
    dry_run_max_events: int = Field(2_000_000, ge=1, description="most stored events one policy dry-run replays")
    usage_max_buckets: int = Field(10_000, ge=1, description="most time buckets one usage query may span")

    @model_validator(mode="after")
    def _read_admin_tokens_file(self) -> ApiSettings:
        if self.admin_tokens_file is not None:
            try:
                text = self.admin_tokens_file.read_text()
            except OSError as exc:
                raise ValueError(f"cannot read {self.admin_tokens_file}: {exc.strerror}") from None
            tokens = ",".join([self.admin_tokens.get_secret_value(), *text.split()])
            object.__setattr__(self, "admin_tokens", SecretStr(tokens))
        self.refuse_placeholders("admin_tokens", self.admin_token_list)
        self.refuse_placeholders("ingest_tokens", self.ingest_token_list)
        return self

    @property
    def admin_token_list(self) -> list[str]:
        return _split(self.admin_tokens)

    @property
    def ingest_token_list(self) -> list[str]:
        return _split(self.ingest_tokens)


def _split(tokens: SecretStr) -> list[str]:
    return [token.strip() for token in tokens.get_secret_value().split(",") if token.strip()]


class RunSettings(ApiSettings):
    """Everything in one process: worker, sink and API (the embedded default)."""


class LoadgenSettings(GatewaySettings):
    """The load generator runs a demo gateway, so it takes the gateway's settings."""
