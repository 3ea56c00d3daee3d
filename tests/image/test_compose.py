"""deploy/local/compose.yml, brought up with Debian's docker-compose on images built on this machine only
(ThrottleX, and Kafka and Redis from Debian's packages): a hot key is refused at the gateway, every request's
event is stored, and `down -v` leaves no container, network or volume behind."""

from __future__ import annotations

import json
import secrets
import subprocess
from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import eventually, free_port
from tests.image.conftest import ROOT, docker

pytestmark = pytest.mark.image

COMPOSE_FILE = ROOT / "deploy/local/compose.yml"
HOT_KEY_LIMIT = 50  # per-key-10s in the image's policy file (deploy/config/policies.yaml)


class Stack:
    def __init__(self, project: str, api_port: int, gateway_port: int, rls_port: int) -> None:
        self.project, self.api_port, self.gateway_port, self.rls_port = project, api_port, gateway_port, rls_port

    def compose(self, *args: str, timeout_s: float = 300) -> subprocess.CompletedProcess[str]:
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "THROTTLEX_COMPOSE_API_PORT": str(self.api_port),
               "THROTTLEX_COMPOSE_GATEWAY_PORT": str(self.gateway_port), "THROTTLEX_COMPOSE_RLS_PORT": str(self.rls_port)}  # fmt: skip
        return subprocess.run(["docker-compose", "-p", self.project, "-f", str(COMPOSE_FILE), *args],
                              capture_output=True, text=True, timeout=timeout_s, env=env)  # fmt: skip

    def left_behind(self) -> list[str]:
        label = f"label=com.docker.compose.project={self.project}"
        return [line for kind in (("ps", "-a"), ("volume", "ls"), ("network", "ls"))
                for line in docker(*kind, "-q", "--filter", label).stdout.split()]  # fmt: skip


@pytest.fixture(scope="module")
def service_images(image: str) -> None:
    built = subprocess.run(["bash", str(ROOT / "deploy/local/image.sh"), "services"], capture_output=True, text=True, timeout=1200)
    if built.returncode != 0:
        pytest.fail(f"building the Kafka and Redis images failed:\n{built.stdout}{built.stderr}")


@pytest.fixture
def stack(service_images: None) -> Iterator[Stack]:
    stack = Stack(f"throttlex-test-{secrets.token_hex(4)}", free_port(), free_port(), free_port())
    try:
        yield stack
    finally:
        stack.compose("down", "--volumes", "--timeout", "30")


async def test_the_stack_of_local_images_refuses_a_hot_key_stores_its_events_and_leaves_nothing(stack: Stack) -> None:
    started = stack.compose("up", "--detach")
    assert started.returncode == 0, started.stderr
    api, gateway = f"http://127.0.0.1:{stack.api_port}", f"http://127.0.0.1:{stack.gateway_port}"
    statuses: list[int] = []
    async with httpx.AsyncClient(timeout=5) as client:

        async def answers(url: str) -> bool:
            try:
                return (await client.get(url)).status_code == 200
            except httpx.TransportError:
                return False

        await eventually(lambda: answers(f"{gateway}/metrics"), timeout_s=180, what="the stack's gateway to answer")

        async def refused() -> bool:
            statuses.append((await client.get(f"{gateway}/v1/items/1", headers={"x-api-key": "compose-hot-key"})).status_code)
            return statuses[-1] == 429

        await eventually(refused, timeout_s=60, what="the hot key to be refused")
    assert statuses.count(200) >= HOT_KEY_LIMIT and set(statuses) == {200, 429}, statuses
    # The stack's Envoy rate-limit service refuses the key the gateway's traffic got blocked; each answer is an event.
    call = json.dumps({"domain": "throttlex", "descriptors": [[["api_key", "compose-hot-key"], ["method", "GET"]]]})
    rls_answers: list[str] = []

    def rls_refuses() -> bool:
        asked = subprocess.run([str(ROOT / ".venv/bin/rls-client"), "check", "-addr", f"127.0.0.1:{stack.rls_port}"],
                               input=call + "\n", capture_output=True, text=True, timeout=30)  # fmt: skip
        answer = json.loads(asked.stdout or "{}") if asked.returncode == 0 else {}
        if "code" in answer:
            rls_answers.append(answer["code"])
        return answer.get("code") == "OVER_LIMIT"

    await eventually(rls_refuses, timeout_s=60, what="the stack's throttlex-rls to refuse the hot key")
    rls_checks = len(rls_answers)

    def stored() -> int:
        query = stack.compose("exec", "-T", "throttlex", "throttlex", "sql", "--format", "csv", "SELECT count() FROM usage_events")
        last = query.stdout.strip().splitlines()[-1:] if query.returncode == 0 else []  # after the CSV header
        return int(last[0]) if last and last[0].isdigit() else -1

    await eventually(lambda: stored() == len(statuses) + rls_checks, timeout_s=60, what="every request's event to be stored")
    stopped = stack.compose("down", "--volumes", "--timeout", "30")
    assert stopped.returncode == 0, stopped.stderr
    assert stack.left_behind() == []
