"""The network cost of each virtio-net NEEDS_RESET episode, for the run loop.

When an episode of a (possibly) virtio-net device opens, `NetOutageTracker.start` finds the
device's host backend interface(s) and snapshots their link counters (agent.net.backend
OutageMeter); when the episode ends, `end` takes the difference and records it for the
metrics and the episode log. Which backend belongs to which device (docs/network.md,
"Attribution"):

* **qmp**: QEMU says it (nic_backends + query-pci): the episode's `pci-BDF` is matched to the
  PCI proxy, its -device id to the NIC, the NIC's netdev to the taps the VMM holds;
* **single_tap**: without a usable QMP socket, only when nothing else is possible: the device is
  `net` (or the only device the agent knows in that VM), the VMM holds exactly one tap
  interface (all of its tap fds resolved, none detached), its command line declares exactly one
  `-netdev` (no `-nic`/`-net`) and exactly one virtio-net `-device`, and the agent knows no
  other net device in the VM.

Anything else is not guessed: it is counted (`unmatched`) and logged as unmeasured.
All state is bounded: open meters (`max_open`), remembered episodes and per-device series
(`max_series`, and series of devices the correlator no longer tracks are dropped).
"""
from __future__ import annotations

import collections
import logging
import os
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

from prometheus_client.core import (
    CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric,
)

from agent.export.metrics import FixedHistogram
from agent.model import Episode, Snapshot
from agent.net.backend import OutageImpact, OutageMeter, TapBackend, TapMap

log = logging.getLogger("agent.net.outage")

# per-episode dropped frames (summed over the device's backend interfaces)
DROPPED_BUCKETS: tuple[float, ...] = (0, 1, 10, 100, 1000, 10_000, 100_000, 1_000_000)
UNMEASURED_REASONS = ("no_backend", "unmatched", "refused", "gone", "inconsistent", "missed",
                      "error")
QMP_TIMEOUT_S = 1.0


class How:
    QMP = "qmp"
    SINGLE_TAP = "single_tap"


@dataclass(frozen=True, slots=True)
class Attribution:
    ifnames: frozenset[str]
    how: str


# --- attribution ---------------------------------------------------------------------------

def read_cmdline(pid: int, proc_root: str = "/proc") -> list[str]:
    with open(os.path.join(proc_root, str(pid), "cmdline"), "rb") as f:
        raw = f.read()
    return [a.decode("utf-8", "replace") for a in raw.split(b"\0") if a]


def _device_driver(value: str) -> str:
    value = value.strip()
    if value.startswith("{"):        # JSON -device (libvirt >= 7.x)
        import json

        try:
            return str(json.loads(value).get("driver", ""))
        except (ValueError, AttributeError):
            return ""
    return value.split(",", 1)[0]


def declared_network(argv: list[str]) -> tuple[int, int, int]:
    """(-netdev options, -nic/-net options, virtio-net -device options) on a QEMU command line."""
    netdevs = legacy = nics = 0
    for i, arg in enumerate(argv[1:-1], start=1):
        opt = arg[1:] if arg.startswith("--") else arg
        if opt == "-netdev":
            netdevs += 1
        elif opt in ("-nic", "-net"):
            legacy += 1
        elif opt == "-device" and _device_driver(argv[i + 1]).startswith("virtio-net"):
            nics += 1
    return netdevs, legacy, nics


def single_tap_rule(dev_type: str, vm_devices: int, vm_net_devices: int,
                    taps: list[TapBackend], detached: int, argv: list[str]) -> Optional[Attribution]:
    """The only-one-possibility rule used without QMP (see the module docstring); None when it
    does not apply. `vm_devices`/`vm_net_devices`: devices (net-typed ones) the agent knows in
    the VM, the episode's own included; `detached`: tap fds of the VMM with no interface."""
    if not (dev_type == "net" or (dev_type == "unknown" and vm_devices == 1)):
        return None
    if vm_net_devices > 1 or detached or any(not t.resolved for t in taps):
        return None
    names = {t.ifname for t in taps}
    if len(names) != 1:
        return None
    if declared_network(argv) != (1, 0, 1):
        return None
    return Attribution(frozenset(names), How.SINGLE_TAP)


def qmp_attribution(client, device: str, dev_type: str,
                    taps: list[TapBackend]) -> tuple[Optional[Attribution], str]:
    """(attribution, "") or (None, reason) with reason "not_net", "no_backend" or "unmatched"."""
    from agent.net.backend import nic_backends
    from agent.events import Space
    from agent.vmm.probe import VirtioDevice, device_at, pci_map

    nics = nic_backends(client)
    nic = None
    kind, _, value = device.partition("-")
    if kind in ("pci", "mmio", "pio"):
        pci = None
        if kind == "pci":
            pci = next((p for p in pci_map(client) if p.device_key == device), None)
        else:
            # a register block the guest accessed: the PCI device whose BAR holds it (a
            # virtio-mmio device has none: query-pci does not list it)
            try:
                addr = int(value, 16)
            except ValueError:
                addr = None
            hit = device_at(pci_map(client), Space.MMIO if kind == "mmio" else Space.PIO,
                            addr) if addr is not None else None
            pci = hit.device if hit is not None else None
        if pci is None and dev_type == "net" and len(nics) == 1:
            nic = nics[0]
        elif pci is not None:
            if pci.virtio_type != "net":
                return None, "not_net"
            if pci.qdev_id:
                nic = next((n for n in nics if VirtioDevice(n.virtio_path, "virtio-net").qdev_id
                            == pci.qdev_id), None)
            if nic is None and len(nics) == 1:
                nic = nics[0]    # the device is net and the VM has exactly one virtio-net NIC
    if nic is None:
        return None, "unmatched" if nics else "not_net"
    names = frozenset(t.ifname for t in nic.taps(taps) if t.resolved)
    if not names:
        return None, "no_backend"
    return Attribution(names, How.QMP), ""


class BackendResolver:
    """Device -> backend interfaces for one episode: QMP when a socket is reachable, else the
    single-tap rule."""

    def __init__(self, tapmap: TapMap, qmp_timeout: float = QMP_TIMEOUT_S,
                 connect: Optional[Callable[[str, float], Any]] = None):
        self.tapmap = tapmap
        self.qmp_timeout = qmp_timeout
        self._connect = connect
        self.qmp_errors = 0

    def _qmp_client(self, pid: int, argv: list[str]):
        from agent.vmm.qmp import QmpClient, qmp_sockets_from_cmdline, reachable_path

        socks = [s for s in qmp_sockets_from_cmdline(argv) if not s.abstract]
        if not socks:
            return None
        connect = self._connect or QmpClient.connect
        return connect(reachable_path(socks[0], pid, self.tapmap.proc_root), self.qmp_timeout)

    def resolve(self, pid: int, device: str, dev_type: str, vm_devices: int,
                vm_net_devices: int) -> tuple[Optional[Attribution], str]:
        detached = self.tapmap.detached
        taps = self.tapmap.taps_of(pid)
        detached = self.tapmap.detached - detached
        if not any(t.resolved for t in taps):
            return None, "no_backend" if dev_type == "net" else "not_net"
        argv = read_cmdline(pid, self.tapmap.proc_root)
        try:
            client = self._qmp_client(pid, argv)
        except Exception as exc:     # busy monitor (one client at a time), gone, refused
            self.qmp_errors += 1
            log.debug("QMP for pid %s not usable: %s", pid, exc)
            client = None
        qmp_reason = ""
        if client is not None:
            try:
                with client:
                    attr, qmp_reason = qmp_attribution(client, device, dev_type, taps)
                if attr is not None or qmp_reason != "no_backend":
                    return attr, qmp_reason
                # the NIC's netdev names no tap QEMU opened or was given (-netdev bridge: the
                # helper's fd): the single-tap rule may still place it
            except Exception as exc:
                self.qmp_errors += 1
                log.debug("QMP attribution for pid %s failed: %s", pid, exc)
        attr = single_tap_rule(dev_type, vm_devices, vm_net_devices, taps, detached, argv)
        if attr is not None:
            return attr, ""
        if qmp_reason:
            return None, qmp_reason
        return None, "unmatched" if dev_type in ("net", "unknown") else "not_net"


# --- the tracker ---------------------------------------------------------------------------

EpisodeKey = tuple[int, str, int]


def episode_key(ep: Episode) -> EpisodeKey:
    # the pid, not the VM's (pid, start time) key: a VM first seen before it was identified
    # changes key mid-episode; two processes never share a pid and an episode start
    return (ep.vm.pid, ep.device, ep.start_ns)


class _Counts:
    __slots__ = ("dropped", "packets", "bytes")

    def __init__(self) -> None:
        self.dropped = self.packets = self.bytes = 0


def _toward_guest(impact: OutageImpact) -> tuple[int, int]:
    """(packets, bytes) the backend handled toward the guest (tap: read by the VMM; macvtap:
    received for the queue, dropped frames included)."""
    if impact.kind in ("macvtap", "ipvtap"):
        return impact.rx_packets, impact.rx_bytes
    return impact.tx_packets, impact.tx_bytes


class NetOutageTracker:
    """Loop thread: `pending(snapshot)` (under the agent lock), `start(episode, ...)` (outside
    it: may talk QMP), `end(episode)`. HTTP thread: `families()`, `ifname(vm, device)`."""

    def __init__(self, meter: Optional[OutageMeter] = None,
                 resolver: Optional[BackendResolver] = None, max_series: int = 4096):
        if max_series <= 0:
            raise ValueError("max_series must be positive")
        self.meter = meter or OutageMeter()
        self.resolver = resolver or BackendResolver(self.meter.tapmap)
        self.max_series = max_series
        self._lock = threading.Lock()
        self._seen: dict[EpisodeKey, None] = {}     # episodes open at the last pending()
        self._metering: dict[EpisodeKey, Attribution] = {}
        self._unmeasured_eps: dict[EpisodeKey, str] = {}   # reason, for the episode log
        # (vm name, namespace, device) -> ifname -> counts; (vm key, device) -> ifname
        self._series: dict[tuple[str, str, str], dict[str, _Counts]] = {}
        self._ifnames: dict[tuple[tuple[int, int], str], str] = {}
        self._hist = FixedHistogram(DROPPED_BUCKETS)
        self.unmeasured = collections.Counter({r: 0 for r in UNMEASURED_REASONS})
        self._meter_base = self._meter_counts()

    def _meter_counts(self) -> dict[str, int]:
        m = self.meter
        return {"no_backend": m.no_backend, "refused": m.refused, "gone": m.gone,
                "inconsistent": m.inconsistent}

    def _sync_meter_counts(self) -> None:
        now = self._meter_counts()
        with self._lock:
            for k, v in now.items():
                self.unmeasured[k] += v - self._meter_base[k]
        self._meter_base = now

    def _count(self, reason: str) -> None:
        with self._lock:
            self.unmeasured[reason] += 1

    # -- loop thread ------------------------------------------------------------------------

    def pending(self, snap: Snapshot) -> list[tuple[Episode, int, int]]:
        """Newly open episodes worth metering: (episode, devices, net devices the agent knows in
        its VM). Also forgets the series of devices the correlator dropped and discards meters
        of episodes that vanished without ending (device evicted)."""
        fresh = []
        open_keys, not_net = set(), set()
        for d in snap.devices:
            ep = d.open_episode
            if ep is None or d.exited:
                continue
            key = episode_key(ep)
            if d.type not in ("net", "unknown"):
                not_net.add(key)        # e.g. typed by query-pci meanwhile: not an outage
                continue
            open_keys.add(key)
            if key not in self._seen:
                fresh.append(ep)
        # remembered: the open episodes only (bounded by the devices tracked)
        self._seen = dict.fromkeys(open_keys)
        out = []
        if fresh:
            devices: collections.Counter = collections.Counter()
            nets: collections.Counter = collections.Counter()
            for d in snap.devices:
                devices[d.vm.key] += 1
                nets[d.vm.key] += d.type == "net"
            out = [(ep, devices[ep.vm.key], nets[ep.vm.key]) for ep in fresh]
        for key in [k for k in self._metering if k not in open_keys]:
            del self._metering[key]
            self.meter.discard(key)
            if key not in not_net:
                self._count("missed")
        if self._ifnames or self._series:       # usually empty: no set building per tick
            live = {(d.vm.key, d.device) for d in snap.devices}
            labels_live = {(d.vm.name or f"pid-{d.vm.pid}", d.vm.namespace, d.device)
                           for d in snap.devices}
            with self._lock:
                for k in [k for k in self._ifnames if k not in live]:
                    del self._ifnames[k]
                for k in [k for k in self._series if k not in labels_live]:
                    del self._series[k]
        return out

    def start(self, ep: Episode, vm_devices: int, vm_net_devices: int) -> Optional[Attribution]:
        key = episode_key(ep)
        if key in self._metering:
            return self._metering[key]
        try:
            attr, reason = self.resolver.resolve(ep.vm.pid, ep.device, ep.type, vm_devices,
                                                 vm_net_devices)
        except FileNotFoundError:
            attr, reason = None, "gone"      # the VMM exited meanwhile
        except Exception:
            log.exception("attributing %s of pid %s failed", ep.device, ep.vm.pid)
            attr, reason = None, "error"
        if attr is None:
            if reason != "not_net":
                self._count(reason)
                self._remember_unmeasured(key, reason)
            return None
        before = self._meter_counts()
        reason = ""
        try:
            taken = self.meter.start(key, ep.vm.pid, attr.ifnames)
        except FileNotFoundError:
            taken, reason = 0, "gone"
        except Exception:
            log.exception("metering %s of pid %s failed", ep.device, ep.vm.pid)
            taken, reason = 0, "error"
        if reason:
            self._count(reason)
        after = self._meter_counts()
        self._sync_meter_counts()
        if not taken:
            reason = reason or next((k for k in after if after[k] > before[k]), "no_backend")
            self._remember_unmeasured(key, reason)
            return None
        self._metering[key] = attr
        if len(attr.ifnames) == 1:
            with self._lock:
                self._ifnames[(ep.vm.key, ep.device)] = next(iter(attr.ifnames))
        return attr

    def _remember_unmeasured(self, key: EpisodeKey, reason: str) -> None:
        self._unmeasured_eps[key] = reason
        while len(self._unmeasured_eps) > self.meter.max_open:
            del self._unmeasured_eps[next(iter(self._unmeasured_eps))]

    def end(self, ep: Episode) -> Optional[dict[str, Any]]:
        """Finish the episode's measurement: its episode-log record (`net` key), or None when the
        episode was never considered a network outage."""
        key = episode_key(ep)
        attr = self._metering.pop(key, None)
        if attr is None:
            reason = self._unmeasured_eps.pop(key, None)
            if reason is None and key not in self._seen and ep.type == "net":
                # opened and ended between two ticks: never snapshotted
                self._count("missed")
                reason = "missed"
            return None if reason is None else {"measured": False, "reason": reason}
        before = self._meter_counts()
        try:
            impacts = self.meter.end(key)
        except Exception:
            log.exception("ending the meter of %s of pid %s failed", ep.device, ep.vm.pid)
            self._count("error")
            return {"measured": False, "reason": "error"}
        after = self._meter_counts()
        self._sync_meter_counts()
        lost = sorted(k for k in after if after[k] > before[k])   # gone / inconsistent
        if not impacts:
            return {"measured": False, "reason": lost[0] if lost else "gone"}
        labels = (ep.vm.name or f"pid-{ep.vm.pid}", ep.vm.namespace, ep.device)
        dropped_total = 0
        interfaces = []
        with self._lock:
            per_if = self._series.get(labels)
            if per_if is None and len(self._series) < self.max_series:
                per_if = self._series[labels] = {}
            if per_if is not None:
                # a restarted VM keeps its labels but gets new taps: older ones' series go
                for stale in set(per_if) - {imp.ifname for imp in impacts}:
                    del per_if[stale]
            for imp in impacts:
                dropped = imp.toward_guest_dropped or 0
                packets, nbytes = _toward_guest(imp)
                dropped_total += dropped
                if per_if is not None:
                    c = per_if.setdefault(imp.ifname, _Counts())
                    c.dropped += dropped
                    c.packets += packets
                    c.bytes += nbytes
                interfaces.append(impact_record(imp))
            self._hist.observe(dropped_total)
        record = {"measured": True, "attribution": attr.how, "dropped_packets": dropped_total,
                  "interfaces": interfaces}
        if lost:
            record["partial"] = lost      # some interfaces could not be measured (why)
        return record

    def close(self) -> None:
        self.meter.close()

    # -- HTTP thread ------------------------------------------------------------------------

    def ifname(self, vm_key: tuple[int, int], device: str) -> str:
        with self._lock:
            return self._ifnames.get((vm_key, device), "")

    def families(self) -> list[Metric]:
        dev = ["vm", "namespace", "device", "ifname"]
        dropped = CounterMetricFamily(
            "virtio_net_outage_dropped_packets",
            "Frames toward the guest the host backend dropped during NEEDS_RESET episodes.",
            labels=dev)
        packets = CounterMetricFamily(
            "virtio_net_outage_toward_guest_packets",
            "Frames the host backend handled toward the guest during NEEDS_RESET episodes "
            "(tap: read by the VMM; macvtap: received, dropped ones included).", labels=dev)
        nbytes = CounterMetricFamily(
            "virtio_net_outage_toward_guest_bytes",
            "Bytes of virtio_net_outage_toward_guest_packets_total.", labels=dev)
        hist = HistogramMetricFamily(
            "virtio_net_outage_episode_dropped_packets",
            "Frames dropped toward the guest per measured virtio-net NEEDS_RESET episode.")
        unmeasured = CounterMetricFamily(
            "virtio_agent_net_outage_unmeasured",
            "Network impact not measured: no_backend, unmatched, refused, gone, inconsistent, "
            "missed, error.", labels=["reason"])
        open_ = GaugeMetricFamily("virtio_agent_net_outage_open",
                                  "Virtio-net episodes being metered now.")
        with self._lock:
            for labels, per_if in sorted(self._series.items()):
                for ifname, c in sorted(per_if.items()):
                    lv = list(labels) + [ifname]
                    dropped.add_metric(lv, c.dropped)
                    packets.add_metric(lv, c.packets)
                    nbytes.add_metric(lv, c.bytes)
            hist.add_metric([], self._hist.buckets(), self._hist.sum)
            for reason in UNMEASURED_REASONS:
                unmeasured.add_metric([reason], self.unmeasured[reason])
            open_.add_metric([], len(self._metering))
        return [dropped, packets, nbytes, hist, unmeasured, open_]


class NetOutageWorker:
    """Runs a NetOutageTracker off the agent loop, which must keep draining the ring buffer:
    /proc, netlink (in the VMM's network namespace) and QMP (a busy or hostile monitor) can
    take seconds. One thread runs the jobs in the order they came: `tick(snapshot)` meters the
    episodes that opened (ticks in a row coalesce: only the newest snapshot matters),
    `ended(output)` ends the meter and then writes the episode-log line with `write(output,
    net)`. Jobs are bounded (`max_jobs`): beyond it, a line is written at once, unmeasured."""

    def __init__(self, tracker: NetOutageTracker,
                 write: Callable[[Any, Optional[dict[str, Any]]], None], max_jobs: int = 10_000):
        self.tracker = tracker
        self._write = write
        self.max_jobs = max_jobs
        self._jobs: collections.deque = collections.deque()
        self._cond = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="net-outage", daemon=True)
        self._thread.start()

    def tick(self, snap: Snapshot) -> None:
        with self._cond:
            if self._jobs and self._jobs[-1][0] == "tick":
                self._jobs[-1] = ("tick", snap)
            elif len(self._jobs) < self.max_jobs:
                self._jobs.append(("tick", snap))
            self._cond.notify()

    def ended(self, output) -> None:
        """Write `output`'s line (an EpisodeEnded) with its network impact, in the background."""
        with self._cond:
            queued = len(self._jobs) < self.max_jobs and not self._closing
            if queued:
                self._jobs.append(("ended", output))
                self._cond.notify()
        if not queued:
            self._write_unmeasured(output)

    def _write_unmeasured(self, output) -> None:
        """The line without a measurement: `missed` for a net device (counted), else no `net`."""
        net = None
        if output.episode.type == "net":
            self.tracker._count("missed")
            net = {"measured": False, "reason": "missed"}
        self._write(output, net)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._jobs and not self._closing:
                    self._cond.wait()
                if not self._jobs:
                    return
                kind, arg = self._jobs.popleft()
            net = None
            try:
                if kind == "tick":
                    for ep, n_devices, n_net in self.tracker.pending(arg):
                        self.tracker.start(ep, n_devices, n_net)
                else:
                    net = self.tracker.end(arg.episode)
            except Exception:
                self.tracker._count("error")
                log.exception("network impact job %s failed", kind)
            if kind == "ended":
                try:
                    self._write(arg, net)
                except Exception:
                    log.exception("writing the episode line of %s failed", arg.episode.device)

    def close(self, timeout_s: float = 5.0) -> None:
        """Finish the queued jobs (their lines are written), then release the meters."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            with self._cond:
                left, self._jobs = list(self._jobs), collections.deque()
            ended = [arg for kind, arg in left if kind == "ended"]
            log.warning("network impact jobs still running after %.0f s: %d episode lines "
                        "written unmeasured", timeout_s, len(ended))
            for out in ended:
                self._write_unmeasured(out)
            return
        self.tracker.close()


def impact_record(imp: OutageImpact) -> dict[str, Any]:
    return {"ifname": imp.ifname, "kind": imp.kind, "seconds": round(imp.seconds, 6),
            "dropped_toward_guest": imp.toward_guest_dropped,
            "tx_packets": imp.tx_packets, "tx_bytes": imp.tx_bytes,
            "tx_dropped": imp.tx_dropped, "tx_errors": imp.tx_errors,
            "rx_packets": imp.rx_packets, "rx_bytes": imp.rx_bytes,
            "rx_dropped": imp.rx_dropped, "rx_errors": imp.rx_errors}
