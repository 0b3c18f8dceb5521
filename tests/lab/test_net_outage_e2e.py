"""End to end: the agent (BPF on KVM) measures what a virtio-net NEEDS_RESET cost the host side.

A lab guest (lab/harness.py) drives a virtio-rng and a modern virtio-net-pci whose backend is a
tap in a network namespace this test creates (QEMU runs inside it). The guest's fault moves the
RX ring's avail index; the first frame sent toward the guest makes QEMU pop the ring, which
calls virtio_error(): NEEDS_RESET. The guest notices it later (it polls), waits `delay_ms`,
resets and re-initialises. Meanwhile frames are sent toward the guest on the tap; nothing
drains the tap, its ring fills and the kernel drops the rest (tx_dropped).

The agent's figures (episode log `net`, /metrics) are compared with the tap's sysfs counters,
read independently: before the trigger frame (S0), once the agent says it is metering (S1),
after the burst (S2), and after the agent logged the episode (S3). Frames are only sent in
[trigger, S2], so the kernel guarantees: agent tx_dropped == S2-S1 == S3-S0 (a frame can only be
dropped when it is sent), rx_* == 0 (the guest sends nothing), and tx_packets between the
S2-S1 and S3-S0 differences. All frames go to the namespace's own tap; nothing is routed.
"""
from __future__ import annotations

import os
import socket
import subprocess
import time
import uuid

import pytest

from tests.lab.scrape import samples, wait_until

pytestmark = pytest.mark.kvm

TAP = "vraout0"
GUEST_MAC = "52:54:00:12:34:66"
TAP_NIC_ARGS = ("-netdev", f"tap,id=n0,ifname={TAP},script=no,downscript=no",
                "-device", f"virtio-net-pci,id=net0,netdev=n0,romfile=,disable-legacy=on,"
                           f"mac={GUEST_MAC}")
ETHERTYPE_EXPERIMENTAL = b"\x88\xb5"      # IEEE 802 local experimental ethertype
SO_SNDBUFFORCE = 32
SYSFS_FIELDS = ("rx_packets", "rx_bytes", "rx_dropped", "rx_errors",
                "tx_packets", "tx_bytes", "tx_dropped", "tx_errors")
DELAY_MS = 2000


@pytest.fixture
def agent(bpf, kvm):
    from agent.demo import AgentProcess

    with AgentProcess(stuck_after_s=60) as a:
        yield a


def sysfs(ns: str, ifname: str = TAP) -> dict[str, int]:
    out = subprocess.run(["ip", "netns", "exec", ns, "grep", "-H", ".",
                          *[f"/sys/class/net/{ifname}/statistics/{f}" for f in SYSFS_FIELDS]],
                         check=True, capture_output=True, text=True).stdout
    return {line.split(":")[0].rsplit("/", 1)[1]: int(line.split(":")[1])
            for line in out.splitlines()}


def settled(ns: str, ifname: str = TAP) -> dict[str, int]:
    """Two equal reads in a row: frames in flight have been counted."""
    last = sysfs(ns, ifname)
    for _ in range(100):
        time.sleep(0.05)
        cur = sysfs(ns, ifname)
        if cur == last:
            return cur
        last = cur
    raise AssertionError("tap counters did not settle")


def delta(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
    return {k: b[k] - a[k] for k in SYSFS_FIELDS}


def frame(size: int = 200, dst: str = GUEST_MAC) -> bytes:
    return (bytes.fromhex(dst.replace(":", "")) + bytes.fromhex("020000000001")
            + ETHERTYPE_EXPERIMENTAL + b"\x5a" * (size - 14))


def qemu_in_netns(ns: str, tmp_path, monkeypatch) -> None:
    """The lab starts QEMU inside namespace `ns`: `ip netns exec` execs it, so the pid stays
    QEMU's."""
    wrapper = tmp_path / "qemu-in-netns"
    wrapper.write_text(f'#!/bin/sh\nexec ip netns exec {ns} qemu-system-x86_64 "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.setenv("VRA_QEMU", str(wrapper))


def link_up_and_fault(vm, ns_path: str) -> None:
    """Set the tap up, wait until the guest's devices are at DRIVER_OK (it faults them right
    after printing their lines), and send the one frame that makes QEMU pop the broken RX ring."""
    from pyroute2 import netns as pr_netns

    from agent.net.backend import open_iproute

    with open_iproute(ns_path) as ipr:
        ipr.link("set", index=ipr.link_lookup(ifname=TAP)[0], state="up")
    wait_until("the guest's device lines",
               lambda: "VRA dev idx=1" in vm.serial_text(), timeout_s=20)
    with pr_netns.create_socket(ns_path, socket.AF_PACKET, socket.SOCK_RAW, 0, flags=0) as sock:
        sock.bind((TAP, 0))
        sock.send(frame())                    # the fault


def test_agent_reports_the_frames_the_tap_dropped_during_a_virtio_net_outage(
        netns, agent, tmp_path, monkeypatch):
    from pyroute2 import netns as pr_netns

    from agent.net.backend import TapMap, open_iproute
    from lab.harness import GuestSpec, LabVM

    ns, ns_path = netns
    qemu_in_netns(ns, tmp_path, monkeypatch)
    name = f"net-outage-{uuid.uuid4().hex[:6]}"
    spec = GuestSpec(
        transport="modern", scenario="recover", repeat=2, delay_ms=DELAY_MS, detect_ms=10000,
        start_delay_ms=1000, qmp=True,
        extra_args=("-name", name, *TAP_NIC_ARGS))
    with LabVM.start(spec) as vm:
        taps = wait_until("QEMU's tap", lambda: TapMap().taps_of(vm.pid))
        assert [(t.ifname, t.kind) for t in taps] == [(TAP, "tap")]
        with open_iproute(ns_path) as ipr:
            ipr.link("set", index=ipr.link_lookup(ifname=TAP)[0], state="up")
        qlen = int(subprocess.run(["ip", "netns", "exec", ns, "cat",
                                   f"/sys/class/net/{TAP}/tx_queue_len"],
                                  check=True, capture_output=True, text=True).stdout)
        # both devices at DRIVER_OK; the guest faults them right after printing these lines
        wait_until("the guest's device lines",
                   lambda: "VRA dev idx=1" in vm.serial_text(), timeout_s=20)
        sock = pr_netns.create_socket(ns_path, socket.AF_PACKET, socket.SOCK_RAW, 0, flags=0)
        with sock:
            sock.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, 64 << 20)
            sock.bind((TAP, 0))
            s0 = settled(ns)
            data = frame()
            sock.send(data)                       # the trigger: QEMU pops the broken RX ring
            try:
                wait_until("the agent metering the episode", lambda: any(
                    v == 1 for _, v in samples(agent.metrics_text(),
                                               "virtio_agent_net_outage_open")),
                    timeout_s=DELAY_MS / 1000 + 10)
            except AssertionError:
                print(vm.serial_text(), agent.records(), agent.stderr_tail(30),
                      [line for line in agent.metrics_text().splitlines()
                       if "net_outage" in line or f'vm="{name}"' in line], sep="\n")
                raise
            s1 = settled(ns)
            sent = 3 * qlen
            for _ in range(sent):
                assert sock.send(data, socket.MSG_DONTWAIT) == len(data)
            s2 = settled(ns)
        # nothing is sent from here on
        net_records = wait_until("the agent's record of the net episode", lambda: [
            r for r in agent.records() if r["vm"] == name and "net" in r], timeout_s=15)
        s3 = sysfs(ns)
        result = vm.wait(30).raise_for_error()
    text = agent.metrics_text()
    records = [r for r in agent.records() if r["vm"] == name]

    first = net_records[0]
    net = first["net"]
    print(f"\nagent: {net}\nsysfs S1->S2 {delta(s1, s2)}\nsysfs S0->S3 {delta(s0, s3)}"
          f"\nsent {sent} + 1 trigger, qlen {qlen}; guest episodes {len(result.episodes)}")
    assert first["outcome"] == "recovered"
    assert net["measured"] is True and net["attribution"] == "qmp", net
    [iface] = net["interfaces"]
    assert iface["ifname"] == TAP and iface["kind"] == "tap"
    # exact relations: drops happen only while frames are sent, i.e. inside [S1, S2]
    assert iface["tx_dropped"] == delta(s1, s2)["tx_dropped"] == delta(s0, s3)["tx_dropped"]
    assert iface["dropped_toward_guest"] == net["dropped_packets"] == iface["tx_dropped"]
    # the ring holds at most qlen frames; QEMU (device broken) reads none of the burst
    assert sent - qlen <= iface["tx_dropped"] <= sent
    assert delta(s1, s2)["tx_packets"] <= iface["tx_packets"] <= delta(s0, s3)["tx_packets"]
    assert delta(s1, s2)["tx_bytes"] <= iface["tx_bytes"] <= delta(s0, s3)["tx_bytes"]
    for f in ("rx_packets", "rx_bytes", "rx_dropped", "rx_errors"):
        assert iface[f] == 0 == delta(s0, s3)[f], f     # the guest sent nothing
    assert 0 < iface["seconds"] < first["recovery_seconds"] + 1

    # the episode of the virtio-rng next to it is not a network outage: no `net` in its log
    devices = {r["device"] for r in records}
    net_device = first["device"]
    assert len(devices) == 2, records
    assert all("net" not in r for r in records if r["device"] != net_device)
    # a later episode of the same device is measured too (nothing sent: 0 drops), unless QEMU
    # exited before the agent's end snapshot: then the tap is gone, which is said, not zeroed
    for r in net_records[1:]:
        assert r["net"] in ({"measured": False, "reason": "gone"},) or (
            r["net"]["measured"] and r["net"]["dropped_packets"] == 0), r

    # /metrics: the same figure, per device and interface; the info series names the tap
    dev = dict(vm=name, device=net_device, ifname=TAP)
    [(_, dropped)] = samples(text, "virtio_net_outage_dropped_packets_total", **dev) or [
        ({}, None)]
    if dropped is not None:      # the series goes with the VM; scrape raced its exit
        assert dropped == sum(r["net"].get("dropped_packets", 0) for r in net_records)
    assert samples(text, "virtio_net_outage_episode_dropped_packets_count")[0][1] >= 1
    assert samples(text, "virtio_agent_net_outage_unmeasured_total", reason="unmatched") == [
        ({"reason": "unmatched"}, 0.0)]
    assert agent.errors_logged() == []


def test_device_info_names_the_backend_interface_while_the_vm_runs(netns, agent, tmp_path,
                                                                  monkeypatch):
    from lab.harness import GuestSpec, LabVM

    ns, ns_path = netns
    qemu_in_netns(ns, tmp_path, monkeypatch)
    name = f"net-info-{uuid.uuid4().hex[:6]}"
    spec = GuestSpec(
        transport="modern", scenario="stuck", hold_ms=8000, detect_ms=10000, qmp=True,
        extra_args=("-name", name, *TAP_NIC_ARGS))
    with LabVM.start(spec) as vm:
        wait_until("the tap", lambda: os.path.exists(f"/proc/{vm.pid}") and subprocess.run(
            ["ip", "netns", "exec", ns, "test", "-e", f"/sys/class/net/{TAP}"]).returncode == 0)
        link_up_and_fault(vm, ns_path)
        info = wait_until("virtio_device_info with the tap", lambda: samples(
            agent.metrics_text(), "virtio_device_info", vm=name, ifname=TAP), timeout_s=10)
        # one ifname per device: only the net device has one, the rng's is empty
        everything = samples(agent.metrics_text(), "virtio_device_info", vm=name)
        assert len(info) == 1 and len(everything) == 2, everything
        assert sorted(labels["ifname"] for labels, _ in everything) == ["", TAP]
        vm.kill()


def test_without_qmp_the_enumerated_nic_is_told_from_the_rng(netns, agent, tmp_path,
                                                            monkeypatch):
    """No QMP socket: the agent still knows which device is the NIC, from the guest's own PCI
    enumeration (device ids), so the rng's episode gets no network measurement and the NIC's
    is measured on the VM's only tap; nothing is counted as unmatched."""
    from lab.harness import GuestSpec, LabVM

    ns, ns_path = netns
    qemu_in_netns(ns, tmp_path, monkeypatch)
    name = f"net-noqmp-{uuid.uuid4().hex[:6]}"
    spec = GuestSpec(
        transport="modern", scenario="recover", delay_ms=300, detect_ms=10000,
        extra_args=("-name", name, *TAP_NIC_ARGS))
    before = samples(agent.metrics_text(), "virtio_agent_net_outage_unmeasured_total",
                     reason="unmatched")[0][1]
    with LabVM.start(spec) as vm:
        wait_until("the tap", lambda: subprocess.run(
            ["ip", "netns", "exec", ns, "test", "-e", f"/sys/class/net/{TAP}"]).returncode == 0)
        link_up_and_fault(vm, ns_path)
        vm.wait(30).raise_for_error()
    records = wait_until("both episodes logged", lambda: len(
        [r for r in agent.records() if r["vm"] == name]) == 2 and
        [r for r in agent.records() if r["vm"] == name])
    by_type = {r["type"]: r for r in records}
    assert set(by_type) == {"rng", "net"}, records
    assert "net" not in by_type["rng"], by_type["rng"]
    net = by_type["net"]["net"]
    # attributed to the only tap (single-tap rule); this guest exits right after its recovery,
    # which may remove the tap before the end snapshot is taken ("gone")
    assert (net["measured"] and net["attribution"] == "single_tap"
            and [i["ifname"] for i in net["interfaces"]] == [TAP]) or \
        net == {"measured": False, "reason": "gone"}, net
    after = samples(agent.metrics_text(), "virtio_agent_net_outage_unmeasured_total",
                    reason="unmatched")[0][1]
    assert after == before
    # the rng's episode makes no series; the NIC's has one, on the tap, when it was measured
    # (kept while the exited VM's devices are: retain_exited_ns)
    series = samples(agent.metrics_text(), "virtio_net_outage_dropped_packets_total", vm=name)
    if net["measured"]:
        assert series == [({"vm": name, "namespace": "", "device": by_type["net"]["device"],
                            "ifname": TAP}, float(net["dropped_packets"]))], series
    else:
        assert series == [], series


def test_a_macvtap_passed_by_fd_is_attributed_over_qmp_and_its_drops_reported(
        netns, agent, tmp_path, monkeypatch):
    """libvirt's `type='direct'`: a macvtap on a veth, opened by the caller and passed to QEMU
    as `-netdev tap,fd=N`. Frames enter through the veth peer; macvlan counts each in rx_packets,
    a full queue counts the drop in rx_dropped (= rx_errors)."""
    from pyroute2 import netns as pr_netns

    from agent.net.backend import open_iproute
    from lab.harness import GuestSpec, LabVM

    ns, ns_path = netns
    mvt_name, lower, peer = "vraoutm0", "vraoutl0", "vraoutp0"
    with open_iproute(ns_path) as ipr:
        ipr.link("add", ifname=lower, kind="veth", peer=peer)
        ipr.link("add", ifname=mvt_name, kind="macvtap",
                 link=ipr.link_lookup(ifname=lower)[0], macvlan_mode="bridge")
        mvt = ipr.link_lookup(ifname=mvt_name)[0]
        mvt_mac = ipr.get_links(mvt)[0].get_attr("IFLA_ADDRESS")
        for name_ in (lower, peer, mvt_name):
            ipr.link("set", index=ipr.link_lookup(ifname=name_)[0], state="up")
    node = f"/dev/tap{mvt}"
    dev = subprocess.run(["ip", "netns", "exec", ns, "cat",
                          f"/sys/class/net/{mvt_name}/tap{mvt}/dev"],
                         check=True, capture_output=True, text=True).stdout.strip()
    wait_until(node, lambda: os.path.exists(node), timeout_s=5)
    major, minor = (int(x) for x in dev.split(":"))
    assert os.stat(node).st_rdev == os.makedev(major, minor), f"{node} is not {mvt_name}'s"
    # the wrapper opens the macvtap as fd 3 and QEMU inherits it (as libvirt passes it)
    wrapper = tmp_path / "qemu-in-netns"
    wrapper.write_text(f'#!/bin/sh\nexec 3<>{node}\n'
                       f'exec ip netns exec {ns} qemu-system-x86_64 "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.setenv("VRA_QEMU", str(wrapper))
    name = f"net-mvt-{uuid.uuid4().hex[:6]}"
    spec = GuestSpec(
        transport="modern", scenario="recover", delay_ms=DELAY_MS, detect_ms=10000,
        start_delay_ms=1000, qmp=True,
        extra_args=("-name", name, "-netdev", "tap,id=n0,fd=3",
                    "-device", "virtio-net-pci,id=net0,netdev=n0,romfile=,disable-legacy=on"))
    qlen = int(subprocess.run(["ip", "netns", "exec", ns, "cat",
                               f"/sys/class/net/{mvt_name}/tx_queue_len"],
                              check=True, capture_output=True, text=True).stdout)
    with LabVM.start(spec) as vm:
        wait_until("the guest's device lines",
                   lambda: "VRA dev idx=1" in vm.serial_text(), timeout_s=20)
        with pr_netns.create_socket(ns_path, socket.AF_PACKET, socket.SOCK_RAW, 0,
                                    flags=0) as sock:
            sock.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, 64 << 20)
            sock.bind((peer, 0))
            data = frame(dst=mvt_mac)
            s0 = settled(ns, mvt_name)
            sock.send(data)                       # the trigger
            wait_until("the agent metering the episode", lambda: any(
                v == 1 for _, v in samples(agent.metrics_text(),
                                           "virtio_agent_net_outage_open")),
                timeout_s=DELAY_MS / 1000 + 10)
            s1 = settled(ns, mvt_name)
            sent = 3 * qlen
            for _ in range(sent):
                assert sock.send(data, socket.MSG_DONTWAIT) == len(data)
            s2 = settled(ns, mvt_name)
        [first] = wait_until("the agent's record of the net episode", lambda: [
            r for r in agent.records() if r["vm"] == name and "net" in r], timeout_s=15)
        s3 = sysfs(ns, mvt_name)
        vm.wait(30).raise_for_error()
    net = first["net"]
    print(f"\nagent: {net}\nsysfs S1->S2 {delta(s1, s2)}\nsysfs S0->S3 {delta(s0, s3)}"
          f"\nsent {sent} + 1 trigger, qlen {qlen}")
    assert net["measured"] is True and net["attribution"] == "qmp", net
    [iface] = net["interfaces"]
    assert (iface["ifname"], iface["kind"]) == (mvt_name, "macvtap")
    # every frame of the burst, and only those, reached the macvtap inside the window
    assert iface["rx_packets"] == delta(s1, s2)["rx_packets"] == sent
    assert iface["rx_dropped"] == delta(s1, s2)["rx_dropped"] == delta(s0, s3)["rx_dropped"]
    assert iface["rx_errors"] == iface["rx_dropped"] == iface["dropped_toward_guest"]
    assert sent - qlen <= iface["rx_dropped"] <= sent
    assert iface["tx_packets"] == 0 == delta(s0, s3)["tx_packets"]    # the guest sent nothing
