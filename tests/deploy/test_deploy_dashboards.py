"""Grafana dashboards: in sync with their generator, well-formed, and querying only contract metrics."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import yaml

from deploy_support import (DASHBOARDS, dashboard_exprs, dashboard_files, exported_series_names, metric_contract,
                            metric_names, promtool_parse, rule_exprs)

EXPECTED_UIDS = {"virtio-fleet-overview", "virtio-vm-drilldown", "virtio-agent-health"}


def _boards() -> dict[str, dict]:
    return {p.name: json.loads(p.read_text()) for p in dashboard_files()}


def test_generated_files_are_in_sync():
    result = subprocess.run([sys.executable, str(DASHBOARDS / "render.py"), "--check"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_configmap_carries_every_dashboard_for_the_grafana_sidecar():
    configmap = yaml.safe_load((DASHBOARDS / "grafana-dashboards-configmap.yaml").read_text())
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert set(configmap["data"]) == {p.name for p in dashboard_files()}
    for name, text in configmap["data"].items():
        assert json.loads(text) == json.loads((DASHBOARDS / name).read_text())


def test_dashboards_are_well_formed():
    boards = _boards()
    assert {b["uid"] for b in boards.values()} == EXPECTED_UIDS
    for name, board in boards.items():
        variables = {v["name"] for v in board["templating"]["list"]}
        assert "datasource" in variables
        ids = [p["id"] for p in board["panels"]]
        assert len(ids) == len(set(ids)), f"{name}: duplicate panel ids"
        occupied = set()
        for panel in board["panels"]:
            pos = panel["gridPos"]
            assert 0 <= pos["x"] and pos["x"] + pos["w"] <= 24, f"{name}/{panel['title']}: off the grid"
            cells = {(pos["x"] + dx, pos["y"] + dy) for dx in range(pos["w"]) for dy in range(pos["h"])}
            assert not cells & occupied, f"{name}/{panel['title']} overlaps another panel"
            occupied |= cells
            assert panel["targets"], f"{name}/{panel['title']} has no query"
            for target in panel["targets"]:
                assert target["datasource"]["uid"] == "${datasource}"
                used_vars = set(re.findall(r"\$(\w+)", target["expr"])) - {"__rate_interval", "__range", "__interval"}
                assert used_vars <= variables, f"{name}/{panel['title']}: undefined variables {used_vars - variables}"


def test_drilldown_has_a_status_timeline():
    board = _boards()["virtio-vm-drilldown.json"]
    timeline = next(p for p in board["panels"] if p["type"] == "state-timeline")
    assert "virtio_device_status" in timeline["targets"][0]["expr"]
    texts = json.dumps(timeline["fieldConfig"]["defaults"]["mappings"])
    for state in ("reset", "DRIVER_OK", "NEEDS_RESET", "FAILED"):
        assert state in texts


def test_fleet_overview_has_percentiles_heatmap_stuck_table_and_violations():
    board = _boards()["virtio-fleet-overview.json"]
    exprs = " ".join(t["expr"] for p in board["panels"] for t in p["targets"])
    assert "histogram_quantile(0.5," in exprs and "histogram_quantile(0.99," in exprs
    assert any(p["type"] == "heatmap" for p in board["panels"])
    assert any(p["type"] == "table" and "virtio_device_stuck" in p["targets"][0]["expr"] for p in board["panels"])
    assert "virtio_spec_violations_total" in exprs


def test_every_query_parses():
    exprs = dashboard_exprs()
    assert len(exprs) > 50
    result = promtool_parse(exprs)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_query_uses_only_contract_metrics():
    known = exported_series_names()
    for where, expr in dashboard_exprs().items():
        used = metric_names(expr)
        assert used, f"{where}: no metric in {expr!r}"
        assert used <= known, f"{where} uses metrics not in docs/metrics.md: {sorted(used - known)}"


def test_every_contract_metric_is_shown_or_alerted_on():
    used = set()
    for expr in list(dashboard_exprs().values()) + list(rule_exprs().values()):
        used |= {re.sub(r"_(bucket|sum|count)$", "", n) for n in metric_names(expr)}
    missing = set(metric_contract()) - used
    assert missing == set(), f"docs/metrics.md metrics that no dashboard or alert uses: {sorted(missing)}"


HOST_VARIABLES = ("cluster", "node")


def _selectors(expr: str) -> list[tuple[str, str]]:
    """(metric name, matchers) of every vector selector in a PromQL expression, '' if it has no braces."""
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    out = []
    for m in re.finditer(r"(?<![\w.:\"$])([a-zA-Z_:][\w:]*)\s*(\{[^}]*\}|\()?", text):
        name, rest = m.group(1), m.group(2) or ""
        if rest == "(" or name in ("and", "or", "unless", "bool", "offset") or name.isdigit():
            continue
        out.append((name, rest))
    return out


def test_every_board_has_cluster_and_node_variables():
    for name, board in _boards().items():
        variables = {v["name"]: v for v in board["templating"]["list"]}
        for var in HOST_VARIABLES:
            assert var in variables, f"{name}: no {var} variable"
            assert variables[var]["includeAll"] and variables[var]["allValue"] == ".*"


def test_every_query_selects_on_cluster_and_node():
    """Each vector selector of each panel carries both matchers; each variable after them narrows by them."""
    checked = 0
    for name, board in _boards().items():
        wanted = [(t["expr"], HOST_VARIABLES) for p in board["panels"] for t in p["targets"]]
        for var in board["templating"]["list"]:
            if var["type"] != "query" or var["name"] == "cluster":
                continue
            selector = re.fullmatch(r"label_values\((.*),\s*\w+\)", var["definition"]).group(1)
            # the node variable (and the scrape job's) can only narrow by cluster
            wanted.append((selector, ("cluster",) if var["name"] in ("node", "job") else HOST_VARIABLES))
        for expr, host_vars in wanted:
            selectors = _selectors(expr)
            assert selectors, f"{name}: no selector found in {expr!r}"
            for metric, matchers in selectors:
                checked += 1
                for var in host_vars:
                    assert f'{var}=~"${var}"' in matchers, f"{name}: {metric}{matchers} in {expr!r} lacks {var}"
    assert checked > len(dashboard_exprs())  # some queries join two or more selectors


def test_selector_finder_sees_bare_and_joined_selectors():
    found = _selectors('sum by (a) (rate(x_total{node=~"$node"}[5m])) * on (a) group_left (b) y_info')
    assert found == [("x_total", '{node=~"$node"}'), ("y_info", "")]
