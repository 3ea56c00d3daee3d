"""ThrottleX on a Kafka listener that wants TLS and a SCRAM login: the SASL_SSL listener of
`deploy/local/services.sh`, its certificate signed by a CA made there, a user made by the test. Every role's
clients log in (the gateway's producer, the worker's and the sink's consumers, the API's clients) and a request
goes through to a block and to ClickHouse; a wrong password or an untrusted certificate stops a role at start-up
with one line saying what to check, instead of clients retrying for ever."""

from __future__ import annotations

import asyncio
import os
import secrets
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from confluent_kafka.admin import AdminClient
from confluent_kafka.admin import (  # type: ignore[attr-defined]  # public, but missing from the module's __all__
    ScramCredentialInfo, ScramMechanism, UserScramCredentialDeletion, UserScramCredentialUpsertion,
)  # fmt: skip

from tests.conftest import RoleProcess, Sandbox, eventually, free_port, register_keys
from tests.unit.api.test_cli import throttlex

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
SASL_SSL = os.environ.get("THROTTLEX_TEST_KAFKA_SASL_SSL", "127.0.0.1:9094")
CA = Path(os.environ.get("THROTTLEX_LOCAL_DIR", ROOT / ".throttlex" / "local")) / "tls" / "ca.pem"
ADMIN = "admin-token-for-secured-kafka"
LIMIT = 5


@pytest.fixture
def scram_user(sandbox: Sandbox) -> Iterator[tuple[str, str]]:
    """A SCRAM-SHA-512 user of the broker, made through the Admin API on the plaintext listener."""
    user, password = f"tx-{sandbox.tag}", secrets.token_urlsafe(16)
    admin = AdminClient({"bootstrap.servers": sandbox.kafka_bootstrap})
    credential = ScramCredentialInfo(ScramMechanism.SCRAM_SHA_512, 4096)
    for done in admin.alter_user_scram_credentials([UserScramCredentialUpsertion(user, credential, password.encode())]).values():
        done.result(timeout=30)
    yield user, password
    for done in admin.alter_user_scram_credentials([UserScramCredentialDeletion(user, ScramMechanism.SCRAM_SHA_512)]).values():
        done.result(timeout=30)


def secured(user: str, password: str, **changes: str) -> dict[str, str]:
    assert CA.is_file(), f"no CA at {CA}: start the services with deploy/local/services.sh up"
    return {
        "THROTTLEX_KAFKA_BOOTSTRAP": SASL_SSL,
        "THROTTLEX_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
        "THROTTLEX_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
        "THROTTLEX_KAFKA_SASL_USERNAME": user,
        "THROTTLEX_KAFKA_SASL_PASSWORD": password,
        "THROTTLEX_KAFKA_SSL_CAFILE": str(CA),
        **changes,
    }


async def test_every_role_works_over_tls_with_a_scram_login(
    sandbox: Sandbox, spawn: Callable[..., RoleProcess], scram_user: tuple[str, str]
) -> None:
    await register_keys(sandbox, {"secured-hot-key": "default"})
    env = secured(*scram_user, THROTTLEX_ADMIN_TOKENS=f"root:{ADMIN}")
    api_port, gateway_port = free_port(), free_port()
    spawn("run", "--policy-file", str(sandbox.write_policy(LIMIT, 60)), "--api-port", str(api_port), extra_env=env)
    spawn("gateway", "--port", str(gateway_port), extra_env=env)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{api_port}", timeout=10) as api, \
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{gateway_port}", timeout=10) as gateway:  # fmt: skip

        async def healthy() -> bool:
            try:
                answer = await api.get("/healthz")
                return answer.status_code == 200 and answer.json()["dependencies"]["kafka"] == "ok"
            except httpx.TransportError:
                return False

        await eventually(healthy, timeout_s=60, what="`throttlex run` healthy over SASL_SSL")
        await eventually(lambda: _answers(gateway), timeout_s=60, what="the gateway to answer")
        sent = 0

        async def refused() -> bool:
            nonlocal sent
            sent += 1
            return (await gateway.get("/v1/items/1", headers={"x-api-key": "secured-hot-key"})).status_code == 429

        await eventually(refused, timeout_s=30, what="the key's block, counted by the worker over SASL_SSL")
        assert sent > LIMIT

        async def stored() -> bool:
            today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
            span = {"from": (today - timedelta(days=1)).isoformat(), "to": (today + timedelta(days=2)).isoformat(), "granularity": "day"}
            answer = await api.get("/v1/usage", params=span, headers={"authorization": f"Bearer {ADMIN}"})
            return answer.status_code == 200 and sum(row["requests"] for row in answer.json()["rows"]) >= sent

        await eventually(stored, timeout_s=60, what="every request stored by the sink over SASL_SSL")


async def _answers(client: httpx.AsyncClient) -> bool:
    try:
        return (await client.get("/metrics")).status_code == 200
    except httpx.TransportError:
        return False


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"THROTTLEX_KAFKA_SASL_PASSWORD": "not-the-password"},
         "refused the SCRAM-SHA-512 login of user 'tx-{tag}': check THROTTLEX_KAFKA_SASL_USERNAME"),
        ({"THROTTLEX_KAFKA_SSL_CAFILE": "/etc/ssl/certs/ca-certificates.crt"},
         "failed (SSL handshake failed"),
    ],
)  # fmt: skip
async def test_a_wrong_password_or_an_untrusted_broker_stops_each_role_at_start_up(
    sandbox: Sandbox, scram_user: tuple[str, str], change: dict[str, str], message: str
) -> None:
    env = {**sandbox.env, **secured(*scram_user, **change)}
    for role in ("run", "worker", "sink", "gateway"):
        started = time.monotonic()
        result = await asyncio.to_thread(throttlex, role, env=env)
        assert result.returncode == 2, result.stderr[-2000:]
        [line] = result.stderr.strip().splitlines()
        assert line.startswith("throttlex: error: ") and message.format(tag=sandbox.tag) in line, line
        assert time.monotonic() - started < 30
