"""Dashboards and alert rules against a real Prometheus that scraped the real agent (real BPF, real
KVM, lab guests) while guests went through NEEDS_RESET episodes: recoveries on every transport,
FAILED, spec violations, and one device left stuck.

Every dashboard query must return data and every rule must evaluate without error; the stuck device
must drive VirtioDeviceStuckNeedsReset to pending.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from deploy_support import ROOT, RULES_FILE, dashboard_exprs, rule_exprs

JOB = "virtio-recovery-agent"
BPF_STATS = Path("/proc/sys/kernel/bpf_stats_enabled")


def _grafana_vars(expr: str) -> str:
    """Template variables as 'All' (.*), the scrape job as the lab's."""
    expr = expr.replace('job=~"$job"', f'job=~"{JOB}"')
    return re.sub(r'=~"\$\w+"', '=~".*"', expr)


def _wait_http(url: str, timeout_s: float, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"agent exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    pytest.fail(f"{url} not ready after {timeout_s}s:\n{log.read_text()[-4000:]}")


def _wait_query(prom, promql: str, timeout_s: float) -> list:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        result = prom.query(promql)
        if result:
            return result
        time.sleep(0.5)
    return []


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    from conftest import missing, require_bpf

    require_bpf()
    sys.path.insert(0, str(ROOT / "tests"))
    from promlab import PromLab

    problem = PromLab.problem()
    if problem:
        missing(problem)
    from lab.harness import GuestSpec, LabVM, run

    tmp = tmp_path_factory.mktemp("promlab")
    stats_before = BPF_STATS.read_text().strip()
    BPF_STATS.write_text("1")  # so the BPF run-time metrics (and their panels) exist
    port = 19000 + os.getpid() % 1000
    agent_log = tmp / "agent.log"
    agent = subprocess.Popen([sys.executable, "-m", "agent", "run", "--listen", f"127.0.0.1:{port}",
                              "--stuck-after", "1", "--state-file", str(tmp / "state.json")],
                             cwd=ROOT, stdout=open(agent_log, "wb"),
                             stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    prom = None
    stuck_vm = None
    linux_vm = None
    try:
        _wait_http(f"http://127.0.0.1:{port}/healthz", 90, agent, agent_log)
        prom = PromLab([f"127.0.0.1:{port}"], job=JOB, scrape_interval="1s", rule_files=[RULES_FILE]).start()
        prom.wait_for_target_up()
        results = []
        # The violation scenarios wait after their handshake, so that their VM is known (and its
        # zero-valued violation counters scraped) before the violation happens.
        for spec in (GuestSpec(transport="modern", scenario="recover", devices=2, repeat=3),
                     GuestSpec(transport="legacy", scenario="recover"),
                     GuestSpec(transport="mmio", scenario="recover", repeat=2),
                     GuestSpec(transport="modern", scenario="fail"),
                     GuestSpec(transport="modern", scenario="bitclear", delay_ms=2500),
                     GuestSpec(transport="modern", scenario="failreinit", delay_ms=2500)):
            results.append(run(spec, timeout=60, check=True))
        # (a legacy device never shows NEEDS_RESET: the guest's timed-out "episode" is no episode)
        recovered = sum(1 for r in results for e in r.episodes
                        if e.reset_ns is not None and e.driver_ok_ns is not None
                        and not e.timed_out)
        # A guest that exits with its device stuck is an abandoned episode; one that stays is stuck.
        run(GuestSpec(transport="modern", scenario="stuck", hold_ms=3000), timeout=60, check=False)
        stuck_vm = LabVM.start(GuestSpec(transport="modern", scenario="stuck", hold_ms=120_000))
        stuck = _wait_query(prom, "virtio_device_stuck == 1", 60)
        assert stuck, f"no stuck device seen by Prometheus:\n{agent_log.read_text()[-4000:]}"
        # A Linux-like guest (never reads status) without a QMP socket: suspected, unconfirmed.
        linux_vm = LabVM.start(GuestSpec(transport="modern", scenario="linux", hold_ms=120_000))
        suspected = _wait_query(prom, "virtio_device_needs_reset_suspected == 1", 60)
        assert suspected, f"no suspected device seen by Prometheus:\n{agent_log.read_text()[-4000:]}"
        prom.wait_for_scrape()
        prom.wait_for_scrape()
        yield prom, stuck_vm, agent_log, recovered
    finally:
        if stuck_vm is not None:
            stuck_vm.kill()
        if linux_vm is not None:
            linux_vm.kill()
        if prom is not None:
            prom.stop()
        agent.send_signal(signal.SIGTERM)
        try:
            agent.wait(timeout=30)
        except subprocess.TimeoutExpired:
            agent.kill()
            agent.wait()
        BPF_STATS.write_text(stats_before)


def test_every_dashboard_query_returns_data(lab):
    prom, _, agent_log, _ = lab
    # increase() needs a sample before the first violation: the agent exports every tracked VM's
    # violation counters at 0, and the violating guests wait past a scrape before misbehaving.
    assert prom.query("virtio_spec_violations_total == 0"), "violation counters are not born at 0"
    empty = [f"{where}: {expr}" for where, expr in dashboard_exprs().items()
             if not prom.query(_grafana_vars(expr))]
    assert empty == [], "queries without data:\n" + "\n".join(empty)


def test_prometheus_counts_the_labs_recoveries(lab):
    """The guests' own logs say how many episodes they recovered; the agent, scraped by Prometheus,
    must have counted at least those (other VMs on this host can only add)."""
    prom, _, agent_log, recovered = lab
    assert recovered >= 9
    counted = prom.query_value('sum(virtio_episodes_ended_total{outcome="recovered"})')
    assert counted is not None and counted >= recovered, agent_log.read_text()[-3000:]
    histogram = prom.query_value("sum(virtio_recovery_duration_seconds_count)")
    assert histogram is not None and histogram >= recovered


def test_every_rule_evaluates_without_error(lab):
    prom, _, _, _ = lab
    for name, expr in rule_exprs().items():
        prom.query(expr)  # raises PromLabError on an evaluation error
    rules = [r for g in prom.rules() for r in g["rules"]]
    assert {r["name"] for r in rules} == set(rule_exprs())
    assert [r["name"] for r in rules if r.get("health") != "ok"] == []


def test_stuck_device_raises_the_alert(lab):
    prom, stuck_vm, agent_log, _ = lab
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        alerts = [a for a in prom.alerts() if a["labels"]["alertname"] == "VirtioDeviceStuckNeedsReset"]
        if alerts:
            break
        time.sleep(0.5)
    assert alerts, f"VirtioDeviceStuckNeedsReset not pending:\n{agent_log.read_text()[-3000:]}"
    assert {a["state"] for a in alerts} <= {"pending", "firing"}
    assert all(a["labels"]["severity"] == "critical" for a in alerts)


def test_a_healthy_agent_raises_no_agent_alert(lab):
    """On this host every hook family attaches except vhost_kprobe (no kprobes): the hook alerts
    must stay silent, as must the down and map-fill alerts."""
    prom, _, _, _ = lab
    prom.wait_for_scrape()
    attached = {labels["hook"]: value for labels, value in prom.query("virtio_agent_hook_attached")}
    assert attached.get("mmio") == 1 and attached.get("pio") == 1, attached
    active = {a["labels"]["alertname"] for a in prom.alerts()}
    quiet = {"VirtioAgentDown", "VirtioAgentHookNotAttached", "VirtioAgentBlind", "VirtioAgentBpfMapNearlyFull"}
    assert active & quiet == set(), f"hooks: {attached}"
