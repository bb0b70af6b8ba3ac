"""Alert rules and Prometheus configs, checked and unit-tested with promtool."""

import shutil

from conftest import ROOT, run, tool

RULES = ROOT / "monitoring/rules"


def test_promtool_check_rules():
    proc = run([tool("promtool"), "check", "rules", str(RULES / "ember.rules.yaml")])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS: 7 rules found" in proc.stdout


def test_promtool_test_rules():
    proc = run([tool("promtool"), "test", "rules", "ember.rules.test.yaml"], cwd=RULES)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


def test_every_alert_has_a_unit_test():
    import yaml

    alerts = {r["alert"] for g in yaml.safe_load((RULES / "ember.rules.yaml").read_text())["groups"] for r in g["rules"] if "alert" in r}
    tests = yaml.safe_load((RULES / "ember.rules.test.yaml").read_text())["tests"]
    firing = {t["alertname"] for case in tests for t in case.get("alert_rule_test", []) if t.get("exp_alerts")}
    assert alerts == firing, f"alerts never shown firing in a unit test: {alerts - firing}"


def test_compose_prometheus_config(tmp_path):
    """docker/prometheus.yml with the rules where compose mounts them (/etc/prometheus/rules)."""
    shutil.copy(ROOT / "docker/prometheus.yml", tmp_path / "prometheus.yml")
    (tmp_path / "rules").mkdir()
    shutil.copy(RULES / "ember.rules.yaml", tmp_path / "rules/ember.rules.yaml")
    proc = run([tool("promtool"), "check", "config", str(tmp_path / "prometheus.yml")])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS: 1 rule files found" in proc.stdout
