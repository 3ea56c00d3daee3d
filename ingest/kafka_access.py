"""How every Kafka client of every role reaches the brokers: the bootstrap address and, for secured clusters,
the security protocol, SASL mechanism and credentials, and the CA that signed the brokers' certificates.

One `KafkaAccess` is made from the settings (`ConnectionSettings.kafka`) and handed to every client, whether
aiokafka (`aiokafka_options`) or librdkafka through confluent-kafka (`librdkafka_config`), so no client can
be left on another protocol. A bare bootstrap string means a plaintext cluster (`of`), which is what tests
and local runs use.
"""

from __future__ import annotations

import ssl
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient

SecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
SaslMechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]


@dataclass(frozen=True)
class KafkaAccess:
    bootstrap: str
    security_protocol: SecurityProtocol = "PLAINTEXT"
    sasl_mechanism: SaslMechanism | None = None
    username: str = ""
    password: str = field(default="", repr=False)
    ca_file: str | None = None
    """PEM file of the CA that signed the brokers' certificates; None: the system's trusted CAs."""

    @staticmethod
    def of(access: KafkaAccess | str) -> KafkaAccess:
        return access if isinstance(access, KafkaAccess) else KafkaAccess(access)

    @property
    def _sasl(self) -> bool:
        return self.security_protocol.startswith("SASL")

    @property
    def _tls(self) -> bool:
        return self.security_protocol.endswith("SSL")

    def aiokafka_options(self) -> dict[str, Any]:
        """Keyword arguments for `AIOKafkaProducer`, `AIOKafkaConsumer` and `AIOKafkaAdminClient`."""
        options: dict[str, Any] = {"bootstrap_servers": self.bootstrap, "security_protocol": self.security_protocol}
        if self._tls:
            options["ssl_context"] = _tls_context(self.ca_file)
        if self._sasl:
            options |= {"sasl_mechanism": self.sasl_mechanism, "sasl_plain_username": self.username,
                        "sasl_plain_password": self.password}  # fmt: skip
        return options

    def librdkafka_config(self) -> dict[str, str]:
        """The same, as librdkafka configuration (confluent-kafka's `Producer` and `Consumer`)."""
        config = {"bootstrap.servers": self.bootstrap, "security.protocol": self.security_protocol.lower()}
        if self._tls and self.ca_file:
            config["ssl.ca.location"] = self.ca_file
        if self._sasl:
            config |= {"sasl.mechanism": self.sasl_mechanism or "", "sasl.username": self.username,
                       "sasl.password": self.password}  # fmt: skip
        return config


class KafkaAccessError(ValueError):
    """The brokers cannot be reached with these settings; the message says which and what to check."""


def verify_login(access: KafkaAccess, timeout_s: float = 10.0) -> None:
    """For a secured cluster, connect once as a role does before anything else: `KafkaAccessError` with a
    one-line reason if the brokers refuse the login or their certificate is not trusted, instead of clients
    retrying that for ever. A broker that does not answer is left to the role (it may start degraded and
    retry). Blocking (librdkafka's own threads do the work): call it before the event loop starts."""
    if access.security_protocol == "PLAINTEXT":
        return
    errors: list[KafkaError] = []
    config: dict[str, Any] = {**access.librdkafka_config(), "error_cb": errors.append, "log_level": 0}
    admin = AdminClient(config)
    deadline = time.monotonic() + timeout_s
    codes: set[int] = set()
    while not codes & {KafkaError._AUTHENTICATION, KafkaError._SSL} and time.monotonic() < deadline:
        try:
            admin.list_topics(timeout=1.0)
            return
        except KafkaException as exc:
            errors.append(exc.args[0])
        admin.poll(0)  # serves error_cb: what the connection attempts met
        codes = {error.code() for error in errors}
    if KafkaError._AUTHENTICATION in codes:
        raise KafkaAccessError(
            f"Kafka at {access.bootstrap} refused the {access.sasl_mechanism} login of user {access.username!r}: "
            "check THROTTLEX_KAFKA_SASL_USERNAME, THROTTLEX_KAFKA_SASL_PASSWORD and THROTTLEX_KAFKA_SASL_MECHANISM"
        )
    if KafkaError._SSL in codes:
        reason = next(error.str() for error in errors if error.code() == KafkaError._SSL)
        raise KafkaAccessError(
            f"TLS to Kafka at {access.bootstrap} failed ({reason.split(': ', 1)[-1][:160]}): check "
            "THROTTLEX_KAFKA_SSL_CAFILE and THROTTLEX_KAFKA_SECURITY_PROTOCOL"
        )


def _tls_context(ca_file: str | None) -> ssl.SSLContext:
    """Certificates checked, host names included, against ``ca_file`` or the system's CAs."""
    return ssl.create_default_context(cafile=ca_file)
