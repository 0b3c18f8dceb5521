"""agent.net.outage: the attribution rule, command-line reading, and the tracker's bookkeeping
(episodes seen in snapshots, unmeasured reasons, log records, metric families)."""
from __future__ import annotations

import io
import json
import os
import time

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from agent.export.episode_log import EpisodeLog
from agent.export.metrics import AgentCollector, EpisodeHistograms
from agent.model import DeviceView, Episode, EpisodeEnded, Outcome, Snapshot, VmIdentity
from agent.net.outage import (
    How, NetOutageTracker, UNMEASURED_REASONS, declared_network, read_cmdline, single_tap_rule,
)
from agent.net.backend import TapBackend

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


# --- the worker: the tracker off the agent loop ------------------------------------------------

class BlockingTracker:
    """A tracker whose start() waits for the test; records what ran, in order."""

    def __init__(self):
        import threading

        self.release = threading.Event()
        self.ran: list = []
        self.counted: list[str] = []
        self.closed = False

    def pending(self, snap):
        self.ran.append(("pending", snap.now_ns))
        return [(d.open_episode, 1, 1) for d in snap.devices if d.open_episode is not None]

    def start(self, ep, n_devices, n_net):
        self.release.wait(10)
        self.ran.append(("start", ep.device))

    def end(self, ep):
        self.ran.append(("end", ep.device))
        return {"measured": True, "dropped_packets": 3}

    def _count(self, reason):
        self.counted.append(reason)

    def close(self):
        self.closed = True

    def wait_started(self):
        """Until the worker has taken the first tick (it then blocks in start())."""
        for _ in range(1000):
            if self.ran:
                return
            time.sleep(0.01)
        raise AssertionError("the worker never ran")


def test_the_worker_keeps_the_loop_free_and_writes_lines_in_order():
    from agent.net.outage import NetOutageWorker

    t, lines = BlockingTracker(), []
    w = NetOutageWorker(t, lambda out, net: lines.append((out.episode.device, net)))
    ep = episode()
    w.tick(snapshot(view(ep)))              # start() blocks in the worker...
    t.wait_started()
    for now in (3000, 4000, 5000):          # ...the loop goes on; these ticks coalesce
        w.tick(Snapshot(now_ns=now, devices=[], violations={}, episodes_ended={}, vms=1,
                        evictions={}))
    w.ended(EpisodeEnded(ep))
    assert lines == [] and t.ran == [("pending", 2000)]
    t.release.set()
    w.close()
    assert t.ran == [("pending", 2000), ("start", ep.device), ("pending", 5000),
                     ("end", ep.device)]
    assert lines == [(ep.device, {"measured": True, "dropped_packets": 3})] and t.closed


def test_the_worker_never_loses_a_line_when_full_or_stuck():
    from agent.net.outage import NetOutageWorker

    t, lines = BlockingTracker(), []
    w = NetOutageWorker(t, lambda out, net: lines.append((out.episode.device, net)), max_jobs=2)
    ep1, ep2, ep3 = (episode(device=f"pci-0000:00:0{i}.0", start=i) for i in (3, 4, 5))
    w.tick(snapshot(view(ep1)))             # taken by the worker, which blocks in start()
    t.wait_started()
    w.ended(EpisodeEnded(ep1))
    w.ended(EpisodeEnded(ep2))
    w.ended(EpisodeEnded(ep3))              # beyond max_jobs: written at once, unmeasured
    assert lines == [(ep3.device, {"measured": False, "reason": "missed"})]
    assert t.counted == ["missed"]
    w.close(timeout_s=0.2)                  # still blocked: the queued lines go out unmeasured
    assert lines[1:] == [(ep1.device, {"measured": False, "reason": "missed"}),
                         (ep2.device, {"measured": False, "reason": "missed"})]
    assert not t.closed                     # its meters are still in use
    t.release.set()


class FakeMeter:
    """OutageMeter's interface; each episode's interfaces are given by the test."""

    def __init__(self):
        self.max_open = 16
        self.no_backend = self.refused = self.gone = self.inconsistent = 0
        self.open: dict = {}
        self.next_ifnames: list[str] = []
        self.lose = 0                       # interfaces gone at the next end()

    def start(self, key, pid, ifnames):
        self.open[key] = sorted(ifnames)
        return len(ifnames)

    def end(self, key):
        from agent.net.backend import OutageImpact

        names = self.open.pop(key)
        self.gone += self.lose
        names = names[self.lose:]
        self.lose = 0
        return [OutageImpact(n, 1, "tap", 0.5, tx_dropped=2, tx_packets=5, tx_bytes=500,
                             tx_errors=0, rx_dropped=0, rx_packets=0, rx_bytes=0, rx_errors=0)
                for n in names]

    def discard(self, key):
        self.open.pop(key, None)

    def close(self):
        pass


class FakeResolver:
    def __init__(self):
        self.ifnames = ["vnet0"]

    def resolve(self, pid, device, dev_type, vm_devices, vm_net_devices):
        from agent.net.outage import Attribution

        return Attribution(frozenset(self.ifnames), How.QMP), ""


def _series(t: NetOutageTracker) -> list[tuple]:
    return sorted((s.labels["ifname"], s.value) for fam in t.families() for s in fam.samples
                  if s.name == "virtio_net_outage_dropped_packets_total")


def test_a_restarted_vm_on_a_new_tap_leaves_no_series_of_the_old_one():
    meter, resolver = FakeMeter(), FakeResolver()
    t = NetOutageTracker(meter=meter, resolver=resolver)
    for i, tap in enumerate(("vnet0", "vnet1", "vnet2")):    # same VM labels, a new tap each
        resolver.ifnames = [tap]
        ep = episode(start=1000 + i)
        for p in t.pending(snapshot(view(ep))):
            t.start(*p)
        assert t.end(ep)["dropped_packets"] == 2
    assert _series(t) == [("vnet2", 2.0)]


def test_an_episode_typed_away_from_net_is_not_missed_and_lost_interfaces_are_said():
    meter, resolver = FakeMeter(), FakeResolver()
    t = NetOutageTracker(meter=meter, resolver=resolver)
    ep = episode(type_="unknown")
    for p in t.pending(snapshot(view(ep, type_="unknown"))):
        t.start(*p)
    assert len(meter.open) == 1
    t.pending(snapshot(view(ep, type_="rng")))        # query-pci said rng: not an outage
    assert meter.open == {} and t.unmeasured["missed"] == 0
    assert t.end(ep) is None

    resolver.ifnames = ["vnet0", "vnet1"]
    ep2 = episode(start=2000)
    for p in t.pending(snapshot(view(ep2))):
        t.start(*p)
    meter.lose = 1
    rec = t.end(ep2)
    assert rec["measured"] and rec["partial"] == ["gone"] and t.unmeasured["gone"] == 1
    ep3 = episode(start=3000)
    for p in t.pending(snapshot(view(ep3))):
        t.start(*p)
    meter.lose = 2
    assert t.end(ep3) == {"measured": False, "reason": "gone"}
