"""agent.net_outage: the attribution rule, command-line reading, and the tracker's bookkeeping
(episodes seen in snapshots, unmeasured reasons, log records, metric families)."""
from __future__ import annotations

import io
import json
import os

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from agent.episode_log import EpisodeLog
from agent.metrics import AgentCollector, EpisodeHistograms
from agent.model import DeviceView, Episode, EpisodeEnded, Outcome, Snapshot, VmIdentity
from agent.net_outage import (
    How, NetOutageTracker, UNMEASURED_REASONS, declared_network, read_cmdline, single_tap_rule,
)
from agent.netbackend import TapBackend

TAP = TapBackend("tap0", 7, "tap", 23, "/dev/net/tun")
ARGV = ["qemu-system-x86_64", "-name", "vm1", "-netdev", "tap,id=n0,ifname=tap0",
        "-device", "virtio-net-pci,netdev=n0,id=net0", "-device", "virtio-blk-pci,drive=d0"]


def test_declared_network_counts_backends_and_virtio_nics():
    assert declared_network(ARGV) == (1, 0, 1)
    libvirt = ["qemu", "-netdev", '{"type":"tap","fd":"34","id":"hostnet0"}',
               "-device", '{"driver":"virtio-net-pci","netdev":"hostnet0","id":"net0"}',
               "--netdev", "user,id=u1", "-device", "e1000,netdev=u1"]
    assert declared_network(libvirt) == (2, 0, 1)
    assert declared_network(["qemu", "-nic", "tap,model=virtio-net-pci"]) == (0, 1, 0)
    assert declared_network(["qemu", "-device", "{not json"]) == (0, 0, 0)


def test_single_tap_rule_attributes_only_when_nothing_else_is_possible():
    ok = single_tap_rule("net", 2, 1, [TAP], 0, ARGV)
    assert ok is not None and ok.ifnames == {"tap0"} and ok.how == How.SINGLE_TAP
    # a multiqueue tap (one fd per queue) is still one interface
    assert single_tap_rule("net", 2, 1, [TAP, TapBackend("tap0", 7, "tap", 24, TAP.device)], 0,
                           ARGV) is not None
    # the only device the agent knows, type not known yet
    assert single_tap_rule("unknown", 1, 0, [TAP], 0, ARGV) is not None
    refused = {
        "not net": ("blk", 2, 1, [TAP], 0, ARGV),
        "unknown among several": ("unknown", 2, 0, [TAP], 0, ARGV),
        "a second net device": ("net", 2, 2, [TAP], 0, ARGV),
        "two taps": ("net", 1, 1, [TAP, TapBackend("tap1", 8, "tap", 25, TAP.device)], 0, ARGV),
        "unresolved tap": ("net", 1, 1, [TAP, TapBackend("tapx", None, "unresolved", 26,
                                                         TAP.device)], 0, ARGV),
        "detached queue": ("net", 1, 1, [TAP], 1, ARGV),
        "no tap": ("net", 1, 1, [], 0, ARGV),
        "two netdevs": ("net", 1, 1, [TAP], 0, ARGV + ["-netdev", "user,id=u"]),
        "a -nic": ("net", 1, 1, [TAP], 0, ARGV + ["-nic", "user"]),
        "two virtio NICs": ("net", 1, 1, [TAP], 0, ARGV + ["-device", "virtio-net-pci,id=x"]),
    }
    for why, args in refused.items():
        assert single_tap_rule(*args) is None, why


def test_read_cmdline_splits_on_nul(tmp_path):
    (tmp_path / "42").mkdir()
    (tmp_path / "42" / "cmdline").write_bytes(b"\0".join(a.encode() for a in ARGV) + b"\0")
    assert read_cmdline(42, str(tmp_path)) == ARGV


# --- the tracker, on this test process (it holds no tap) -------------------------------------

VM = VmIdentity(pid=os.getpid(), start_time=1, name="web-1", namespace="prod")


def episode(device="pci-0000:00:03.0", type_="net", start=1000) -> Episode:
    return Episode(vm=VM, device=device, type=type_, transport="pci-modern",
                   evidence="status_read", start_ns=start, guest_saw_ns=start)


def view(ep: Episode | None, device="pci-0000:00:03.0", type_="net") -> DeviceView:
    return DeviceView(vm=VM, device=device, type=type_, transport="pci-modern", status=0x4f,
                      open_episode=ep)


def snapshot(*views: DeviceView) -> Snapshot:
    return Snapshot(now_ns=2000, devices=list(views), violations={}, episodes_ended={}, vms=1,
                    evictions={})


def test_tracker_counts_a_net_episode_without_backend_and_logs_why():
    t = NetOutageTracker()
    ep, other = episode(), episode(device="pci-0000:00:04.0", type_="blk")
    pending = t.pending(snapshot(view(ep), view(other, "pci-0000:00:04.0", "blk")))
    assert [(p[0].device, p[1], p[2]) for p in pending] == [("pci-0000:00:03.0", 2, 1)]
    assert t.start(*pending[0]) is None
    assert t.pending(snapshot(view(ep))) == []            # seen once
    assert t.unmeasured["no_backend"] == 1
    ep.outcome, ep.driver_ok_ns = Outcome.RECOVERED, 3000
    net = t.end(ep)
    assert net == {"measured": False, "reason": "no_backend"}
    assert t.end(other) is None                            # not a network device
    out = io.StringIO()
    EpisodeLog(out).write(EpisodeEnded(ep), net=net)
    EpisodeLog(out).write(EpisodeEnded(other))
    first, second = (json.loads(line) for line in out.getvalue().splitlines())
    assert first["net"] == net and first["device"] == ep.device
    assert "net" not in second


def test_tracker_counts_an_episode_it_never_saw_open_as_missed():
    t = NetOutageTracker()
    ep = episode(start=5000)
    assert t.end(ep) == {"measured": False, "reason": "missed"}
    assert t.unmeasured["missed"] == 1
    assert t.end(episode(type_="unknown", start=6000)) is None   # maybe not net: not counted


def test_tracker_ignores_unknown_devices_of_a_vm_without_taps():
    t = NetOutageTracker()
    ep = episode(type_="unknown")
    [p] = t.pending(snapshot(view(ep, type_="unknown")))
    assert t.start(*p) is None
    assert sum(t.unmeasured.values()) == 0
    assert t.end(ep) is None


def test_tracker_families_are_valid_and_bounded_label_sets():
    t = NetOutageTracker()
    h = EpisodeHistograms()
    snap = snapshot(view(None))
    c = AgentCollector(lambda: snap, h, ifname_fn=lambda vm, dev: t.ifname(vm.key, dev),
                       extra_families_fn=t.families)
    reg = CollectorRegistry()
    reg.register(c)
    text = generate_latest(reg).decode()
    assert 'virtio_device_info{device="pci-0000:00:03.0",ifname="",' in text
    for reason in UNMEASURED_REASONS:
        assert f'virtio_agent_net_outage_unmeasured_total{{reason="{reason}"}} 0.0' in text
    assert "virtio_agent_net_outage_open 0.0" in text
    assert 'virtio_net_outage_episode_dropped_packets_bucket{le="+Inf"} 0.0' in text


def test_tracker_rejects_a_bad_bound():
    with pytest.raises(ValueError):
        NetOutageTracker(max_series=0)
