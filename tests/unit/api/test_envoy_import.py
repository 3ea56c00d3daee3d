"""`throttlex policies import-envoy`: envoyproxy/ratelimit configurations as ThrottleX policies; what cannot be
carried over is refused with its line and the reason."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from throttlex.api.envoy_import import EnvoyImportError, import_envoy, roles_from
from throttlex.processors.core.policy import parse_policies

CONFIG = """\
domain: edge
descriptors:
  - key: api_key
    rate_limit: {unit: minute, requests_per_unit: 600}
    detailed_metric: true
    descriptors:
      - key: generic_key
        value: /v1/search
        rate_limit: {unit: second, requests_per_unit: 5}
        shadow_mode: true
  - key: remote_address
    rate_limit: {unit: hour, requests_per_unit: 20000}
  - key: tenant
    descriptors:
      - key: method
        value: POST
        rate_limit: {unit: day, requests_per_unit: 1000}
  - key: route
    value: /healthz
    rate_limit: {unlimited: true}
"""


def test_each_limited_path_becomes_a_fixed_window_policy_that_validates() -> None:
    imported = import_envoy(CONFIG, "ratelimit.yaml")
    assert imported.refused == []
    policies = {policy.name: policy for policy in parse_policies(imported.document(), "out").policies}
    assert set(policies) == {"edge.api_key", "edge.api_key.generic_key--v1-search", "edge.remote_address",
                             "edge.tenant.method-POST"}  # fmt: skip
    per_key = policies["edge.api_key"]
    assert per_key.key == ("api_key",) and per_key.algorithm.limit == 60_0 and per_key.algorithm.window_s == 60
    search = policies["edge.api_key.generic_key--v1-search"]
    assert search.key == ("api_key", "route") and search.match.routes == ["/v1/search"] and search.shadow
    assert policies["edge.remote_address"].key == ("ip",) and policies["edge.remote_address"].algorithm.window_s == 3600
    writes = policies["edge.tenant.method-POST"]
    assert writes.key == ("tenant", "method") and writes.match.methods == ["POST"] and writes.algorithm.window_s == 86_400
    assert any("detailed_metric left aside" in note for note in imported.notes)
    assert any("unlimited: no policy" in note for note in imported.notes)


@pytest.mark.parametrize(
    ("descriptors", "line", "reason"),
    [
        ("  - key: header_match\n    value: premium\n    rate_limit: {unit: second, requests_per_unit: 1}\n", 3,
         "unknown descriptor key"),
        ("  - key: api_key\n    value: k-123\n    rate_limit: {unit: second, requests_per_unit: 1}\n", 3,
         "a limit for one api_key value"),
        ("  - key: api_key\n    descriptors:\n      - key: api_key\n        rate_limit: {unit: second, requests_per_unit: 1}\n",
         5, "nested beyond ThrottleX's dimensions"),
        ("  - key: api_key\n    rate_limit: {unit: month, requests_per_unit: 100}\n", 3, "monthly_units"),
        ("  - key: api_key\n    rate_limit: {unit: second, requests_per_unit: 1, replaces: [{name: x}]}\n", 3, "replaces"),
        ("  - key: request_id\n    rate_limit: {unit: second, requests_per_unit: 1}\n", 3, "not a dimension"),
        ("  - key: api_key\n    rate_limit: {unit: second, requests_per_unit: 0}\n", 3, "a limit of nothing"),
    ],
)  # fmt: skip
def test_what_has_no_policy_form_is_refused_with_its_line_and_reason(descriptors: str, line: int, reason: str) -> None:
    imported = import_envoy(f"domain: edge\ndescriptors:\n{descriptors}", "rl.yaml")
    assert imported.policies == []
    [refusal] = imported.refused
    assert refusal.startswith(f"rl.yaml:{line}:") and reason in refusal, refusal


@pytest.mark.parametrize(("written", "shadow"), [("yes", True), ("on", True), ("TRUE", True), ("no", False), ("false", False)])
def test_yaml_booleans_are_read_as_envoyproxy_ratelimit_reads_them(written: str, shadow: bool) -> None:
    config = f"domain: d\ndescriptors:\n  - key: api_key\n    shadow_mode: {written}\n    rate_limit: {{unit: second, requests_per_unit: 3}}\n"
    [policy] = import_envoy(config, "rl").policies
    assert policy.get("shadow", False) is shadow


def test_a_shadow_mode_that_is_no_boolean_is_refused_not_enforced() -> None:
    config = "domain: d\ndescriptors:\n  - key: api_key\n    shadow_mode: maybe\n    rate_limit: {unit: second, requests_per_unit: 3}\n"
    imported = import_envoy(config, "rl")
    assert imported.policies == [] and "shadow_mode must be true or false" in imported.refused[0]


def test_a_refused_descriptors_nested_ones_are_refused_with_it_and_unknown_fields_noted() -> None:
    config = ("domain: d\ndescriptors:\n  - key: header_match\n    descriptors:\n      - key: api_key\n"
              "        rate_limit: {unit: second, requests_per_unit: 3, burst: 9}\n  - key: api_key\n    colour: blue\n"
              "    rate_limit: {unit: second, requests_per_unit: 3, burst: 9}\n")  # fmt: skip
    imported = import_envoy(config, "rl")
    assert any("nested descriptors (lines 5) are refused with it" in refusal for refusal in imported.refused)
    assert any("unknown field 'colour'" in note for note in imported.notes)
    assert any("unknown rate_limit field 'burst'" in note for note in imported.notes)
    assert any("whatever its domain" in note for note in imported.notes)


def test_a_deployments_own_descriptor_mapping_is_used() -> None:
    config = "domain: d\ndescriptors:\n  - key: x-user\n    rate_limit: {unit: second, requests_per_unit: 3}\n"
    assert import_envoy(config, "rl").refused
    imported = import_envoy(config, "rl", roles_from("x-user=api_key"))
    assert [policy["key"] for policy in imported.policies] == [["api_key"]]
    with pytest.raises(EnvoyImportError, match="not entry=role"):
        roles_from("x-user")
    with pytest.raises(EnvoyImportError, match="not entry=role"):
        roles_from("x-user=user")


@pytest.mark.parametrize("text", ["descriptors: [", "- just\n- a list\n", "domain: d\n"])
def test_a_file_that_is_no_configuration_is_an_error(text: str) -> None:
    with pytest.raises(EnvoyImportError):
        import_envoy(text, "rl")


def test_the_command_writes_nothing_and_exits_1_when_anything_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "ratelimit.yaml"
    config.write_text(CONFIG + "  - key: header_match\n    rate_limit: {unit: second, requests_per_unit: 1}\n")
    out = tmp_path / "policies.yaml"
    command = [sys.executable, "-c", "from throttlex.api.cli import main; main()", "policies", "import-envoy", str(config),
               "--output", str(out)]  # fmt: skip
    refused = subprocess.run(command, capture_output=True, text=True, check=False)
    assert refused.returncode == 1 and not out.exists()
    assert f"refused: {config}:{CONFIG.count(chr(10)) + 1}: descriptor key 'header_match'" in refused.stderr
    partial = subprocess.run([*command, "--partial"], capture_output=True, text=True, check=False)
    assert partial.returncode == 0, partial.stderr
    assert len(yaml.safe_load(out.read_text())["policies"]) == 4
