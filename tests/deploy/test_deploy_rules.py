"""Prometheus alerting rules: promtool check + unit tests, and what every alert must carry."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from deploy_support import (DEPLOY, KUBE_STATE_METRICS_SERIES, ROOT, RULES_FILE, RULES_TEST_FILE, RUNBOOKS,
                            exported_series_names, metric_names, need_tool, promtool_parse, rule_exprs)

SEVERITIES = {"critical", "warning", "info"}


def _alerts() -> list[dict]:
    return [r for g in yaml.safe_load(RULES_FILE.read_text())["groups"] for r in g["rules"] if "alert" in r]


def _promtool_test(rules_dir: Path) -> subprocess.CompletedProcess:
    promtool = need_tool("promtool", "Debian package prometheus; scripts/setup-host installs it")
    return subprocess.run([promtool, "test", "rules", RULES_TEST_FILE.name], cwd=rules_dir,
                          capture_output=True, text=True)


def test_promtool_check_rules():
    promtool = need_tool("promtool", "Debian package prometheus")
    result = subprocess.run([promtool, "check", "rules", str(RULES_FILE)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(_alerts())} rules found" in result.stdout


def test_promtool_unit_tests_pass():
    result = _promtool_test(RULES_FILE.parent)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_a_firing_and_a_silent_case():
    tests = yaml.safe_load(RULES_TEST_FILE.read_text())
    assert tests["rule_files"] == [RULES_FILE.name]
    fires, silent = set(), set()
    for case in tests["tests"]:
        for check in case.get("alert_rule_test", []):
            (fires if check.get("exp_alerts") else silent).add(check["alertname"])
    names = {a["alert"] for a in _alerts()}
    assert names - fires == set(), "alerts without a test where they fire"
    assert names - silent == set(), "alerts without a test where they must not fire"
    assert (fires | silent) - names == set(), "tests for alerts that do not exist"


@pytest.mark.parametrize("alert", [a["alert"] for a in _alerts()])
def test_unit_tests_catch_an_alert_that_never_fires(alert, tmp_path):
    """Mutation check: with the alert's expression replaced by one that is never true, promtool's unit
    tests must fail, so the 'fires' cases really depend on the rule."""
    rules = yaml.safe_load(RULES_FILE.read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            if rule.get("alert") == alert:
                rule["expr"] = "vector(1) > 2"
    (tmp_path / RULES_FILE.name).write_text(yaml.safe_dump(rules, sort_keys=False))
    shutil.copy(RULES_TEST_FILE, tmp_path / RULES_TEST_FILE.name)
    result = _promtool_test(tmp_path)
    assert result.returncode != 0
    assert f"alertname: {alert}," in result.stdout + result.stderr


@pytest.mark.parametrize("alert", _alerts(), ids=lambda a: a["alert"])
def test_alert_has_severity_summary_description_runbook(alert):
    assert alert["labels"]["severity"] in SEVERITIES
    annotations = alert["annotations"]
    for key in ("summary", "description", "runbook_url"):
        assert annotations.get(key, "").strip(), f"{alert['alert']} lacks {key}"
    m = re.search(r"/docs/runbooks/([a-z0-9-]+\.md)$", annotations["runbook_url"])
    assert m, f"runbook_url must point to docs/runbooks/*.md: {annotations['runbook_url']}"
    runbook = RUNBOOKS / m.group(1)
    assert runbook.is_file(), f"{runbook} does not exist"
    assert alert["alert"] in runbook.read_text(), f"{runbook.name} does not mention {alert['alert']}"


def _runbook_url_prefix() -> str:
    import importlib.util

    spec = importlib.util.spec_from_file_location("deploy_render", DEPLOY / "render.py")
    render = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(render)
    return render.RUNBOOK_URL_PREFIX


def test_runbook_url_prefix_is_set_in_one_place():
    """Every runbook_url (rules, promtool tests, PrometheusRule) is deploy/render.py's prefix + a runbook."""
    prefix = _runbook_url_prefix()
    assert prefix.endswith("/")
    for path in (RULES_FILE, RULES_TEST_FILE, DEPLOY / "base" / "prometheusrule.yaml"):
        urls = re.findall(r"runbook_url: \"?([^\"\s]+)", path.read_text())
        assert urls, path
        for url in urls:
            assert url.startswith(prefix), f"{path.name}: {url}"
            assert (RUNBOOKS / url[len(prefix):]).is_file(), url


def test_deploy_md_lists_every_alert():
    text = (ROOT / "docs" / "deploy.md").read_text()
    listed = set(re.findall(r"^\| (Virtio\w+) \|", text, re.M))
    assert listed == {a["alert"] for a in _alerts()}


def test_rule_expressions_use_only_contract_metrics():
    known = exported_series_names() | KUBE_STATE_METRICS_SERIES
    for name, expr in rule_exprs().items():
        used = metric_names(expr)
        assert used, f"{name}: no metric found in {expr!r}"
        assert used <= known, f"{name} uses metrics not in docs/metrics.md: {sorted(used - known)}"


def test_rule_expressions_parse():
    result = promtool_parse(rule_exprs())
    assert result.returncode == 0, result.stdout + result.stderr


def test_docs_plain_prometheus_config_is_valid_and_scrapes_the_alerts_job(tmp_path):
    """docs/deploy.md's scrape config for a Prometheus without the operator: promtool accepts it,
    with the rules file, and its job is the one the alerts select."""
    text = (ROOT / "docs" / "deploy.md").read_text()
    block = re.search(r"```yaml\n(# prometheus\.yml\n.*?)```", text, re.S)
    assert block, "docs/deploy.md has no prometheus.yml example"
    config = yaml.safe_load(block.group(1))
    assert config["rule_files"] == [RULES_FILE.name]
    jobs = {job["job_name"] for job in config["scrape_configs"]}
    assert jobs == set(re.findall(r'job="([^"]+)"', RULES_FILE.read_text()))
    relabels = config["scrape_configs"][0]["relabel_configs"]
    assert {"source_labels": ["__meta_kubernetes_pod_node_name"], "target_label": "node"} in relabels
    # Debian's Prometheus is built without Kubernetes service discovery: promtool checks the rest
    # (relabelling, rule file) with the discovery swapped for a static target, and the discovery
    # block is checked here against Prometheus' kubernetes_sd_config fields.
    sd = config["scrape_configs"][0].pop("kubernetes_sd_configs")
    assert len(sd) == 1 and set(sd[0]) <= {"role", "namespaces", "selectors", "api_server", "kubeconfig_file"}
    assert sd[0]["role"] == "pod" and sd[0]["namespaces"] == {"names": ["virtio-recovery"]}
    config["scrape_configs"][0]["static_configs"] = [{"targets": ["10.0.0.1:9477"]}]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    shutil.copy(RULES_FILE, tmp_path / RULES_FILE.name)
    promtool = need_tool("promtool", "Debian package prometheus")
    result = subprocess.run([promtool, "check", "config", "prometheus.yml"], cwd=tmp_path,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(_alerts())} rules found" in result.stdout
