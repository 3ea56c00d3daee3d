"""The Kubernetes manifests validate against the Kubernetes schemas (kubernetes-validate, offline),
and the kustomizations, probes and policy ConfigMap point at things that exist."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from throttlex.api.app import create_app
from throttlex.api.settings import ApiSettings
from throttlex.processors.core.policy import load_policies
from throttlex.processors.policy_watch import PolicySource
from throttlex.processors.registry import Registry

pytestmark = pytest.mark.deploy

K8S = Path(__file__).parents[2] / "deploy" / "k8s"
VERSION = "1.30.0"


def documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def base_resources() -> list[dict[str, Any]]:
    kustomization = yaml.safe_load((K8S / "base" / "kustomization.yaml").read_text())
    return [doc for name in kustomization["resources"] for doc in documents(K8S / "base" / name)]


def test_every_base_resource_is_valid_kubernetes() -> None:
    resources = base_resources()
    assert {doc["kind"] for doc in resources} >= {"ConfigMap", "Secret", "Job", "Deployment", "Service", "HorizontalPodAutoscaler"}
    for doc in resources:
        kubernetes_validate.validate(doc, VERSION, strict=True)  # raises with the field at fault


def test_a_broken_manifest_is_caught() -> None:
    """The validator is really checking: a misspelt field in a Deployment fails."""
    deployment = next(doc for doc in base_resources() if doc["kind"] == "Deployment")
    broken = {**deployment, "spec": {**deployment["spec"], "replica": 3}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, VERSION, strict=True)


def test_overlay_patches_target_base_resources() -> None:
    overlay = yaml.safe_load((K8S / "overlays" / "production" / "kustomization.yaml").read_text())
    assert overlay["resources"] == ["../../base"]
    known = {(doc["kind"], doc["metadata"]["name"]) for doc in base_resources()}
    for patch in overlay["patches"]:
        for doc in documents(K8S / "overlays" / "production" / patch["path"]):
            assert (doc["kind"], doc["metadata"]["name"]) in known


def test_workers_match_partitions_and_probes_call_real_endpoints() -> None:
    resources = {(doc["kind"], doc["metadata"]["name"]): doc for doc in base_resources()}
    config = resources[("ConfigMap", "throttlex-config")]["data"]
    worker = resources[("Deployment", "throttlex-worker")]
    assert worker["spec"]["replicas"] == int(config["THROTTLEX_EVENTS_PARTITIONS"])

    routes = asyncio.run(api_routes())
    for name in ("throttlex-worker", "throttlex-sink", "throttlex-api"):
        [container] = resources[("Deployment", name)]["spec"]["template"]["spec"]["containers"]
        for probe in ("livenessProbe", "readinessProbe"):
            assert container[probe]["httpGet"]["path"] in routes
        assert container["resources"]["requests"]
    [rls] = resources[("Deployment", "throttlex-rls")]["spec"]["template"]["spec"]["containers"]
    grpc_port = next(port["containerPort"] for port in rls["ports"] if port["name"] == "grpc")
    assert rls["readinessProbe"]["grpc"] == {"port": grpc_port, "service": "envoy.service.ratelimit.v3.RateLimitService"}
    assert {"name": "THROTTLEX_RLS_GRPC_ADDR", "value": f"0.0.0.0:{grpc_port}"} in rls["env"]


async def api_routes() -> set[str]:
    """The API's routes (the app is built, not started: the registry's clients need a running loop)."""
    settings = ApiSettings()
    registry = Registry(settings.kafka_bootstrap, settings.registry_topic, None, settings.redis_prefix)
    app = create_app(settings, PolicySource(load_policies(K8S.parent / "config" / "policies.yaml"), None), registry)
    return {path for route in app.router.routes if isinstance(path := getattr(route, "path", None), str)}


def test_policy_configmap_is_the_shipped_policy_file() -> None:
    configmap = next(doc for doc in base_resources() if doc["metadata"]["name"] == "throttlex-policies")
    shipped = Path(__file__).parents[2] / "deploy" / "config" / "policies.yaml"
    assert configmap["data"]["policies.yaml"] == shipped.read_text()
