"""Helpers for the deploy tests: the metric contract, PromQL expressions and external tools."""
from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
DASHBOARDS = ROOT / "dashboards"
RULES_FILE = DEPLOY / "prometheus" / "virtio-recovery-agent.rules.yaml"
RULES_TEST_FILE = DEPLOY / "prometheus" / "virtio-recovery-agent.rules.test.yaml"
METRICS_DOC = ROOT / "docs" / "metrics.md"
RUNBOOKS = ROOT / "docs" / "runbooks"

# Series Prometheus records for every scrape itself (not exported by the agent, so not in docs/metrics.md).
SCRAPE_SERIES = {"up", "scrape_duration_seconds"}
# kube-state-metrics series the alerts use (VirtioAgentDaemonSetNotAvailable); not the agent's.
KUBE_STATE_METRICS_SERIES = {"kube_daemonset_status_desired_number_scheduled", "kube_daemonset_status_number_available"}

PROMQL_KEYWORDS = {
    "and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right",
    "offset", "bool", "inf", "nan",
}


def strict() -> bool:
    from conftest import strict as conftest_strict

    return conftest_strict()


def need_tool(name: str, why: str) -> str:
    """Path of a command-line tool, through conftest's one skip route (a failure under
    VRA_REQUIRE_KVM=1)."""
    from conftest import require_tool

    return require_tool(name, why)


def metric_contract() -> dict[str, str]:
    """metric name -> type, from the tables of docs/metrics.md."""
    contract: dict[str, str] = {}
    for line in METRICS_DOC.read_text().splitlines():
        m = re.match(r"^\|\s*`([a-z_:][a-z0-9_:]*)`\s*\|\s*([a-z]+)", line)
        if m:
            contract[m.group(1)] = m.group(2)
    if not contract:
        raise AssertionError(f"no metric table found in {METRICS_DOC}")
    return contract


def exported_series_names() -> set[str]:
    """Every series name a query may use: contract metrics, histogram parts, scrape series."""
    names = set(SCRAPE_SERIES)
    for name, kind in metric_contract().items():
        if kind == "histogram":
            names.update({f"{name}_bucket", f"{name}_sum", f"{name}_count"})
        else:
            names.add(name)
    return names


def metric_names(expr: str) -> set[str]:
    """Series names an expression selects (a lexical pass; expressions are parsed by promtool separately)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for m in re.finditer(r"(?<![\w.:])([a-zA-Z_:][\w:]*)(\s*\()?", text):
        word, call = m.group(1), m.group(2)
        if call or word.lower() in PROMQL_KEYWORDS:
            continue
        names.add(word)
    return names


GRAFANA_MACROS = {"$__rate_interval": "1m", "$__interval": "30s", "$__range": "1h"}


def expand_grafana(expr: str) -> str:
    """Replace Grafana's interval macros by durations so the expression is plain PromQL.
    Template variables ($instance, ...) only occur inside label-matcher strings."""
    for macro, value in GRAFANA_MACROS.items():
        expr = expr.replace(macro, value)
    leftover = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)
    if "$" in leftover:
        raise AssertionError(f"template variable outside a string in: {expr}")
    return expr


def rule_exprs() -> dict[str, str]:
    out = {}
    for group in yaml.safe_load(RULES_FILE.read_text())["groups"]:
        for rule in group["rules"]:
            out[rule.get("alert") or rule.get("record")] = rule["expr"]
    return out


def dashboard_files() -> list[Path]:
    return sorted(DASHBOARDS.glob("*.json"))


def dashboard_exprs() -> dict[str, str]:
    """'<file> / <panel title> / <refId>' -> PromQL, including variable queries (label_values selectors)."""
    out = {}
    for path in dashboard_files():
        board = json.loads(path.read_text())
        for panel in board["panels"]:
            for target in panel.get("targets", []):
                out[f"{path.name} / panel {panel['id']} {panel['title']} / {target['refId']}"] = expand_grafana(target["expr"])
        for var in board["templating"]["list"]:
            if var["type"] != "query":
                continue
            m = re.fullmatch(r"label_values\((.*),\s*\w+\)", var["definition"])
            assert m, f"{path.name}: variable {var['name']} is not label_values(selector, label)"
            out[f"{path.name} / variable {var['name']}"] = expand_grafana(m.group(1))
    return out


def promtool_parse(exprs: dict[str, str]) -> subprocess.CompletedProcess:
    """Parse and type-check expressions with promtool by making each one a recording rule."""
    promtool = need_tool("promtool", "Debian package prometheus; scripts/setup-host installs it")
    rules = {"groups": [{"name": "parse", "rules": [
        {"record": f"parse:expr_{i}", "expr": expr} for i, expr in enumerate(exprs.values())]}]}
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump(rules, f)
    try:
        return subprocess.run([promtool, "check", "rules", f.name], capture_output=True, text=True)
    finally:
        os.unlink(f.name)
