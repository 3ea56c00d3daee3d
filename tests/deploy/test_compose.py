"""docker-compose.yml is valid (checked by docker-compose itself, without an engine) and wired up."""

import subprocess
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.deploy

ROOT = Path(__file__).parents[2]


def test_compose_file_is_valid() -> None:
    check = subprocess.run(["docker-compose", "-f", str(ROOT / "docker-compose.yml"), "config", "-q"], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr


def test_the_stack_has_every_part_and_prometheus_scrapes_every_role() -> None:
    rendered = subprocess.run(
        ["docker-compose", "-f", str(ROOT / "docker-compose.yml"), "config"], capture_output=True, text=True, check=True
    ).stdout
    services = yaml.safe_load(rendered)["services"]
    assert {"kafka", "redis", "clickhouse", "prometheus", "grafana", "worker", "sink", "api", "gateway", "rls", "loadgen"} <= set(services)
    assert services["loadgen"]["profiles"] == ["load"]
    for name in ("worker", "sink", "api", "gateway", "rls"):
        assert "healthcheck" in services[name] or "depends_on" in services[name]

    scrape = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    targets = {target for job in scrape["scrape_configs"] for config in job["static_configs"] for target in config["targets"]}
    metrics_port = "9101"  # THROTTLEX_METRICS_PORT's default, for roles without the API
    rls_metrics_port = "9102"  # THROTTLEX_RLS_METRICS_ADDR's default
    assert targets == {f"worker:{metrics_port}", f"sink:{metrics_port}", "api:8080", "gateway:8090", f"rls:{rls_metrics_port}"}
    assert services["rls"]["entrypoint"] == ["throttlex-rls"] and services["rls"]["environment"]["THROTTLEX_RLS_GRPC_ADDR"].endswith(":8081")
    assert services["gateway"]["command"][-1] == "8090"


def test_each_role_gets_the_grace_period_of_its_kubernetes_manifest_and_an_init() -> None:
    rendered = subprocess.run(
        ["docker-compose", "-f", str(ROOT / "docker-compose.yml"), "config"], capture_output=True, text=True, check=True
    ).stdout
    services = yaml.safe_load(rendered)["services"]
    manifests = {doc["metadata"]["name"]: doc for path in (ROOT / "deploy/k8s/base").glob("*.yaml")
                 for doc in yaml.safe_load_all(path.read_text()) if doc and doc.get("kind") == "Deployment"}  # fmt: skip
    for role in ("worker", "sink", "api"):
        pod = manifests[f"throttlex-{role}"]["spec"]["template"]["spec"]
        grace_s = pod.get("terminationGracePeriodSeconds", 30)  # Kubernetes' default
        assert (role, services[role]["stop_grace_period"]) == (role, f"{grace_s}s")
        assert services[role]["init"] is True
