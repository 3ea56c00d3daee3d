"""The dashboard and the alert rules query only metrics ThrottleX exports; promtool accepts the rules."""

import json
import subprocess
from pathlib import Path
from xml.etree import ElementTree

import pytest
import yaml

from tests.deploy.exported import exported_series, referenced

pytestmark = pytest.mark.deploy

DEPLOY = Path(__file__).parents[2] / "deploy"


def test_every_dashboard_query_uses_exported_metrics() -> None:
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "throttlex.json").read_text())
    expressions = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    used = set().union(*(referenced(expr) for expr in expressions))
    assert len(used) >= 15
    assert used <= exported_series(), f"not exported: {sorted(used - exported_series())}"


def test_the_dashboard_covers_what_operators_watch() -> None:
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "throttlex.json").read_text())
    titles = " ".join(panel["title"].lower() for panel in dashboard["panels"])
    for topic in ("requests", "blocks by policy", "latency", "lag", "sink throughput", "errors", "drift"):
        assert topic in titles


def test_alert_rules_pass_promtool_and_use_exported_metrics() -> None:
    rules = DEPLOY / "prometheus" / "alerts.yml"
    check = subprocess.run(["promtool", "check", "rules", str(rules)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    expressions = [rule["expr"] for group in yaml.safe_load(rules.read_text())["groups"] for rule in group["rules"]]
    assert f"SUCCESS: {len(expressions)} rules found" in check.stdout
    used = set().union(*(referenced(expr) for expr in expressions))
    assert used <= exported_series(), f"not exported: {sorted(used - exported_series())}"


def test_grafana_reads_clickhouse_as_a_read_only_user() -> None:
    """Grafana's viewers can send a data source any SQL: its ClickHouse user must be read-only."""
    provisioned = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "datasources" / "clickhouse.yml").read_text())
    [source] = provisioned["datasources"]
    users = ElementTree.parse(DEPLOY / "clickhouse" / "users.d" / "grafana.xml").getroot()
    user = users.find(f"users/{source['jsonData']['username']}")
    assert user is not None and user.findtext("password") == source["secureJsonData"]["password"]
    profile = users.find(f"profiles/{user.findtext('profile')}")
    assert profile is not None and profile.findtext("readonly") == "1"
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "usage.json").read_text())
    assert {target["datasource"]["uid"] for panel in dashboard["panels"] for target in panel["targets"]} == {source["uid"]}
