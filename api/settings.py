"""Settings of the API role and of the all-in-one `throttlex run`, read from ``THROTTLEX_*`` variables."""

from __future__ import annotations

from pydantic import Field

from ingest.settings import GatewaySettings
from processors.settings import SinkSettings, WorkerSettings


class ApiSettings(WorkerSettings, SinkSettings):
    """The API reads the policy file (to interpret live usage) and may read ClickHouse."""

    api_host: str = Field("127.0.0.1", description="address the HTTP API listens on")
    api_port: int = Field(8080, ge=1, le=65535, description="port the HTTP API listens on")


class RunSettings(ApiSettings):
    """Everything in one process: worker, sink and API (the embedded default)."""


class LoadgenSettings(GatewaySettings):
    """The load generator runs a demo gateway, so it takes the gateway's settings."""
