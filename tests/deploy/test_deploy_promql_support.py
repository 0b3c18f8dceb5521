"""The lexical metric-name extraction the contract checks rely on."""
from __future__ import annotations

import pytest

from deploy_support import expand_grafana, metric_names, promtool_parse


def test_metric_names_skips_functions_labels_and_keywords():
    expr = ('histogram_quantile(0.99, sum by (type, le) (rate(a_bucket{x="y", le!="+Inf"}[5m])))'
            ' > 10 and on (type) group_left (transport) b_total offset 5m unless c:recorded or vector(0)')
    assert metric_names(expr) == {"a_bucket", "b_total", "c:recorded"}


def test_metric_names_sees_bare_names_and_strings_do_not_leak():
    assert metric_names('up{job="not_a_metric"} == 0') == {"up"}
    assert metric_names("x / (y > 0)") == {"x", "y"}


def test_grafana_macros_become_durations():
    assert expand_grafana('rate(m{i=~"$instance"}[$__rate_interval])') == 'rate(m{i=~"$instance"}[1m])'
    with pytest.raises(AssertionError):
        expand_grafana("topk($n, m)")


def test_promtool_parse_rejects_bad_promql():
    assert promtool_parse({"bad": "sum(rate(m[5m])"}).returncode != 0
    assert promtool_parse({"type error": "rate(m)"}).returncode != 0
    assert promtool_parse({"good": "sum(rate(m[5m]))"}).returncode == 0
