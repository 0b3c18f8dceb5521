"""The collector over agent.model snapshots: names, labels, values, exposition validity."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_om
from prometheus_client.parser import text_string_to_metric_families

from agent.export.metrics import BUCKETS, AgentCollector, BuildInfo, EpisodeHistograms, SelfStats
from agent.model import (
    PHASES, DeviceView, Episode, EpisodeEnded, EpisodeStuck, Evidence, Outcome, Rule, Snapshot,
    Transport, VmIdentity,
)

ROOT = Path(__file__).resolve().parents[2]
S = 1_000_000_000

VM_A = VmIdentity(pid=100, start_time=5000, name="web-1", namespace="prod")
VM_B = VmIdentity(pid=200, start_time=6000, name="db-1")


def recovered(vm=VM_A, device="pci-0000:00:03.0", start=10 * S, saw=0.001, reset=0.002,
              done=0.0021, ok=0.0035, type_="net", transport=Transport.PCI_MODERN) -> Episode:
    return Episode(vm=vm, device=device, type=type_, transport=transport,
                   evidence=Evidence.CONFIG_INTERRUPT, start_ns=start,
                   guest_saw_ns=start + int(saw * S), reset_written_ns=start + int(reset * S),
                   reset_done_ns=start + int(done * S), driver_ok_ns=start + int(ok * S),
                   end_ns=start + int(ok * S), outcome=Outcome.RECOVERED,
                   reinit_values=[0, 1, 3, 11, 15])


def scrape(collector) -> dict:
    reg = CollectorRegistry()
    reg.register(collector)
    text = generate_latest(reg).decode()
    samples = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return {"text": text, "samples": samples, "registry": reg}


def value(samples, name, **labels):
    return samples[(name, tuple(sorted(labels.items())))]


def names(samples, prefix):
    return {k for k in samples if k[0] == prefix}


def make_snapshot(now_ns=100 * S) -> Snapshot:
    open_ep = Episode(vm=VM_B, device="mmio-0xfeb00e00", type="blk", transport=Transport.MMIO,
                      evidence=Evidence.CONFIG_INTERRUPT, start_ns=now_ns - 90 * S)
    young_ep = Episode(vm=VM_A, device="pio-0xc040", type="rng", transport=Transport.PCI_LEGACY,
                       evidence=Evidence.STATUS_READ, start_ns=now_ns - 2 * S)
    return Snapshot(
        now_ns=now_ns,
        devices=[
            DeviceView(vm=VM_A, device="pci-0000:00:03.0", type="net",
                       transport=Transport.PCI_MODERN, status=15, needs_reset_total=3,
                       recoveries_total=2, resets_total=5, failed_total=1,
                       config_interrupts_total=3),
            DeviceView(vm=VM_A, device="pio-0xc040", type="rng", transport=Transport.PCI_LEGACY,
                       status=0x4f, needs_reset_total=1, open_episode=young_ep),
            DeviceView(vm=VM_B, device="mmio-0xfeb00e00", type="blk", transport=Transport.MMIO,
                       status=0x4f, needs_reset_total=1, open_episode=open_ep),
        ],
        violations={(VM_B, Rule.NEEDS_RESET_WITHOUT_NOTIFY): 2,
                    (VM_A, Rule.BIT_CLEARED_WITHOUT_RESET): 1},
        episodes_ended={Outcome.RECOVERED: 2, Outcome.ABANDONED: 1},
        vms=2,
        evictions={"device": 4},
    )


BUILD = BuildInfo("0.1.0", "3.11.2", "0.26.0")


def test_device_metrics_follow_the_snapshot():
    snap = make_snapshot()
    r = scrape(AgentCollector(lambda: snap, EpisodeHistograms(), stuck_after_s=60))
    s = r["samples"]
    a = dict(vm="web-1", namespace="prod", device="pci-0000:00:03.0")
    assert value(s, "virtio_device_info", type="net", transport="pci-modern", ifname="",
                 **a) == 1
    assert value(s, "virtio_device_status", **a) == 15
    assert value(s, "virtio_device_needs_reset_total", **a) == 3
    assert value(s, "virtio_device_recoveries_total", **a) == 2
    assert value(s, "virtio_device_resets_total", **a) == 5
    assert value(s, "virtio_driver_failed_total", **a) == 1
    assert value(s, "virtio_config_interrupts_total", **a) == 3
    # open episodes only
    assert ("virtio_device_unrecovered_seconds", tuple(sorted(a.items()))) not in s
    b = dict(vm="db-1", namespace="", device="mmio-0xfeb00e00")
    assert value(s, "virtio_device_unrecovered_seconds", **b) == pytest.approx(90)
    assert value(s, "virtio_device_stuck", **b) == 1
    young = dict(vm="web-1", namespace="prod", device="pio-0xc040")
    assert value(s, "virtio_device_unrecovered_seconds", **young) == pytest.approx(2)
    assert value(s, "virtio_device_stuck", **young) == 0
    assert value(s, "virtio_devices_stuck") == 1
    assert value(s, "virtio_episodes_ended_total", outcome="recovered") == 2
    assert value(s, "virtio_episodes_ended_total", outcome="abandoned") == 1
    assert value(s, "virtio_spec_violations_total", vm="db-1", namespace="",
                 rule="needs_reset_without_config_interrupt") == 2
    assert value(s, "virtio_agent_vms") == 2
    assert value(s, "virtio_agent_devices") == 3
    assert value(s, "virtio_agent_evictions_total", what="device") == 4
    assert value(s, "virtio_agent_evictions_total", what="vm") == 0
    assert not [k for k in s if k[0] in ("virtio_agent_build_info", "virtio_agent_ready")]


def test_build_info_and_readiness_are_served_before_the_agent_exists():
    """From the first scrape (BPF still compiling): build info, and ready 0 until the ready
    function says otherwise; a failing ready function reads as not ready."""
    from agent.export.metrics import AgentStatusCollector

    state = {"ready": False}

    def ready():
        if state["ready"] is None:
            raise RuntimeError("health check broke")
        return state["ready"]

    c = AgentStatusCollector(ready, build_info=BUILD)
    s = scrape(c)["samples"]
    assert value(s, "virtio_agent_build_info", version="0.1.0", python="3.11.2", bcc="0.26.0") == 1
    assert value(s, "virtio_agent_ready") == 0
    state["ready"] = True
    assert value(scrape(c)["samples"], "virtio_agent_ready") == 1
    state["ready"] = None
    assert value(scrape(c)["samples"], "virtio_agent_ready") == 0


def test_stuck_flag_from_correlation_counts_even_below_threshold():
    snap = make_snapshot()
    snap.devices[1].open_episode.stuck = True
    s = scrape(AgentCollector(lambda: snap, EpisodeHistograms(), stuck_after_s=600))["samples"]
    assert value(s, "virtio_devices_stuck") == 1
    assert value(s, "virtio_device_stuck", vm="web-1", namespace="prod", device="pio-0xc040") == 1


def test_every_documented_metric_is_exported():
    """docs/metrics.md is the contract: every name in its tables appears in a scrape."""
    doc = (ROOT / "docs" / "metrics.md").read_text()
    documented = set(re.findall(r"^\| `([a-z_]+)` \|", doc, re.M))
    assert len(documented) > 20
    h = EpisodeHistograms()
    h.observe(EpisodeEnded(recovered()))
    stats = SelfStats(hooks={"mmio": True}, prog_run_time_ns={"p": 1}, prog_run_count={"p": 1},
                      map_entries={"watch": 1}, map_capacity={"watch": 4096})
    from agent.net.outage import NetOutageTracker   # the run loop's virtio-net families

    from agent.export.metrics import AgentStatusCollector

    text = scrape(AgentCollector(make_snapshot, h, lambda: stats,
                                 extra_families_fn=NetOutageTracker().families))["text"]
    text += scrape(AgentStatusCollector(lambda: True, build_info=BUILD))["text"]
    exported = set()
    for fam in text_string_to_metric_families(text):
        exported.add(fam.name if fam.type != "counter" else fam.name + "_total")
    assert documented <= exported, documented - exported


def test_an_episode_without_a_known_config_interrupt_observes_no_notify_phase():
    h = EpisodeHistograms()
    ep = recovered()
    ep.evidence, ep.guest_saw_ns = Evidence.STATUS_READ, ep.start_ns
    h.observe(EpisodeEnded(ep))
    s = scrape(AgentCollector(lambda: None, h))["samples"]
    assert value(s, "virtio_recovery_phase_duration_seconds_count", phase="notify") == 0
    assert value(s, "virtio_recovery_phase_duration_seconds_count", phase="react") == 1


def test_histograms_cover_recovered_episodes_only():
    h = EpisodeHistograms()
    h.observe(EpisodeEnded(recovered(ok=0.0035)))
    h.observe(EpisodeEnded(recovered(ok=0.2, device="pci-0000:00:04.0")))
    h.observe(EpisodeEnded(recovered(ok=0.04, type_="blk", transport=Transport.MMIO)))
    abandoned = Episode(vm=VM_A, device="x", type="net", transport=Transport.PCI_MODERN,
                        evidence=Evidence.STATUS_READ, start_ns=0, guest_saw_ns=S, end_ns=2 * S,
                        outcome=Outcome.ABANDONED)
    h.observe(EpisodeEnded(abandoned))
    h.observe(EpisodeStuck(recovered()))   # not an end: ignored
    s = scrape(AgentCollector(lambda: None, h))["samples"]
    net = dict(type="net", transport="pci-modern")
    assert value(s, "virtio_recovery_duration_seconds_count", **net) == 2
    assert value(s, "virtio_recovery_duration_seconds_sum", **net) == pytest.approx(0.2035)
    assert value(s, "virtio_recovery_duration_seconds_bucket", le="0.005", **net) == 1
    assert value(s, "virtio_recovery_duration_seconds_bucket", le="0.25", **net) == 2
    assert value(s, "virtio_recovery_duration_seconds_bucket", le="+Inf", **net) == 2
    assert value(s, "virtio_recovery_duration_seconds_count", type="blk", transport="mmio") == 1
    for phase in PHASES:
        assert value(s, "virtio_recovery_phase_duration_seconds_count", phase=phase) == 3
    assert value(s, "virtio_recovery_phase_duration_seconds_sum", phase="react") == \
        pytest.approx(3 * 0.001)
    # every bucket is exported, cumulative
    les = sorted(float(dict(k[1])["le"]) for k in s
                 if k[0] == "virtio_recovery_duration_seconds_bucket" and ("type", "net") in k[1])
    assert les[:-1] == [float(b) for b in BUCKETS] and les[-1] == float("inf")


def test_unknown_label_values_are_folded():
    snap = make_snapshot()
    snap.devices[0].type = "weird-type-from-a-bug"
    snap.devices[0].transport = "carrier-pigeon"
    snap.violations[(VM_A, "made_up_rule")] = 7
    h = EpisodeHistograms()
    h.observe(EpisodeEnded(recovered(type_="zzz", transport="yyy")))
    s = scrape(AgentCollector(lambda: snap, h))["samples"]
    assert value(s, "virtio_device_info", vm="web-1", namespace="prod", device="pci-0000:00:03.0",
                 type="unknown", transport="unknown", ifname="") == 1
    assert value(s, "virtio_spec_violations_total", vm="web-1", namespace="prod",
                 rule="other") == 7
    assert value(s, "virtio_recovery_duration_seconds_count", type="unknown",
                 transport="unknown") == 1


def test_same_vm_name_twice_gives_one_series_newest_instance():
    old = VmIdentity(pid=300, start_time=1, name="web-1", namespace="prod")
    snap = make_snapshot()
    snap.devices.append(DeviceView(vm=old, device="pci-0000:00:03.0", type="net",
                                   transport=Transport.PCI_MODERN, status=0x8f,
                                   needs_reset_total=99))
    snap.violations[(old, Rule.NEEDS_RESET_WITHOUT_NOTIFY)] = 3
    snap.violations[(VM_A, Rule.NEEDS_RESET_WITHOUT_NOTIFY)] = 4
    r = scrape(AgentCollector(lambda: snap, EpisodeHistograms()))
    s = r["samples"]
    a = dict(vm="web-1", namespace="prod", device="pci-0000:00:03.0")
    assert value(s, "virtio_device_needs_reset_total", **a) == 3
    assert value(s, "virtio_spec_violations_total", vm="web-1", namespace="prod",
                 rule="needs_reset_without_config_interrupt") == 7
    assert r["text"].count('virtio_device_status{device="pci-0000:00:03.0"') == 1


def test_vm_without_name_is_labelled_by_pid():
    anon = VmIdentity(pid=4242, start_time=1, name="")
    snap = Snapshot(now_ns=S, devices=[DeviceView(vm=anon, device="d", type="net",
                                                  transport="mmio", status=0)],
                    violations={}, episodes_ended={}, vms=1, evictions={})
    s = scrape(AgentCollector(lambda: snap, EpisodeHistograms()))["samples"]
    assert value(s, "virtio_device_status", vm="pid-4242", namespace="", device="d") == 0


def test_self_stats_and_defaults():
    stats = SelfStats(hooks={"mmio": True, "pio": True, "vhost": False},
                      events={"access": 12, "msi": 3}, filtered={"repeat": 40},
                      lost={"ringbuf_full": 2}, map_entries={"watch_regs": 7},
                      map_capacity={"watch_regs": 4096})
    s = scrape(AgentCollector(lambda: None, EpisodeHistograms(), lambda: stats))["samples"]
    assert value(s, "virtio_agent_hook_attached", hook="vhost") == 0
    assert value(s, "virtio_agent_hook_attached", hook="mmio") == 1
    assert value(s, "virtio_agent_events_total", kind="access") == 12
    assert value(s, "virtio_agent_events_total", kind="apic") == 0  # every kind, 0 when unseen
    assert value(s, "virtio_agent_kernel_events_filtered_total", reason="repeat") == 40
    assert value(s, "virtio_agent_kernel_events_filtered_total", reason="rate_limited") == 0
    assert value(s, "virtio_agent_events_lost_total", reason="ringbuf_full") == 2
    assert value(s, "virtio_agent_events_lost_total", reason="decode_error") == 0
    assert value(s, "virtio_agent_bpf_map_entries", map="watch_regs") == 7
    assert value(s, "virtio_agent_bpf_map_capacity", map="watch_regs") == 4096
    # bpf stats off: absent, not zero
    assert not names(s, "virtio_agent_bpf_run_time_seconds_total")
    assert value(s, "virtio_episodes_ended_total", outcome="recovered") == 0
    assert value(s, "virtio_devices_stuck") == 0


def test_bpf_run_stats_in_seconds():
    stats = SelfStats(prog_run_time_ns={"tp_mmio": 2_500_000_000}, prog_run_count={"tp_mmio": 9})
    s = scrape(AgentCollector(lambda: None, EpisodeHistograms(), lambda: stats))["samples"]
    assert value(s, "virtio_agent_bpf_run_time_seconds_total", prog="tp_mmio") == 2.5
    assert value(s, "virtio_agent_bpf_run_count_total", prog="tp_mmio") == 9


def test_scrape_duration_reports_the_previous_scrape():
    c = AgentCollector(make_snapshot, EpisodeHistograms())
    first = scrape(c)["samples"]
    assert value(first, "virtio_agent_scrape_duration_seconds") == 0
    second = scrape(c)["samples"]
    assert 0 < value(second, "virtio_agent_scrape_duration_seconds") < 5


def test_openmetrics_exposition_parses():
    h = EpisodeHistograms()
    h.observe(EpisodeEnded(recovered()))
    reg = CollectorRegistry()
    reg.register(AgentCollector(make_snapshot, h))
    fams = {f.name: f for f in parse_om(generate_openmetrics(reg).decode())}
    assert fams["virtio_recovery_duration_seconds"].type == "histogram"
    assert fams["virtio_device_needs_reset"].type == "counter"


def test_promtool_check_metrics_passes():
    from conftest import require_tool

    promtool = require_tool("promtool", "Debian package prometheus")
    h = EpisodeHistograms()
    h.observe(EpisodeEnded(recovered()))
    stats = SelfStats(hooks={"mmio": True}, events={"access": 1}, map_entries={"m": 1},
                      map_capacity={"m": 2}, prog_run_time_ns={"p": 5}, prog_run_count={"p": 1})
    text = scrape(AgentCollector(make_snapshot, h, lambda: stats))["text"]
    proc = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
