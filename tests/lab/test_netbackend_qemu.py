"""agent.net.backend / agent.net.netlink_watch against a real QEMU with a real virtio-net backend.

Everything happens in a network namespace created (and removed) by the fixtures; frames are
raw Ethernet frames injected into that namespace's own interfaces, never routed anywhere.
The guest has no virtio-net driver, so nothing drains the backend queue: this is the
host-side picture of a virtio-net outage. The figures are checked against the kernel's
sysfs counters (a different interface than the rtnetlink path under test).
"""
from __future__ import annotations

import os
import select
import socket
import subprocess
import time
import uuid

import pytest

from agent.net.backend import LinkStatsReader, TapMap, diff, read_links
from agent.net.netlink_watch import LinkAction, LinkWatcher

pytestmark = pytest.mark.kvm

GUEST_MAC = "52:54:00:12:34:56"
ETHERTYPE_EXPERIMENTAL = b"\x88\xb5"      # IEEE 802 local experimental ethertype
SO_SNDBUFFORCE = 32
SYSFS_FIELDS = ("rx_packets", "rx_bytes", "rx_dropped", "rx_errors",
                "tx_packets", "tx_bytes", "tx_dropped", "tx_errors")


class Qemu:
    """QEMU in the namespace `ns`; `netdev` is the backend of one virtio-net NIC, or give the
    whole network part of the command line as `net_args`."""

    def __init__(self, ns: str, netdev: str | None, tmp_path, pass_fds=(), net_args=()):
        self.log = tmp_path / f"qemu-{uuid.uuid4().hex[:6]}.log"
        if netdev is not None:
            net_args = ["-netdev", netdev, "-device", f"virtio-net-pci,netdev=n0,mac={GUEST_MAC}"]
        argv = ["ip", "netns", "exec", ns, "qemu-system-x86_64", "-accel", "kvm", "-M", "q35",
                "-nodefaults", "-display", "none", "-bios", "/usr/share/qemu/qboot.rom",
                *net_args]
        with open(self.log, "wb") as log:
            # `ip netns exec` execs QEMU: the pid is QEMU's
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, pass_fds=pass_fds)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_for_exe(self, timeout=10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"QEMU exited {self.proc.returncode}: {self.log.read_text()}")
            try:
                if os.readlink(f"/proc/{self.pid}/exe").endswith("qemu-system-x86_64"):
                    return
            except FileNotFoundError:
                pass
            time.sleep(0.02)
        raise AssertionError("QEMU did not start")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@pytest.fixture
def qemus():
    started: list[Qemu] = []
    yield started
    for q in started:
        q.stop()


def wait_for_event(watcher: LinkWatcher, action: str, ifname: str, timeout=10.0):
    seen = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        select.select([watcher], [], [], max(0.0, deadline - time.monotonic()))
        for ev in watcher.poll():
            seen.append(ev)
            if ev.action == action and ev.link.ifname == ifname:
                return ev
    raise AssertionError(f"no {action} event for {ifname} within {timeout}s; saw {seen}")


def sysfs_stats(ns: str, ifname: str) -> dict[str, int]:
    out = subprocess.run(["ip", "netns", "exec", ns, "grep", "-H", ".",
                          *[f"/sys/class/net/{ifname}/statistics/{f}" for f in SYSFS_FIELDS]],
                         check=True, capture_output=True, text=True).stdout
    return {line.split(":")[0].rsplit("/", 1)[1]: int(line.split(":")[1])
            for line in out.splitlines()}


def settled(read, tries=50):
    """Read twice in a row with no change (frames in flight have been counted)."""
    last = read()
    for _ in range(tries):
        time.sleep(0.05)
        cur = read()
        if cur == last:
            return cur
        last = cur
    raise AssertionError("counters did not settle")


def packet_socket(ns_path: str, ifname: str) -> socket.socket:
    from pyroute2 import netns as pr_netns

    s = pr_netns.create_socket(ns_path, socket.AF_PACKET, socket.SOCK_RAW, 0, flags=0)
    # Queued frames stay charged to the sender's buffer where the path does not orphan them
    # (veth -> macvtap): a default-sized buffer would block the sender before the backend
    # queue is full. SO_SNDBUFFORCE (root) lifts the cap; sends are non-blocking anyway.
    s.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, 64 << 20)
    s.bind((ifname, 0))
    return s


def frame_to(dst_mac: str, src_mac: str = "02:00:00:00:00:01", size: int = 200) -> bytes:
    head = bytes.fromhex(dst_mac.replace(":", "")) + bytes.fromhex(src_mac.replace(":", ""))
    return head + ETHERTYPE_EXPERIMENTAL + b"\x5a" * (size - 14)


def set_up(ns_path: str, *ifnames: str) -> None:
    from agent.net.backend import open_iproute

    with open_iproute(ns_path) as ipr:
        for name in ifnames:
            ipr.link("set", index=ipr.link_lookup(ifname=name)[0], state="up")


def measure_outage(ns: str, ns_path: str, ifindex: int, send_on: str, dst_mac: str, frames: int):
    """Snapshot, inject `frames` frames, snapshot: (impact, sysfs before, sysfs after)."""
    ifname = read_links(ns_path).by_index(ifindex).ifname
    with LinkStatsReader(ns_path) as reader, packet_socket(ns_path, send_on) as sock:
        before_sys = settled(lambda: sysfs_stats(ns, ifname))
        before = reader.snapshot(ifindex)
        frame = frame_to(dst_mac)
        for _ in range(frames):
            assert sock.send(frame, socket.MSG_DONTWAIT) == len(frame)
        after_sys = settled(lambda: sysfs_stats(ns, ifname))
        after = reader.snapshot(ifindex)
    return diff(before, after), before_sys, after_sys


def test_qemu_tap_is_mapped_and_its_creation_and_removal_are_seen(netns, qemus, tmp_path):
    ns, ns_path = netns
    tap = "vratap0"
    with LinkWatcher(ns_path) as watcher:
        assert all(link.ifname != tap for link in watcher.links.values())
        q = Qemu(ns, f"tap,id=n0,ifname={tap},script=no,downscript=no", tmp_path)
        qemus.append(q)
        added = wait_for_event(watcher, LinkAction.ADDED, tap)
        assert added.link.kind == "tap"
        q.wait_for_exe()

        taps = TapMap().taps_of(q.pid)
        assert [(t.ifname, t.ifindex, t.kind, t.device) for t in taps] == [
            (tap, added.link.ifindex, "tap", "/dev/net/tun")]
        assert os.readlink(f"/proc/{q.pid}/fd/{taps[0].fd}") == "/dev/net/tun"
        assert read_links(ns_path).by_name(tap).ifindex == added.link.ifindex

        q.stop()    # a non-persistent tap goes away with the process holding it
        removed = wait_for_event(watcher, LinkAction.REMOVED, tap)
        assert removed.link.ifindex == added.link.ifindex
        assert added.link.ifindex not in watcher.links
        assert watcher.overruns == 0


def test_frames_toward_a_guest_without_driver_are_dropped_at_the_tap(netns, qemus, tmp_path):
    ns, ns_path = netns
    tap = "vratap1"
    q = Qemu(ns, f"tap,id=n0,ifname={tap},script=no,downscript=no", tmp_path)
    qemus.append(q)
    q.wait_for_exe()
    deadline = time.monotonic() + 10
    while not (taps := TapMap().taps_of(q.pid)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(taps) == 1 and taps[0].kind == "tap", taps
    set_up(ns_path, tap)
    qlen = int(subprocess.run(["ip", "netns", "exec", ns, "cat",
                               f"/sys/class/net/{tap}/tx_queue_len"],
                              check=True, capture_output=True, text=True).stdout)
    sent = 3 * qlen

    impact, before_sys, after_sys = measure_outage(ns, ns_path, taps[0].ifindex, tap,
                                                   GUEST_MAC, sent)

    for field in SYSFS_FIELDS:
        assert getattr(impact, field) == after_sys[field] - before_sys[field], field
    assert impact.ifname == tap and impact.kind == "tap"
    assert impact.toward_guest_dropped == impact.tx_dropped
    # Nothing reads the queue (no driver): beyond the tap's ring (tx_queue_len frames) and the
    # one frame QEMU may hold in its own net queue, every frame is dropped by tun_net_xmit.
    unaccounted = sent - impact.tx_dropped - impact.tx_packets
    print(f"\ntap outage: sent={sent} tx_dropped={impact.tx_dropped} "
          f"tx_packets={impact.tx_packets} queued/held={unaccounted} qlen={qlen} "
          f"over {impact.seconds:.3f}s")
    assert impact.tx_dropped > 0
    assert 0 <= unaccounted <= qlen + 1
    assert impact.rx_packets == 0     # the guest sent nothing


def make_macvtap(ns: str, ns_path: str, name: str, lower: str, peer: str):
    """A macvtap on a veth pair in the namespace: (ifindex, MAC, its /dev/tapN node)."""
    from agent.net.backend import open_iproute

    with open_iproute(ns_path) as ipr:
        ipr.link("add", ifname=lower, kind="veth", peer=peer)
        low = ipr.link_lookup(ifname=lower)[0]
        ipr.link("add", ifname=name, kind="macvtap", link=low, macvlan_mode="bridge")
        mvt = ipr.link_lookup(ifname=name)[0]
        mvt_mac = ipr.get_links(mvt)[0].get_attr("IFLA_ADDRESS")
    # /dev/tapN is created by devtmpfs with N = the ifindex in our namespace; make sure it is
    # this macvtap's node (a host macvtap with the same ifindex would clash)
    dev = subprocess.run(["ip", "netns", "exec", ns, "cat", f"/sys/class/net/{name}/tap{mvt}/dev"],
                         check=True, capture_output=True, text=True).stdout.strip()
    node = f"/dev/tap{mvt}"
    deadline = time.monotonic() + 5
    while not os.path.exists(node) and time.monotonic() < deadline:
        time.sleep(0.05)
    major, minor = (int(x) for x in dev.split(":"))
    assert os.stat(node).st_rdev == os.makedev(major, minor), f"{node} is not {name}'s node"
    return mvt, mvt_mac, node


def test_macvtap_backend_held_by_fd_is_mapped_and_its_drops_counted(netns, qemus, tmp_path):
    ns, ns_path = netns
    mvt, mvt_mac, node = make_macvtap(ns, ns_path, "vramvt0", "vralow0", "vrapeer0")
    fd = os.open(node, os.O_RDWR)
    try:
        q = Qemu(ns, f"tap,id=n0,fd={fd}", tmp_path, pass_fds=(fd,))
        qemus.append(q)
    finally:
        os.close(fd)     # QEMU holds its own copy
    q.wait_for_exe()
    deadline = time.monotonic() + 10
    while not (taps := TapMap().taps_of(q.pid)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [(t.ifname, t.ifindex, t.kind, t.device) for t in taps] == [
        ("vramvt0", mvt, "macvtap", node)]

    set_up(ns_path, "vralow0", "vrapeer0", "vramvt0")
    qlen = int(subprocess.run(["ip", "netns", "exec", ns, "cat",
                               "/sys/class/net/vramvt0/tx_queue_len"],
                              check=True, capture_output=True, text=True).stdout)
    sent = 3 * qlen
    # frames enter through the veth peer and reach the macvtap by its MAC address
    impact, before_sys, after_sys = measure_outage(ns, ns_path, mvt, "vrapeer0", mvt_mac, sent)

    for field in SYSFS_FIELDS:
        assert getattr(impact, field) == after_sys[field] - before_sys[field], field
    # macvlan counts every frame it hands to the macvtap as received, then the full queue
    # counts the drop in rx_errors (= rx_dropped): frames not dropped are queued or read by QEMU
    unaccounted = sent - impact.rx_dropped
    print(f"\nmacvtap outage: sent={sent} rx_packets={impact.rx_packets} "
          f"rx_dropped={impact.rx_dropped} rx_errors={impact.rx_errors} "
          f"tx_packets={impact.tx_packets} qlen={qlen}")
    assert impact.rx_packets == sent
    assert impact.toward_guest_dropped == impact.rx_dropped > 0
    assert impact.tx_packets == 0     # the guest sent nothing
    assert 0 <= unaccounted <= qlen + 1


def test_outage_meter_over_episodes_including_a_vm_that_exits(netns, qemus, tmp_path):
    from agent.net.backend import OutageMeter

    ns, ns_path = netns
    tap = "vratap2"
    q = Qemu(ns, f"tap,id=n0,ifname={tap},script=no,downscript=no", tmp_path)
    qemus.append(q)
    q.wait_for_exe()
    deadline = time.monotonic() + 10
    while not TapMap().taps_of(q.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    set_up(ns_path, tap)
    meter = OutageMeter(max_open=1)
    try:
        with packet_socket(ns_path, tap) as sock:
            before_sys = settled(lambda: sysfs_stats(ns, tap))
            assert meter.start("episode-1", q.pid) == 1
            assert meter.start("episode-2", q.pid) == 0 and meter.refused == 1   # bounded
            frame = frame_to(GUEST_MAC)
            for _ in range(2000):
                sock.send(frame, socket.MSG_DONTWAIT)
            after_sys = settled(lambda: sysfs_stats(ns, tap))
            [impact] = meter.end("episode-1")
        assert impact.ifname == tap and impact.kind == "tap"
        for field in SYSFS_FIELDS:
            assert getattr(impact, field) == after_sys[field] - before_sys[field], field
        assert impact.toward_guest_dropped > 0
        assert meter.end("episode-1") == [] and len(meter) == 0

        # the VM exits during the episode: its tap is gone, counted, not reported as no impact
        assert meter.start("episode-3", q.pid) == 1
        q.stop()
        assert meter.end("episode-3") == []
        assert meter.gone == 1
        # and a process without taps is counted as such
        assert meter.start("episode-4", os.getpid()) == 0 and meter.no_backend == 1
    finally:
        meter.close()


def test_link_watcher_reports_every_event_but_keeps_a_bounded_table(netns):
    from agent.net.backend import open_iproute

    ns, ns_path = netns
    with LinkWatcher(ns_path, max_links=2, max_events=3) as watcher:
        assert [link.ifname for link in watcher.links.values()] == ["lo"]
        with open_iproute(ns_path) as ipr:
            for i in range(2):
                ipr.link("add", ifname=f"vrab{i}", kind="veth", peer=f"vrac{i}")
        events = []
        deadline = time.monotonic() + 5
        while len(events) < 4 and time.monotonic() < deadline:
            select.select([watcher], [], [], 0.2)
            batch = watcher.poll()
            assert len(batch) <= 3
            events += batch
        added = {e.link.ifname for e in events if e.action == LinkAction.ADDED}
        assert added == {"vrab0", "vrac0", "vrab1", "vrac1"}, events
        assert len(watcher.links) == 2
        assert watcher.links_over_limit >= 3
        assert all(e.link.kind == "veth" for e in events)


def test_each_virtio_net_device_is_mapped_to_its_own_backend_over_qmp(netns, qemus, tmp_path):
    from agent.net.backend import nic_backends, parse_info_network
    from agent.vmm import qmp
    from lab.harness import wait_qmp

    ns, ns_path = netns
    mvt, _mac, node = make_macvtap(ns, ns_path, "vramvt1", "vralow1", "vrapeer1")
    sock = str(tmp_path / "qmp.sock")
    fd = os.open(node, os.O_RDWR)
    try:
        q = Qemu(ns, None, tmp_path, pass_fds=(fd,), net_args=[
            "-qmp", f"unix:{sock},server=on,wait=off",
            # named NIC, tap opened by QEMU
            "-netdev", "tap,id=hn0,ifname=vratapA,script=no,downscript=no",
            "-device", "virtio-net-pci,netdev=hn0,id=netA",
            # anonymous NIC, macvtap passed by fd (as libvirt does)
            "-netdev", f"tap,id=hn1,fd={fd}", "-device", "virtio-net-pci,netdev=hn1",
            # a NIC without a backend
            "-device", "virtio-net-pci,id=netC",
        ])
        qemus.append(q)
    finally:
        os.close(fd)
    q.wait_for_exe()
    wait_qmp(sock, q.proc)
    with qmp.QmpClient.connect(sock) as client:
        nics = {n.virtio_path: n for n in nic_backends(client)}
        info = client.execute("human-monitor-command", {"command-line": "info network"})
    print("\n" + info)
    assert set(parse_info_network(info)) == {"hn0", "hn1"}
    taps = TapMap().taps_of(q.pid)
    assert sorted(t.ifname for t in taps) == ["vramvt1", "vratapA"]

    named = nics["/machine/peripheral/netA/virtio-backend"]
    assert [t.ifname for t in named.taps(taps)] == ["vratapA"]
    assert named.netdev.ifname == "vratapA" and named.netdev.fds == ()
    no_backend = nics["/machine/peripheral/netC/virtio-backend"]
    assert no_backend.netdev is None and no_backend.taps(taps) == []
    [anon] = [n for p, n in nics.items() if "peripheral-anon" in p]
    [mapped] = anon.taps(taps)
    assert (mapped.ifname, mapped.ifindex, mapped.kind) == ("vramvt1", mvt, "macvtap")
    assert anon.netdev.fds == (mapped.fd,)   # QEMU's fd number, as /proc shows it
    assert len(nics) == 3


def test_link_watcher_recovers_from_a_socket_overrun(netns):
    from agent.net.backend import open_iproute

    ns, ns_path = netns
    # the smallest receive buffer the kernel allows: a burst of link events overruns it
    with LinkWatcher(ns_path, rcvbuf=1) as watcher:
        with open_iproute(ns_path) as ipr:
            for i in range(10):
                ipr.link("add", ifname=f"vrao{i}", kind="veth", peer=f"vrap{i}")
        events = []
        for _ in range(20):
            events += watcher.poll()
        assert watcher.overruns >= 1
        added = {e.link.ifname for e in events if e.action == LinkAction.ADDED}
        assert len(added) == 20 and any(e.resync for e in events)
        # the table was re-read: it is right even though notifications were lost
        names = {link.ifname for link in watcher.links.values()}
        assert names == {"lo"} | {f"vrao{i}" for i in range(10)} | {f"vrap{i}" for i in range(10)}
        # a burst of additions and removals, overrun again: no removed link comes back from
        # notifications the kernel still held when it reported the overrun
        overruns = watcher.overruns
        with open_iproute(ns_path) as ipr:
            for i in range(10, 15):
                ipr.link("add", ifname=f"vrao{i}", kind="veth", peer=f"vrap{i}")
            for i in range(0, 15, 2):
                ipr.link("del", ifname=f"vrao{i}")      # its peer goes with it
        for _ in range(20):
            watcher.poll()
        assert watcher.overruns > overruns
        names = {link.ifname for link in watcher.links.values()}
        kept = [i for i in range(15) if i % 2]
        assert names == {"lo"} | {f"vrao{i}" for i in kept} | {f"vrap{i}" for i in kept}
