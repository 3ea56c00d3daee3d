"""The command line refuses bad input with exit status 2 and one line that says what is wrong."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import SecretStr

from throttlex.api.settings import ApiSettings

POLICY_FILES = Path(__file__).parents[1] / "processors" / "policy_files"


def throttlex(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", "from throttlex.api.cli import main; main()", *args],
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_every_command_explains_itself() -> None:
    result = throttlex("--help")
    assert result.returncode == 0
    for command in ("run", "worker", "sink", "api", "migrate", "gateway", "loadgen", "keys"):
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
        ({"THROTTLEX_ADMIN_TOKENS_FILE": "/run/secrets/nowhere"}, "cannot read /run/secrets/nowhere"),
        ({"THROTTLEX_ADMIN_TOKENS": "root:s3cret-1,unnamed-s3cret"}, "THROTTLEX_ADMIN_TOKENS entry 2 is not <name>:<token>"),
        ({"THROTTLEX_ADMIN_TOKENS": "root:s3cret-1,root:s3cret-2"}, "THROTTLEX_ADMIN_TOKENS names a credential twice"),
        ({"THROTTLEX_INGEST_TOKENS": "eu:acme:s3cret-1,us:s3cret-2"},
         "THROTTLEX_INGEST_TOKENS entry 2 is not <name>[;<option>...]:<tenant>[+<tenant>...]:<token>"),
        ({"THROTTLEX_INGEST_TOKENS": "eu;max_cost=lots:acme:s3cret-1"},
         "THROTTLEX_INGEST_TOKENS entry 1: option 'max_cost=lots' is not gateway, max_cost=<0..1000000>"),
        ({"THROTTLEX_INGEST_TOKENS": "eu:acme+:s3cret-1"}, "THROTTLEX_INGEST_TOKENS entry 1 is not"),
        ({"THROTTLEX_INGEST_TOKENS": "eu:acme:s3cret-1,us:globex:s3cret-1"}, "THROTTLEX_INGEST_TOKENS gives one token twice"),
        ({"THROTTLEX_ADMIN_TOKENS": "root:s3cret-1", "THROTTLEX_INGEST_TOKENS": "eu:acme:s3cret-1"},
         "THROTTLEX_ADMIN_TOKENS and THROTTLEX_INGEST_TOKENS share a token"),
    ],
)
def test_bad_settings_are_named(env: dict[str, str], message: str) -> None:
    result = throttlex("migrate", env=env)
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("throttlex: error: ") and message in line


_SALT_PLACEHOLDERS = [
    ({}, "THROTTLEX_KEY_SALT is a development default"),  # the built-in salt
    ({"THROTTLEX_KEY_SALT": "change-me"}, "THROTTLEX_KEY_SALT is a development default"),  # deploy/k8s/base's
    ({"THROTTLEX_KEY_SALT": ""}, "THROTTLEX_KEY_SALT is empty"),
]
_TOKEN_PLACEHOLDER = (
    {"THROTTLEX_KEY_SALT": "a-real-secret-4f1c", "THROTTLEX_ADMIN_TOKENS": "ops:ok-token-1,root:change-me"},
    "THROTTLEX_ADMIN_TOKENS is a development default",
)


@pytest.mark.parametrize(
    ("role", "env", "variable"),
    [(role, env, variable) for role in ("run", "worker", "sink", "api", "gateway", "migrate") for env, variable in _SALT_PLACEHOLDERS]
    + [(role, *_TOKEN_PLACEHOLDER) for role in ("run", "api", "migrate")],  # the roles that read admin tokens
)
def test_no_role_starts_with_a_placeholder_secret_unless_told_it_is_a_trial(role: str, env: dict[str, str], variable: str) -> None:
    result = throttlex(role, env={**env, "THROTTLEX_ALLOW_DEV_SECRETS": "0"})
    assert result.returncode == 2, result.stderr[-1000:]
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("throttlex: error: bad settings: ") and variable in line, line


def test_credentials_come_from_the_variables_and_mounted_files(tmp_path: Path) -> None:
    admins, gateways = tmp_path / "admin-tokens", tmp_path / "ingest-tokens"
    admins.write_text("ann:from-file-1\nbob:from:file:2\n")
    gateways.write_text("eu-gateways:acme+globex:from-file-3\n")
    settings = ApiSettings(admin_tokens=SecretStr("root:from-env"), admin_tokens_file=admins,
                           ingest_tokens=SecretStr("billing-import:*:from-env-2"), ingest_tokens_file=gateways)  # fmt: skip
    assert [(c.name, c.token) for c in settings.admin_credentials] == [
        ("root", "from-env"), ("ann", "from-file-1"), ("bob", "from:file:2")]  # fmt: skip
    assert [(c.name, c.token, c.tenants) for c in settings.ingest_credentials] == [
        ("billing-import", "from-env-2", None), ("eu-gateways", "from-file-3", frozenset({"acme", "globex"}))]  # fmt: skip
    assert settings.ingest_credentials[1].allows("acme") and not settings.ingest_credentials[1].allows("initech")
    assert "from-file" not in repr(settings) and "from-file" not in repr(settings.admin_credentials)


def test_a_key_for_a_malformed_tenant_is_refused_before_anything_is_written() -> None:
    result = throttlex("keys", "create", "--tenant", "")
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert line == "throttlex: error: tenant '' must be 1-64 letters, digits or . _ : -"
