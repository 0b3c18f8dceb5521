"""A real Prometheus scrapes the collector (over the real HTTP server) and PromQL sees the figures.

No KVM needed: the input is correlation outputs built from agent.model; the lab end-to-end
version is tests/lab/test_prometheus_e2e.py.
"""
from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from agent.export.metrics import AgentCollector, AgentStatusCollector, BuildInfo, EpisodeHistograms
from agent.model import EpisodeEnded, Outcome, Transport
from agent.export.server import MetricsServer
from tests.promlab import PromLab
from tests.unit.test_metrics import make_snapshot, recovered


@pytest.fixture(autouse=True)
def _prometheus() -> None:
    problem = PromLab.problem()
    if problem:
        from conftest import missing

        missing(problem)


def test_promql_sees_counts_and_histogram():
    snap = make_snapshot()
    hist = EpisodeHistograms()
    durations = [0.0035, 0.02, 0.3]
    for i, d in enumerate(durations):
        hist.observe(EpisodeEnded(recovered(ok=d, device=f"pci-0000:00:0{i}.0")))
    hist.observe(EpisodeEnded(recovered(ok=0.05, type_="blk", transport=Transport.MMIO)))
    reg = CollectorRegistry()
    reg.register(AgentCollector(lambda: snap, hist))
    srv = MetricsServer(reg, "127.0.0.1:0").start()
    try:
        with PromLab([f"127.0.0.1:{srv.port}"]) as prom:
            prom.wait_for_target_up()
            prom.wait_for_scrape()
            assert prom.query_value("sum(virtio_device_needs_reset_total)") == 5
            assert prom.query_value('virtio_episodes_ended_total{outcome="recovered"}') == 2
            assert prom.query_value("virtio_devices_stuck") == 1
            assert prom.query_value(
                'sum(virtio_recovery_duration_seconds_count{type="net"})') == 3
            assert prom.query_value(
                'sum(virtio_recovery_duration_seconds_sum{type="net"})') == pytest.approx(
                    sum(durations))
            median = prom.query_value(
                "histogram_quantile(0.5, sum by (le) "
                "(virtio_recovery_duration_seconds_bucket{type=\"net\"}))")
            # the median observation is 0.02, in the (0.01, 0.025] bucket
            assert 0.01 < median <= 0.025
            assert prom.query_value(
                'virtio_recovery_phase_duration_seconds_count{phase="reinit"}') == 4
            # counters move forward between scrapes
            hist.observe(EpisodeEnded(recovered(ok=0.001)))
            snap.episodes_ended[Outcome.RECOVERED] += 1
            prom.wait_for('virtio_episodes_ended_total{outcome="recovered"}', lambda v: v == 3)
            prom.wait_for('sum(virtio_recovery_duration_seconds_count)', lambda v: v == 5)
    finally:
        srv.close()


def test_unknown_snapshot_before_correlation_is_still_scrapable():
    reg = CollectorRegistry()
    reg.register(AgentCollector(lambda: None, EpisodeHistograms()))
    reg.register(AgentStatusCollector(lambda: False, build_info=BuildInfo("0.1.0", "3.11", "none")))
    srv = MetricsServer(reg, "127.0.0.1:0").start()
    try:
        with PromLab([f"127.0.0.1:{srv.port}"]) as prom:
            prom.wait_for_target_up()
            assert prom.query_value("virtio_agent_devices") == 0
            assert prom.query_value("virtio_agent_ready") == 0
            assert prom.query_value('virtio_agent_build_info{version="0.1.0"}') == 1
    finally:
        srv.close()

