"""A whole deployment for the admin and fuzz suites: `throttlex run` (with admin and ingest tokens)
and `throttlex gateway`, each its own process, on the sandbox's topics, Redis prefix and chDB."""

from __future__ import annotations

import time
from typing import Any

import httpx

from tests.conftest import RoleProcess, Sandbox, free_port, start_role

ADMIN, OPS, INGEST = "admin-token-for-tests", "second-admin-token-for-tests", "ingest-token-for-tests"
POLICIES = """
policies:
  - name: per-key
    key: [api_key]
    algorithm: {type: sliding_window, limit: 1000, window_s: 60, bucket_s: 1}
plans:
  free: {monthly_units: 1000}
  pro: {monthly_units: 100000}
default_plan: free
"""


def wait_healthy(client: httpx.Client, role: RoleProcess, path: str = "/healthz") -> None:
    deadline = time.monotonic() + 60
    while True:
        try:
            if client.get(path).status_code < 500:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, f"`throttlex {role.args[0]}` not answering:\n{role.log()[-3000:]}"
        time.sleep(0.2)


def create_key(client: httpx.Client, **body: Any) -> dict[str, Any]:
    response = client.post("/v1/admin/keys", json=body, headers=admin())
    assert response.status_code == 201, response.text
    created: dict[str, Any] = response.json()
    return created


def admin(token: str = ADMIN) -> dict[str, str]:
    """Headers of an admin: ``root`` (`ADMIN`) unless another admin's token is given (`OPS`: ``ops``)."""
    return {"authorization": f"Bearer {token}"}


def start_deployment(sandbox: Sandbox, *, extra_ingest: str = "") -> tuple[RoleProcess, RoleProcess, str, str]:
    """``extra_ingest``: more ingest credentials beside ``gateways`` (`INGEST`: every tenant, as a gateway, with an
    event-time window that takes the tests' history, dated from 2000 to 2099, whatever the day they run)."""
    (sandbox.root / "policies.yaml").write_text(POLICIES)
    api_port, gateway_port = free_port(), free_port()
    ingest = ",".join(filter(None, [f"gateways;gateway;past=100000d;future=100000d:*:{INGEST}", extra_ingest]))
    tokens = {"THROTTLEX_ADMIN_TOKENS": f"root:{ADMIN},ops:{OPS}", "THROTTLEX_INGEST_TOKENS": ingest}
    run = start_role(sandbox, ["run", "--api-port", str(api_port)], tokens)
    gateway = start_role(sandbox, ["gateway", "--port", str(gateway_port)])
    return run, gateway, f"http://127.0.0.1:{api_port}", f"http://127.0.0.1:{gateway_port}"


