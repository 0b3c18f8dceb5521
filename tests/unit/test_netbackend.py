"""agent.net.backend on fixture /proc trees and hand-made snapshots (no root, no netlink)."""
from __future__ import annotations

import dataclasses
import os
import socket

import pytest

from agent.net.backend import (
    LinkInfo,
    LinkStats,
    LinkTable,
    TapMap,
    diff,
    link_info_from_msg,
    parse_fdinfo_iff,
)

# /proc/PID/fdinfo of a /dev/net/tun fd as kernel 6.18 prints it (captured on the lab VM)
FDINFO_ATTACHED = "pos:\t0\nflags:\t02100002\nmnt_id:\t24\nino:\t105\niff:\t{name}\n"
FDINFO_DETACHED = "pos:\t0\nflags:\t02100002\nmnt_id:\t24\nino:\t105\niff:\t\n"
FDINFO_PLAIN = "pos:\t0\nflags:\t02100002\nmnt_id:\t15\nino:\t1059\n"

LINKS = LinkTable([
    LinkInfo(1, "lo", ""),
    LinkInfo(5, "vnet0", "tap"),
    LinkInfo(6, "vnet1", "tap"),
    LinkInfo(7, "macvtap0", "macvtap"),
    LinkInfo(9, "ipvtap0", "ipvtap"),
    LinkInfo(11, "tun0", "tun"),
])


def make_proc(root, pid: int, fds: dict[int, tuple[str, str]]) -> None:
    """fds: fd -> (symlink target, fdinfo text)."""
    fd_dir = root / str(pid) / "fd"
    info_dir = root / str(pid) / "fdinfo"
    fd_dir.mkdir(parents=True)
    info_dir.mkdir()
    for fd, (target, info) in fds.items():
        os.symlink(target, fd_dir / str(fd))
        (info_dir / str(fd)).write_text(info)


def tapmap(root, links=LINKS):
    calls = []

    def table(pid):
        calls.append(pid)
        return links
    m = TapMap(proc_root=str(root), links=table)
    return m, calls


def test_tun_fd_resolves_by_name_and_other_fds_are_ignored(tmp_path):
    make_proc(tmp_path, 4242, {
        0: ("/dev/null", FDINFO_PLAIN),
        3: ("anon_inode:kvm-vcpu:0", FDINFO_PLAIN),
        7: ("socket:[12345]", FDINFO_PLAIN),
        12: ("/dev/net/tun", FDINFO_ATTACHED.format(name="vnet0")),
        14: ("/dev/kvm", FDINFO_PLAIN),
    })
    m, calls = tapmap(tmp_path)
    taps = m.taps_of(4242)
    assert [(t.ifname, t.ifindex, t.kind, t.fd, t.device) for t in taps] == [
        ("vnet0", 5, "tap", 12, "/dev/net/tun")]
    assert taps[0].resolved
    assert calls == [4242]


def test_macvtap_and_ipvtap_resolve_by_index_from_device_name(tmp_path):
    make_proc(tmp_path, 10, {
        21: ("/dev/tap7", FDINFO_PLAIN),
        22: ("/dev/tap9", FDINFO_PLAIN),          # ipvtap names its node tapN as well
        23: ("/dev/tapx", FDINFO_PLAIN),        # not a tapN node
    })
    m, _ = tapmap(tmp_path)
    assert [(t.ifname, t.ifindex, t.kind, t.fd) for t in m.taps_of(10)] == [
        ("macvtap0", 7, "macvtap", 21), ("ipvtap0", 9, "ipvtap", 22)]


def test_multiqueue_tap_shows_once_per_fd_sorted_by_fd(tmp_path):
    make_proc(tmp_path, 10, {
        40: ("/dev/net/tun", FDINFO_ATTACHED.format(name="vnet1")),
        8: ("/dev/net/tun", FDINFO_ATTACHED.format(name="vnet1")),
        9: ("/dev/net/tun", FDINFO_ATTACHED.format(name="vnet0")),
    })
    m, _ = tapmap(tmp_path)
    assert [(t.fd, t.ifname, t.ifindex) for t in m.taps_of(10)] == [
        (8, "vnet1", 6), (9, "vnet0", 5), (40, "vnet1", 6)]


def test_detached_and_unnamed_tun_fds_are_counted_not_returned(tmp_path):
    make_proc(tmp_path, 10, {
        3: ("/dev/net/tun", FDINFO_DETACHED),
        4: ("/dev/net/tun", FDINFO_PLAIN),       # no iff: line at all
        5: ("/dev/net/tun", FDINFO_DETACHED),
    })
    m, calls = tapmap(tmp_path)
    assert m.taps_of(10) == []
    assert (m.detached, m.no_iff_line, m.unresolved) == (2, 1, 0)
    assert calls == []          # no tap fd: the namespace's links are not even read


def test_unresolved_backends_are_returned_and_counted(tmp_path):
    make_proc(tmp_path, 10, {
        3: ("/dev/net/tun", FDINFO_ATTACHED.format(name="gone0")),
        4: ("/dev/tap99", FDINFO_PLAIN),
    })
    m, _ = tapmap(tmp_path)
    taps = m.taps_of(10)
    assert [(t.ifname, t.ifindex, t.kind, t.resolved) for t in taps] == [
        ("gone0", None, "unresolved", False), ("", None, "unresolved", False)]
    assert m.unresolved == 2


def test_missing_process_raises(tmp_path):
    m, _ = tapmap(tmp_path)
    with pytest.raises(FileNotFoundError):
        m.taps_of(31337)


def test_fd_closed_between_listing_and_fdinfo_is_counted(tmp_path):
    make_proc(tmp_path, 10, {3: ("/dev/net/tun", FDINFO_ATTACHED.format(name="vnet0"))})
    (tmp_path / "10" / "fdinfo" / "3").unlink()
    m, _ = tapmap(tmp_path)
    assert m.taps_of(10) == []
    assert m.vanished_fds == 1


def test_parse_fdinfo_iff():
    assert parse_fdinfo_iff(FDINFO_ATTACHED.format(name="vnet0")) == "vnet0"
    assert parse_fdinfo_iff(FDINFO_DETACHED) == ""
    assert parse_fdinfo_iff(FDINFO_PLAIN) is None
    with pytest.raises(ValueError):
        parse_fdinfo_iff(FDINFO_ATTACHED.format(name="x" * 16))


def test_link_table_rejects_bad_links():
    for bad in (LinkInfo(0, "a", ""), LinkInfo(3, "", "tap"), LinkInfo(3, "y" * 16, "tap")):
        with pytest.raises(ValueError):
            LinkTable([bad])


def _encoded_newlink(index: int, name: str, kind: str, tun_type: int | None):
    """An RTM_NEWLINK encoded and decoded with pyroute2's own marshal (as the kernel sends it)."""
    from pyroute2.netlink.rtnl import RTM_NEWLINK
    from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg
    from pyroute2.netlink.rtnl.marshal import MarshalRtnl

    msg = ifinfmsg()
    msg["header"]["type"] = RTM_NEWLINK
    msg["family"] = socket.AF_UNSPEC
    msg["index"] = index
    info = {"attrs": [("IFLA_INFO_KIND", kind)]}
    if tun_type is not None:
        info["attrs"].append(("IFLA_INFO_DATA", {"attrs": [("IFLA_TUN_TYPE", tun_type)]}))
    msg["attrs"] = [("IFLA_IFNAME", name), ("IFLA_LINKINFO", info)]
    msg.encode()
    return next(iter(MarshalRtnl().parse(bytes(msg.data))))


@pytest.mark.parametrize("kind,tun_type,expected", [
    ("tun", 2, "tap"), ("tun", 1, "tun"), ("macvtap", None, "macvtap"), ("veth", None, "veth")])
def test_link_info_from_netlink_message(kind, tun_type, expected):
    msg = _encoded_newlink(12, "vnet7", kind, tun_type)
    assert link_info_from_msg(msg) == LinkInfo(12, "vnet7", expected)


def snap(ts_ns=0, **kw) -> LinkStats:
    base = dict(ifindex=5, ifname="vnet0", kind="tap", taken_ns=ts_ns, rx_packets=10,
                rx_bytes=1000, rx_dropped=0, rx_errors=0, tx_packets=20, tx_bytes=2000,
                tx_dropped=3, tx_errors=0)
    base.update(kw)
    return LinkStats(**base)


def test_diff_is_the_counter_difference_over_the_episode():
    before = snap(ts_ns=1_000_000_000)
    after = snap(ts_ns=3_500_000_000, tx_dropped=503, tx_packets=25, tx_bytes=2600,
                 rx_packets=11, rx_bytes=1100)
    impact = diff(before, after)
    assert (impact.ifname, impact.ifindex, impact.kind) == ("vnet0", 5, "tap")
    assert impact.seconds == pytest.approx(2.5)
    assert (impact.tx_dropped, impact.tx_packets, impact.tx_bytes) == (500, 5, 600)
    assert (impact.rx_packets, impact.rx_bytes, impact.rx_dropped, impact.rx_errors) == (1, 100, 0, 0)
    assert impact.toward_guest_dropped == 500


def test_toward_guest_side_depends_on_the_backend_kind():
    before = snap(kind="macvtap")
    after = snap(kind="macvtap", rx_dropped=40, rx_packets=12, tx_dropped=3)
    impact = diff(before, after)
    assert impact.toward_guest_dropped == 40
    assert diff(snap(kind="veth"), snap(kind="veth")).toward_guest_dropped is None


@pytest.mark.parametrize("before,after", [
    (snap(), snap(ifindex=6)),                        # another interface
    (snap(ts_ns=10), snap(ts_ns=5)),                 # time reversed
    (snap(), snap(tx_dropped=2)),                     # counter went backwards
])
def test_diff_rejects_inconsistent_snapshots(before, after):
    with pytest.raises(ValueError):
        diff(before, after)


def test_outage_impact_is_a_plain_dataclass():
    impact = diff(snap(), snap(ts_ns=1))
    assert set(dataclasses.asdict(impact)) >= {"ifname", "tx_dropped", "tx_packets", "tx_bytes",
                                               "rx_packets", "rx_bytes"}


# HMP `info network` of QEMU 7.2 (captured on the lab VM): a named NIC with a tap QEMU opened,
# a two-queue tap, a macvtap passed by fd, a user-mode netdev and a NIC without a backend.
INFO_NETWORK = """\
netA: index=0,type=nic,model=virtio-net-pci,macaddr=52:54:00:12:34:56
 \\ hn0: index=0,type=tap,ifname=vratapA,script=no,downscript=no
net1: index=0,type=nic,model=virtio-net-pci,macaddr=52:54:00:aa:bb:cc
 \\ hostnet1: index=0,type=tap,ifname=vrainfo1,script=no,downscript=no
net1: index=1,type=nic,
 \\ hostnet1: index=1,type=tap,ifname=vrainfo1,script=no,downscript=no
virtio-net-pci.1: index=0,type=nic,model=virtio-net-pci,macaddr=52:54:00:12:34:57
 \\ hn1: index=0,type=tap,fd=5
virtio-net-pci.3: index=0,type=nic,model=virtio-net-pci,macaddr=52:54:00:12:34:59
 \\ u0: index=0,type=user,net=10.0.2.0,restrict=off
netC: index=0,type=nic,model=virtio-net-pci,macaddr=52:54:00:12:34:58
"""


def test_parse_info_network():
    from agent.net.backend import Netdev, parse_info_network

    assert parse_info_network(INFO_NETWORK) == {
        "hn0": Netdev("hn0", "tap", "vratapA", ()),
        "hostnet1": Netdev("hostnet1", "tap", "vrainfo1", ()),
        "hn1": Netdev("hn1", "tap", "", (5,)),
        "u0": Netdev("u0", "user", "", ()),
    }
    with pytest.raises(ValueError):
        parse_info_network(" \\ hn1: index=0,type=tap,fd=x\n")


def test_nic_backend_selects_its_taps_by_name_or_by_fd():
    from agent.net.backend import NicBackend, TapBackend, parse_info_network

    nd = parse_info_network(INFO_NETWORK)
    taps = [TapBackend("vratapA", 5, "tap", 9, "/dev/net/tun"),
            TapBackend("vrainfo1", 6, "tap", 10, "/dev/net/tun"),
            TapBackend("vrainfo1", 6, "tap", 11, "/dev/net/tun"),
            TapBackend("macvtap0", 7, "macvtap", 5, "/dev/tap7")]
    assert [t.fd for t in NicBackend("p", nd["hn0"]).taps(taps)] == [9]
    assert [t.fd for t in NicBackend("p", nd["hostnet1"]).taps(taps)] == [10, 11]
    assert [t.ifname for t in NicBackend("p", nd["hn1"]).taps(taps)] == ["macvtap0"]
    assert NicBackend("p", nd["u0"]).taps(taps) == []
    assert NicBackend("p", None).taps(taps) == []
