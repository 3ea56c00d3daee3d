"""Settings shared by every role, read from ``THROTTLEX_*`` environment variables.

Each role has one settings class (`GatewaySettings` here; the worker, sink and API ones in their
packages), built once by the entry point. Tests construct them with keyword arguments instead of
patching the environment.
"""

from __future__ import annotations

import ipaddress
import socket

from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Literal

from throttlex.ingest.denylist import FailMode
from throttlex.ingest.kafka_access import KafkaAccess, SaslMechanism, SecurityProtocol
from throttlex.ingest.redis_connection import check_redis_url

from pydantic import AfterValidator, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR"]

DEV_SALT = "throttlex-dev-salt"
PLACEHOLDER_SECRETS = frozenset({DEV_SALT, "change-me", "change-me-in-production", "changeme", "secret", "password"})
"""Secrets no deployment may start with: the development salt, the placeholders shipped in `deploy/`."""


class ConnectionSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="THROTTLEX_", extra="ignore", frozen=True)

    kafka_bootstrap: str = Field("127.0.0.1:9092", description="Kafka bootstrap servers, comma separated")
    kafka_security_protocol: SecurityProtocol = Field(
        "PLAINTEXT", description="PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL, for every Kafka client of the role"
    )
    kafka_sasl_mechanism: SaslMechanism | None = Field(None, description="PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512 (SASL_*)")
    kafka_sasl_username: str = Field("", description="SASL user name (SASL_*)")
    kafka_sasl_password: SecretStr = Field(SecretStr(""), description="SASL password (SASL_*)")
    kafka_ssl_cafile: Path | None = Field(
        None, description="PEM file of the CA that signed the brokers' certificates (SSL, SASL_SSL); default: the system's"
    )
    events_topic: str = Field("throttlex.events", description="topic the gateways write usage events to")
    events_partitions: int = Field(4, ge=1, description="partitions of the events topic when ThrottleX creates it")

    redis_url: Annotated[str, AfterValidator(check_redis_url)] = Field(
        "redis://127.0.0.1:6379/0",
        description="Redis holding the denylist and live usage: redis://host:port/db (rediss:// for TLS), or a primary "
        "through Sentinel: redis+sentinel://host:port,host:port/service/db",
    )
    redis_prefix: str = Field("throttlex", description="prefix of every Redis key and channel ThrottleX uses")
    redis_timeout_s: float = Field(1.0, gt=0, description="socket timeout for Redis commands")
    key_salt: SecretStr = Field(
        SecretStr(DEV_SALT),
        description="secret that turns API keys into key ids; set your own (the default only starts with THROTTLEX_ALLOW_DEV_SECRETS)",
    )
    allow_dev_secrets: bool = Field(
        False,
        description="let a role start with the development salt or a placeholder secret: local trials only "
        "(`make demo`, `make test` and the compose file set it)",
    )
    api_key_header: str = Field("x-api-key", description="request header carrying the caller's API key")
    registry_topic: str = Field(
        "throttlex.registry", description="compacted topic holding API keys, plans and policies (the source of truth)"
    )
    log_level: LogLevel = "INFO"

    @property
    def kafka(self) -> KafkaAccess:
        """How this role's Kafka clients reach the brokers."""
        return KafkaAccess(
            self.kafka_bootstrap, self.kafka_security_protocol, self.kafka_sasl_mechanism, self.kafka_sasl_username,
            self.kafka_sasl_password.get_secret_value(), str(self.kafka_ssl_cafile) if self.kafka_ssl_cafile else None,
        )  # fmt: skip

    @model_validator(mode="after")
    def _complete_kafka_security(self) -> ConnectionSettings:
        if self.kafka_security_protocol.startswith("SASL") and not (
            self.kafka_sasl_mechanism and self.kafka_sasl_username and self.kafka_sasl_password.get_secret_value()
        ):  # fmt: skip
            raise ValueError(
                f"THROTTLEX_KAFKA_SECURITY_PROTOCOL={self.kafka_security_protocol} needs THROTTLEX_KAFKA_SASL_MECHANISM, "
                "THROTTLEX_KAFKA_SASL_USERNAME and THROTTLEX_KAFKA_SASL_PASSWORD"
            )
        if self.kafka_ssl_cafile is not None and not self.kafka_ssl_cafile.is_file():
            raise ValueError(f"THROTTLEX_KAFKA_SSL_CAFILE {self.kafka_ssl_cafile} is not a readable file")
        return self

    @property
    def key_salt_bytes(self) -> bytes:
        return self.key_salt.get_secret_value().encode()

    @model_validator(mode="after")
    def _refuse_a_placeholder_salt(self) -> ConnectionSettings:
        self.refuse_placeholders("key_salt", [self.key_salt.get_secret_value()])
        return self

    def refuse_placeholders(self, name: str, secrets: Iterable[str]) -> None:
        """Raise (naming the variable) if one of ``secrets`` is empty or a known placeholder, unless the
        development switch is on."""
        if self.allow_dev_secrets:
            return
        for secret in secrets:
            if secret.strip().lower() in PLACEHOLDER_SECRETS | {""}:
                kind = "empty" if not secret.strip() else "a development default or placeholder"
                raise ValueError(
                    f"THROTTLEX_{name.upper()} is {kind}: set a secret of your own "
                    "(or THROTTLEX_ALLOW_DEV_SECRETS=1 for a local trial)"
                )


def _check_networks(value: str) -> str:
    for proxy in (part.strip() for part in value.split(",")):
        if proxy:
            try:
                ipaddress.ip_network(proxy, strict=False)
            except ValueError:
                raise ValueError(f"{proxy!r} is not an address or a network (10.0.0.0/8, 2001:db8::/32)") from None
    return value


class GatewaySettings(ConnectionSettings):
    tenant: str = Field("default", description="tenant recorded on events from this gateway")
    gateway_name: str = Field(
        default_factory=socket.gethostname, min_length=1, max_length=64,
        description="this gateway's name on its events (source gateway:<name>): the workers' clock-offset metric names it",
    )  # fmt: skip
    producer_linger_ms: int = Field(5, ge=0, description="how long the producer waits to fill a batch")
    producer_buffer_max_events: int = Field(
        100_000, ge=1, description="most usage events held while Kafka is out of reach; beyond it events are shed"
    )
    edge_fail_mode: FailMode = Field(
        "open", description="when Redis is out of reach: open admits (cached blocks still hold), closed answers 503"
    )
    trusted_proxies: Annotated[str, AfterValidator(_check_networks)] = Field(
        "",
        description="comma-separated addresses or networks (10.0.0.0/8) of the proxies in front of this gateway: a "
        "request from one of them counts under the client X-Forwarded-For (or Forwarded) names; empty: the socket's peer",
    )

    @property
    def trusted_proxy_list(self) -> list[str]:
        return [proxy.strip() for proxy in self.trusted_proxies.split(",") if proxy.strip()]
    edge_keys: Literal["registry", "any"] = Field(
        "registry",
        description="registry: only registered, active, unexpired keys pass (401 otherwise); "
        "any: every key passes (a gateway behind another authenticator)",
    )
    edge_unknown_keys_cached: int = Field(10_000, ge=1, description="most unknown keys remembered, to spare Redis")
    edge_unknown_key_ttl_s: float = Field(30.0, gt=0, description="how long an unknown key is remembered")
    edge_fail_after_s: float = Field(5.0, ge=0, description="how long Redis may be out of reach before the fail mode applies")
    edge_resync_interval_s: float = Field(
        5.0, gt=0, le=60,
        description="how often the edge rereads the blocks in force while connected, so a change lost in a Redis failover "
        "lives no longer than this",
    )  # fmt: skip
