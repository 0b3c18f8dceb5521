"""Host network backends of a VM's virtio-net devices, and what an outage cost them.

A VMM process holds its tap backends as open file descriptors:

* a tun/tap interface: an fd on /dev/net/tun; the kernel prints the interface name as the
  `iff:` line of /proc/PID/fdinfo/FD (tun_chr_show_fdinfo; empty when the queue is detached);
* a macvtap/ipvtap interface: an fd on the character device /dev/tapN, where N is the
  interface's ifindex.

`TapMap` parses /proc (injectable root, for fixtures) and resolves names/indexes against the
links of the VMM's network namespace (`LinkTable`, read over rtnetlink with pyroute2).
`LinkStatsReader.snapshot()` reads IFLA_STATS64 of one interface; `diff()` of two snapshots
(taken at a NEEDS_RESET episode's start and end) is the episode's `OutageImpact`;
`OutageMeter` does both per episode. `nic_backends()` asks QEMU (QMP) which tap backs which
virtio-net device. See docs/network.md for what the counters mean and their limits.
"""
from __future__ import annotations

import errno
import os
import re
import time
from dataclasses import dataclass
from typing import Callable, Collection, Iterable, Optional

TUN_DEVICE = "/dev/net/tun"
_CHARDEV_TAP = re.compile(r"^/dev/tap(\d+)$")     # macvtap and ipvtap both name it tap<ifindex>
_IFF_LINE = re.compile(r"^iff:\t(.*)$", re.MULTILINE)
IFNAMSIZ = 16

# IFLA_TUN_TYPE values (IFF_TUN / IFF_TAP)
_TUN_TYPES = {1: "tun", 2: "tap"}


@dataclass(frozen=True, slots=True)
class LinkInfo:
    ifindex: int
    ifname: str
    kind: str        # "tap", "tun", "macvtap", "ipvtap", "veth", ... ; "" for a plain device


class LinkTable:
    """The links of one network namespace, by index and by name."""

    def __init__(self, links: Iterable[LinkInfo]):
        self._by_index: dict[int, LinkInfo] = {}
        self._by_name: dict[str, LinkInfo] = {}
        for link in links:
            if link.ifindex <= 0 or not link.ifname or len(link.ifname) >= IFNAMSIZ:
                raise ValueError(f"invalid link {link!r}")
            self._by_index[link.ifindex] = link
            self._by_name[link.ifname] = link

    def by_index(self, ifindex: int) -> Optional[LinkInfo]:
        return self._by_index.get(ifindex)

    def by_name(self, ifname: str) -> Optional[LinkInfo]:
        return self._by_name.get(ifname)

    def __len__(self) -> int:
        return len(self._by_index)


@dataclass(frozen=True, slots=True)
class TapBackend:
    ifname: str              # "" when a /dev/tapN fd could not be resolved
    ifindex: Optional[int]   # None when the name could not be resolved in the VMM's netns
    kind: str                # LinkInfo.kind when resolved; "unresolved" otherwise
    fd: int                  # the VMM's fd (a multiqueue tap shows once per queue fd)
    device: str              # /dev/net/tun or /dev/tapN

    @property
    def resolved(self) -> bool:
        return self.ifindex is not None


def link_info_from_msg(msg) -> LinkInfo:
    """LinkInfo from a pyroute2 ifinfmsg (RTM_NEWLINK/RTM_DELLINK or a dump entry)."""
    kind = ""
    linkinfo = msg.get_attr("IFLA_LINKINFO")
    if linkinfo is not None:
        kind = linkinfo.get_attr("IFLA_INFO_KIND") or ""
        if kind == "tun":
            data = linkinfo.get_attr("IFLA_INFO_DATA")
            tun_type = data.get_attr("IFLA_TUN_TYPE") if data is not None else None
            kind = _TUN_TYPES.get(tun_type, "tun")
    return LinkInfo(ifindex=msg["index"], ifname=msg.get_attr("IFLA_IFNAME") or "", kind=kind)


def netns_path_of(pid: int, proc_root: str = "/proc") -> Optional[str]:
    """The network namespace file of `pid`, or None when it is our own namespace."""
    path = os.path.join(proc_root, str(pid), "ns", "net")
    theirs = os.stat(path)
    ours = os.stat("/proc/self/ns/net")
    if (theirs.st_dev, theirs.st_ino) == (ours.st_dev, ours.st_ino):
        return None
    return path


def open_iproute(netns: Optional[str] = None):
    """A pyroute2 IPRoute for queries only (no multicast groups), in `netns` (a path) or ours."""
    from pyroute2 import IPRoute

    if netns is None:
        return IPRoute(groups=0)
    # flags=0: never create the namespace, fail if it is gone
    return IPRoute(netns=netns, flags=0, groups=0)


def read_links(netns: Optional[str] = None) -> LinkTable:
    with open_iproute(netns) as ipr:
        return LinkTable(link_info_from_msg(m) for m in ipr.get_links())


def parse_fdinfo_iff(text: str) -> Optional[str]:
    """The `iff:` value of a /dev/net/tun fdinfo: a name, "" if detached, None if absent."""
    m = _IFF_LINE.search(text)
    if m is None:
        return None
    name = m.group(1)
    if len(name) >= IFNAMSIZ:
        raise ValueError(f"fdinfo iff name too long: {name!r}")
    return name


class TapMap:
    """Finds the tap backends a VMM process holds.

    `links(pid)` returns the LinkTable of the process's network namespace; the default reads
    it over rtnetlink. Unit tests pass a table built from data.
    """

    def __init__(self, proc_root: str = "/proc",
                 links: Optional[Callable[[int], LinkTable]] = None):
        self.proc_root = proc_root
        self._links = links or (lambda pid: read_links(netns_path_of(pid, self.proc_root)))
        # counted, never silently dropped:
        self.detached = 0      # /dev/net/tun fds with an empty iff: (not attached / queue detached)
        self.no_iff_line = 0   # /dev/net/tun fdinfo without an iff: line (kernel too old?)
        self.vanished_fds = 0  # fds closed between listing and reading
        self.unresolved = 0    # backends whose name/index is not a link in the VMM's netns

    def taps_of(self, pid: int) -> list[TapBackend]:
        """Tap backends of `pid`, sorted by fd. Raises FileNotFoundError if the process is gone."""
        fd_dir = os.path.join(self.proc_root, str(pid), "fd")
        found: list[tuple[int, str, Optional[str], Optional[int]]] = []  # fd, device, name, index
        for entry in os.listdir(fd_dir):
            if not entry.isdigit():
                continue
            fd = int(entry)
            try:
                target = os.readlink(os.path.join(fd_dir, entry))
            except FileNotFoundError:
                self.vanished_fds += 1
                continue
            if target == TUN_DEVICE:
                try:
                    with open(os.path.join(self.proc_root, str(pid), "fdinfo", entry)) as f:
                        name = parse_fdinfo_iff(f.read())
                except FileNotFoundError:
                    self.vanished_fds += 1
                    continue
                if name is None:
                    self.no_iff_line += 1
                elif name == "":
                    self.detached += 1
                else:
                    found.append((fd, target, name, None))
                continue
            m = _CHARDEV_TAP.match(target)
            if m:
                found.append((fd, target, None, int(m.group(1))))
        if not found:
            return []
        table = self._links(pid)
        out = []
        for fd, device, name, index in sorted(found):
            link = table.by_name(name) if name is not None else table.by_index(index)
            if link is None:
                self.unresolved += 1
                out.append(TapBackend(ifname=name or "", ifindex=None, kind="unresolved",
                                      fd=fd, device=device))
            else:
                out.append(TapBackend(ifname=link.ifname, ifindex=link.ifindex, kind=link.kind,
                                      fd=fd, device=device))
        return out


_STAT_FIELDS = ("rx_packets", "rx_bytes", "rx_dropped", "rx_errors",
                "tx_packets", "tx_bytes", "tx_dropped", "tx_errors")


@dataclass(frozen=True, slots=True)
class LinkStats:
    """IFLA_STATS64 of one interface at `taken_ns` (CLOCK_MONOTONIC, like agent.events)."""

    ifindex: int
    ifname: str
    kind: str
    taken_ns: int
    rx_packets: int
    rx_bytes: int
    rx_dropped: int
    rx_errors: int
    tx_packets: int
    tx_bytes: int
    tx_dropped: int
    tx_errors: int


class LinkGone(Exception):
    """The interface no longer exists (the VM exited, the tap was deleted)."""


class LinkStatsReader:
    """Snapshots of link counters over rtnetlink, in one network namespace (a path) or ours."""

    def __init__(self, netns: Optional[str] = None):
        self._ipr = open_iproute(netns)

    def snapshot(self, ifindex: int) -> LinkStats:
        from pyroute2.netlink.exceptions import NetlinkError

        try:
            msgs = self._ipr.get_links(ifindex)
        except NetlinkError as exc:
            if exc.code == errno.ENODEV:
                raise LinkGone(f"no interface with index {ifindex}") from exc
            raise
        taken_ns = time.monotonic_ns()
        msg = msgs[0]
        stats = msg.get_attr("IFLA_STATS64")
        if stats is None:
            raise RuntimeError(f"interface {ifindex} reported no IFLA_STATS64")
        link = link_info_from_msg(msg)
        return LinkStats(ifindex=link.ifindex, ifname=link.ifname, kind=link.kind,
                         taken_ns=taken_ns, **{f: int(stats[f]) for f in _STAT_FIELDS})

    def close(self) -> None:
        self._ipr.close()

    def __enter__(self) -> "LinkStatsReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# Which side of an interface carries traffic toward the guest: a tun/tap transmits to its fd
# reader (the VMM); a macvtap/ipvtap receives from its lower device and queues for the fd.
_TOWARD_GUEST_IS_TX = {"tap": True, "tun": True, "macvtap": False, "ipvtap": False}


@dataclass(frozen=True, slots=True)
class OutageImpact:
    """Counter differences of one backend interface over an outage (see docs/network.md)."""

    ifname: str
    ifindex: int
    kind: str
    seconds: float
    tx_dropped: int
    tx_packets: int
    tx_bytes: int
    tx_errors: int
    rx_dropped: int
    rx_packets: int
    rx_bytes: int
    rx_errors: int

    @property
    def toward_guest_dropped(self) -> Optional[int]:
        """Frames the host could not queue toward the guest; None for an unknown kind.

        A tap counts them in tx_dropped (tun_net_xmit: ring full); a macvtap/ipvtap in
        rx_dropped (= rx_errors; macvlan has already counted the frame in rx_packets).
        """
        tx = _TOWARD_GUEST_IS_TX.get(self.kind)
        if tx is None:
            return None
        return self.tx_dropped if tx else self.rx_dropped


def diff(before: LinkStats, after: LinkStats) -> OutageImpact:
    if before.ifindex != after.ifindex:
        raise ValueError(f"snapshots of different interfaces: {before.ifindex} != {after.ifindex}")
    if after.taken_ns < before.taken_ns:
        raise ValueError("the 'after' snapshot was taken before the 'before' snapshot")
    deltas = {}
    for f in _STAT_FIELDS:
        d = getattr(after, f) - getattr(before, f)
        if d < 0:
            # 64-bit link counters do not go backwards for one live interface
            raise ValueError(f"{f} of {after.ifname} went backwards ({d})")
        deltas[f] = d
    return OutageImpact(ifname=after.ifname, ifindex=after.ifindex, kind=after.kind,
                        seconds=(after.taken_ns - before.taken_ns) / 1e9, **deltas)


class OutageMeter:
    """Network impact of virtio-net outages: snapshots of a VM's tap backends when an episode
    opens, differences when it ends.

    `start(key, pid)` resolves the taps of the VMM `pid` and snapshots them; `end(key)`
    snapshots them again and returns one OutageImpact per backend interface. `key` is the
    caller's episode identity (e.g. (vm.key, device, start_ns)). The VMM's network namespace is
    held open by fd from start to end, so a VM that exits meanwhile still resolves: its
    interfaces are then gone and counted in `gone`, never reported as zero impact.
    At most `max_open` episodes are tracked; a start beyond that is counted in `refused`.
    """

    def __init__(self, tapmap: Optional[TapMap] = None, max_open: int = 256):
        if max_open <= 0:
            raise ValueError("max_open must be positive")
        self.tapmap = tapmap or TapMap()
        self.max_open = max_open
        self._open: dict[object, tuple[int, list[LinkStats]]] = {}   # key -> (netns fd, before)
        self.refused = 0        # start() beyond max_open
        self.no_backend = 0     # start() for a process holding no resolvable tap
        self.gone = 0           # interfaces that vanished (or were replaced) before end()
        self.inconsistent = 0   # snapshots diff() rejected (counters went backwards)

    def __len__(self) -> int:
        return len(self._open)

    def start(self, key: object, pid: int, ifnames: Optional[Collection[str]] = None) -> int:
        """Snapshot the backends of `pid` for episode `key` (only those named in `ifnames`, e.g.
        the taps of the NIC in the episode, see NicBackend); returns how many were taken."""
        if key in self._open:
            raise ValueError(f"episode {key!r} already started")
        if len(self._open) >= self.max_open:
            self.refused += 1
            return 0
        backends = [b for b in self.tapmap.taps_of(pid)
                    if b.resolved and (ifnames is None or b.ifname in ifnames)]
        indexes = sorted({b.ifindex for b in backends})   # a multiqueue tap once
        if not indexes:
            self.no_backend += 1
            return 0
        ns_fd = os.open(os.path.join(self.tapmap.proc_root, str(pid), "ns", "net"), os.O_RDONLY)
        try:
            with LinkStatsReader(_netns_of_fd(ns_fd)) as reader:
                before = []
                for ifindex in indexes:
                    try:
                        before.append(reader.snapshot(ifindex))
                    except LinkGone:
                        self.gone += 1
        except BaseException:
            os.close(ns_fd)
            raise
        if not before:
            os.close(ns_fd)
            return 0
        self._open[key] = (ns_fd, before)
        return len(before)

    def end(self, key: object) -> list[OutageImpact]:
        """Impacts of episode `key` (empty if start() took no snapshot for it)."""
        entry = self._open.pop(key, None)
        if entry is None:
            return []
        ns_fd, before = entry
        out = []
        try:
            with LinkStatsReader(_netns_of_fd(ns_fd)) as reader:
                for b in before:
                    try:
                        after = reader.snapshot(b.ifindex)
                    except LinkGone:
                        self.gone += 1
                        continue
                    if after.kind != b.kind:     # the index now names another interface
                        self.gone += 1
                        continue
                    try:
                        out.append(diff(b, after))
                    except ValueError:
                        self.inconsistent += 1
        finally:
            os.close(ns_fd)
        return out

    def discard(self, key: object) -> None:
        entry = self._open.pop(key, None)
        if entry is not None:
            os.close(entry[0])

    def close(self) -> None:
        for key in list(self._open):
            self.discard(key)


def _netns_of_fd(fd: int) -> Optional[str]:
    """A path naming the namespace open as `fd` (None if it is our own)."""
    ours = os.stat("/proc/self/ns/net")
    st = os.fstat(fd)
    if (st.st_dev, st.st_ino) == (ours.st_dev, ours.st_ino):
        return None
    return f"/proc/self/fd/{fd}"


# --- which virtio-net device a tap backs (QMP) ---------------------------------------------------
#
# /proc says which taps a VMM holds, not which NIC each one backs. QEMU knows: the NIC's QOM
# object has a `netdev` property, and HMP `info network` prints each netdev's type and how the
# tap was given (ifname=NAME when QEMU opened it, fd=N when it was passed in, as libvirt does).

_INFO_PEER = re.compile(r"^ \\ ([^:]+): index=(\d+),type=([^,]+),?(.*)$")


@dataclass(frozen=True, slots=True)
class Netdev:
    id: str
    type: str                  # "tap", "user", "vhost-user", "bridge", "socket", ...
    ifname: str                # ifname=NAME of a tap QEMU opened itself; "" otherwise
    fds: tuple[int, ...]       # fd=N of every queue of a tap that was passed in


def parse_info_network(text: str) -> dict[str, Netdev]:
    """Netdevs that are the peer of a NIC, from HMP `info network` (QEMU 7.2 format)."""
    acc: dict[str, tuple[str, str, list[int]]] = {}
    for line in text.splitlines():
        m = _INFO_PEER.match(line.rstrip("\r"))
        if not m:
            continue
        nid, _index, ntype, rest = m.groups()
        params = dict(p.split("=", 1) for p in rest.split(",") if "=" in p)
        ifname, fds = acc.setdefault(nid, (ntype, params.get("ifname", ""), []))[1:]
        if "fd" in params:
            if not params["fd"].isdigit():
                raise ValueError(f"info network: bad fd in {line!r}")
            fds.append(int(params["fd"]))
    return {nid: Netdev(nid, ntype, ifname, tuple(sorted(set(fds))))
            for nid, (ntype, ifname, fds) in acc.items()}


@dataclass(frozen=True, slots=True)
class NicBackend:
    virtio_path: str           # the virtio-net device's QOM path (as x-query-virtio lists it)
    netdev: Optional[Netdev]   # None: the NIC has no backend

    def taps(self, taps: list[TapBackend]) -> list[TapBackend]:
        """The entries of TapMap.taps_of(pid) that back this NIC."""
        nd = self.netdev
        if nd is None or nd.type != "tap":
            return []
        if nd.ifname:
            return [t for t in taps if t.device == TUN_DEVICE and t.ifname == nd.ifname]
        return [t for t in taps if t.fd in nd.fds]


def nic_backends(client) -> list[NicBackend]:
    """Backends of every virtio-net device of the VM behind `client` (agent.vmm.qmp.QmpClient)."""
    from agent.vmm.probe import virtio_devices

    netdevs = parse_info_network(
        client.execute("human-monitor-command", {"command-line": "info network"}))
    out = []
    for vdev in virtio_devices(client):
        if vdev.name != "virtio-net":
            continue
        # virtio-pci: the netdev property is on the PCI proxy, the parent of virtio-backend
        owner = vdev.path.removesuffix("/virtio-backend")
        netdev_id = client.execute("qom-get", {"path": owner, "property": "netdev"})
        out.append(NicBackend(vdev.path, netdevs.get(netdev_id) if netdev_id else None))
    return out
