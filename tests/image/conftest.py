"""Containers of the ThrottleX image (deploy/Dockerfile) on the Kafka and Redis the other tests use (host
network). `make test-image` builds the image and runs these tests; `deploy/local/image.sh` says how."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import Sandbox, eventually

ROOT = Path(__file__).parents[2]
IMAGE = "throttlex:local"
GRACE_S = 30
"""The grace period `docker stop` gives a role before SIGKILL: the Kubernetes default, as in the compose file."""


def docker(*args: str, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout_s)


@pytest.fixture(scope="session")
def image() -> str:
    """The image, built (again: cached layers make it quick when nothing changed) by `deploy/local/image.sh`."""
    built = subprocess.run(["bash", str(ROOT / "deploy/local/image.sh"), "build"], capture_output=True, text=True, timeout=1200)
    if built.returncode != 0:
        pytest.fail(f"building the image failed:\n{built.stdout}{built.stderr}")
    return IMAGE


class Container:
    """One container of a role, run detached on the host's network."""

    def __init__(self, name: str) -> None:
        self.name = name

    @classmethod
    def run(cls, image: str, sandbox: Sandbox, *args: str, env: dict[str, str] | None = None,
            volumes: tuple[str, ...] = ()) -> Container:  # fmt: skip
        name = f"throttlex-test-{sandbox.tag}-{args[0]}-{time.monotonic_ns() % 100_000}"
        settings = {**sandbox.env, "THROTTLEX_CLICKHOUSE_DSN": "chdb:///data/chdb",
                    "THROTTLEX_POLICY_FILE": "/etc/throttlex/test/policies.yaml", **(env or {})}  # fmt: skip
        options = [f"--env={name}={value}" for name, value in settings.items()]
        policy = sandbox.root / "policies.yaml"  # the file itself: the container's user cannot enter the test's directory
        mounts = (*([f"{policy}:/etc/throttlex/test/policies.yaml:ro"] if policy.exists() else []), *volumes)
        options += [f"--volume={volume}" for volume in mounts]
        started = docker("run", "--detach", "--network=host", f"--name={name}", *options, image, *args)
        if started.returncode != 0:
            pytest.fail(f"docker run failed: {started.stderr}")
        return cls(name)

    async def wait_for(self, check: Callable[[], object], *, timeout_s: float, what: str) -> None:
        """`eventually`, failing with the container's last log lines."""
        try:
            await eventually(check, timeout_s=timeout_s, what=what)
        except pytest.fail.Exception as exc:
            raise AssertionError(f"{exc}; the container's log ends:\n{self.logs()[-4000:]}") from None

    def logs(self) -> str:
        done = docker("logs", self.name)
        return done.stdout + done.stderr

    def running(self) -> bool:
        return docker("inspect", "-f", "{{.State.Running}}", self.name).stdout.strip() == "true"

    def stop(self) -> tuple[int, float]:
        """SIGTERM, then SIGKILL after `GRACE_S`: the exit code and how long it took."""
        started = time.monotonic()
        docker("stop", f"--time={GRACE_S}", self.name, timeout_s=GRACE_S + 30)
        took = time.monotonic() - started
        return int(docker("inspect", "-f", "{{.State.ExitCode}}", self.name).stdout.strip()), took

    def remove(self) -> None:
        docker("rm", "--force", "--volumes", self.name)  # with its anonymous /data volume, if it had no other


@pytest.fixture
def containers() -> Iterator[list[Container]]:
    """Containers a test starts (append them): removed afterwards, whatever happened."""
    started: list[Container] = []
    yield started
    for container in started:
        container.remove()


@pytest.fixture
def volume(sandbox: Sandbox) -> Iterator[str]:
    """A named volume for chDB's files, removed afterwards."""
    name = f"throttlex-test-{sandbox.tag}"
    assert docker("volume", "create", name).returncode == 0
    yield name
    for container in docker("ps", "--all", "--quiet", "--filter", f"volume={name}").stdout.split():
        docker("rm", "--force", container)  # the test's containers, before `containers` removes them
    assert docker("volume", "rm", name).returncode == 0
