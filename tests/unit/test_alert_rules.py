"""The operator kit: the alerting rules pass `promtool check rules` and their unit tests, the dashboard loads."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed (Debian package prometheus)")


def promtool(*args: str) -> None:
    assert PROMTOOL is not None
    ran = subprocess.run([PROMTOOL, *args], cwd=DEPLOY / "prometheus", capture_output=True, text=True, check=False)
    assert ran.returncode == 0, ran.stdout + ran.stderr


@needs_promtool
def test_the_rules_are_valid() -> None:
    promtool("check", "rules", "alerts.yml")


@needs_promtool
def test_the_rules_fire_as_their_tests_say() -> None:
    promtool("test", "rules", "alerts_test.yml")


@needs_promtool
def test_the_prometheus_configuration_is_valid(tmp_path: Path) -> None:
    # The configuration names the rules at their path in the container: check a copy that points here.
    config = (DEPLOY / "prometheus" / "prometheus.yml").read_text()
    copy = tmp_path / "prometheus.yml"
    copy.write_text(config.replace("/etc/prometheus/alerts.yml", str(DEPLOY / "prometheus" / "alerts.yml")))
    assert PROMTOOL is not None
    ran = subprocess.run([PROMTOOL, "check", "config", str(copy)], capture_output=True, text=True, check=False)
    assert ran.returncode == 0, ran.stdout + ran.stderr


def test_every_alert_is_documented() -> None:
    rules = (DEPLOY / "prometheus" / "alerts.yml").read_text()
    operations = (DEPLOY.parent / "docs" / "operations.md").read_text()
    alerts = [line.split(":", 1)[1].strip() for line in rules.splitlines() if line.strip().startswith("- alert:")]
    assert alerts
    missing = [alert for alert in alerts if alert not in operations]
    assert not missing, f"docs/operations.md does not explain {missing}"


def test_the_dashboard_queries_the_provisioned_data_source() -> None:
    dashboard = json.loads((DEPLOY / "grafana" / "dashboard.json").read_text())
    assert dashboard["uid"] == "apphosting"
    assert dashboard["panels"]
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == "prometheus", panel["title"]
        assert panel["targets"], panel["title"]
