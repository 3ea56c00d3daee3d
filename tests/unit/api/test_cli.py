"""The command line refuses bad input with exit status 2 and one line that says what is wrong."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

POLICY_FILES = Path(__file__).parents[1] / "processors" / "policy_files"


def throttlex(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", "from api.cli import main; main()", *args],
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_every_command_explains_itself() -> None:
    result = throttlex("--help")
    assert result.returncode == 0
    for command in ("run", "worker", "sink", "api", "migrate", "gateway", "loadgen"):
        assert command in result.stdout
        assert throttlex(command, "--help").returncode == 0


def test_a_bad_policy_file_stops_start_up_with_the_policy_and_the_defect() -> None:
    path = POLICY_FILES / "window_not_whole_buckets.yaml"
    result = throttlex("worker", "--policy-file", str(path))
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f"throttlex: error: policy file refused: {path}: policy 'uneven'")


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"THROTTLEX_API_PORT": "eighty"}, "bad setting THROTTLEX_API_PORT"),
        ({"THROTTLEX_LOG_LEVEL": "LOUD"}, "bad setting THROTTLEX_LOG_LEVEL"),
        ({"THROTTLEX_CLICKHOUSE_DSN": "mysql://db/usage"}, "unsupported ClickHouse DSN 'mysql://db/usage'"),
    ],
)
def test_bad_settings_are_named(env: dict[str, str], message: str) -> None:
    result = throttlex("migrate", env=env)
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("throttlex: error: ") and message in line
