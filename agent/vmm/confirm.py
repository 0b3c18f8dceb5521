"""Confirmation of a suspected NEEDS_RESET by the VMM (QEMU's x-query-virtio-status over QMP).

Correlation emits `NeedsResetSuspected` from kernel evidence alone (a config interrupt, then kicks
that never complete, the status register never read: how Linux guests look). `VmmConfirmer` asks
the VMM, off the event loop:

- only on suspicion (a VM with nothing suspicious costs no QMP traffic);
- at most one probe per VM per `interval_s` (`vmm_probe.QueryRateLimiter`); devices suspected
  while their VM is rate-limited wait (bounded) and are answered by its next probe;
- on one worker thread, each probe a short-lived connection with a per-command timeout and an
  overall session limit (`budget_s`), asking the status only of the devices at the suspected
  addresses (at most vmm_probe.MAX_PROBED_DEVICES), so a busy, slow or hostile monitor never
  blocks the event loop and holds the worker for at most `budget_s`;
- the socket comes from the VMM's command line (`agent.vmm.qmp.qmp_sockets_from_cmdline`: server
  mode unix sockets only, never libvirt's own monitor, no abstract sockets), reached through
  /proc/PID/root (`agent.vmm.qmp.reachable_path`). No socket: nothing is asked, the verdict stays
  "suspected".
- answers for a VM forgotten (`forget_pid`) while its probe ran are thrown away.

The loop calls `submit()` for each NeedsResetSuspected and `poll()` every iteration; `poll()`
returns `Verdict`s for `Correlator.vmm_status()`.

`PciTyper` (opt-in, `run --vmm-pci-types on`): device types from `query-pci` for newly watched
PCI status registers, fed to `Correlator.annotate_device()`.
"""
from __future__ import annotations

import collections
import itertools
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional

from agent.events import Space
from agent.model import NeedsResetSuspected, VmIdentity

log = logging.getLogger(__name__)

DEFAULT_INTERVAL_S = 10.0
DEFAULT_TIMEOUT_S = 2.0      # per QMP command
DEFAULT_BUDGET_S = 5.0       # per probe (one QMP session): connect and every command together
MAX_PENDING_VMS = 256
MAX_DEVICES_PER_VM = 64


@dataclass(frozen=True, slots=True)
class Verdict:
    pid: int
    device: str
    ts_ns: int               # CLOCK_MONOTONIC when the VMM answered
    needs_reset: bool
    type: str = "unknown"    # virtio type name from the VMM


def _device_space_addr(device: str) -> Optional[tuple[str, int]]:
    """Correlation's device id -> what vmm_probe.virtio_at takes: "pci-0000:bb:dd.f" ->
    (PCI_FUNCTION, bus << 8 | dev << 3 | fn); "mmio-0x<base>" / "pio-0x<base>" -> (space, base)."""
    from agent.vmm.probe import PCI_FUNCTION

    if device.startswith("pci-0000:"):
        try:
            bus, rest = device[len("pci-0000:"):].split(":")
            dev, fn = rest.split(".")
            b, d, f = int(bus, 16), int(dev, 16), int(fn, 16)
        except ValueError:
            return None
        if b > 0xFF or d > 0x1F or f > 7:
            return None
        return PCI_FUNCTION, b << 8 | d << 3 | f
    space, _, hexaddr = device.partition("-0x")
    if space not in (Space.MMIO, Space.PIO):
        return None
    try:
        return space, int(hexaddr, 16)
    except ValueError:
        return None


def match(probe, device: str):
    """The probed device (vmm_probe.ProbedDevice) that correlation's `device` is, or None.

    PCI: the BAR holding the structure base (common cfg / I/O BAR) names the PCI device, whose
    qdev id names the virtio device. An MMIO address in no PCI BAR (virtio-mmio: QMP has no
    memory map): the VM's only non-PCI virtio device, if it has exactly one, whatever its status
    (`vmm_probe.virtio_at`). None if that device's status was not queried."""
    from agent.vmm.probe import virtio_at

    where = _device_space_addr(device)
    if where is None:
        return None
    v = virtio_at(probe.virtio, probe.pci, where[0], where[1])
    if v is None:
        return None
    return next((d for d in probe.devices if d.virtio.path == v.path), None)


def qmp_socket_path(pid: int, proc_root: str = "/proc",
                    start_time: Optional[int] = None) -> Optional[str]:
    """A reachable QMP socket of process `pid`, from its command line, or None.

    Only what `agent.vmm.qmp.qmp_sockets_from_cmdline` accepts (unix sockets in server mode, never
    libvirt's `charmonitor`); abstract sockets are skipped (they live in QEMU's network
    namespace). With `start_time`, None unless the process still has that start time (a reused
    pid is never asked); the command line is read first, so it belongs to that process."""
    from agent.vmm.qmp import qmp_sockets_from_cmdline, reachable_path
    from agent.vmm.vmident import start_time as stat_start_time

    base = os.path.join(proc_root, str(pid))
    try:
        with open(os.path.join(base, "cmdline"), "rb") as f:
            raw = f.read()
        if start_time is not None:
            with open(os.path.join(base, "stat"), "rb") as f:
                stat = f.read().decode("utf-8", "replace")
            if stat_start_time(stat) != start_time:
                return None
    except (OSError, ValueError):
        return None
    argv = [a.decode("utf-8", "replace") for a in raw.split(b"\0")]
    if argv and argv[-1] == "":
        argv.pop()
    socks = [sock for sock in qmp_sockets_from_cmdline(argv) if not sock.abstract]
    if not socks:
        return None
    return reachable_path(socks[0], pid, proc_root)


def qmp_socket_for(identity: VmIdentity, proc_root: str = "/proc") -> Optional[str]:
    """A reachable QMP socket path of this VM's process (None: none, or the pid was reused)."""
    return qmp_socket_path(identity.pid, proc_root, identity.start_time)


class VmmConfirmer:
    """`probe_fn(path, timeout)` replaces the QMP probe (tests); by default
    `vmm_probe.probe(path, timeout_s, budget_s=budget_s, targets=<the suspected addresses>)`."""

    def __init__(self, interval_s: float = DEFAULT_INTERVAL_S,
                 timeout_s: float = DEFAULT_TIMEOUT_S,
                 socket_for: Callable[[VmIdentity], Optional[str]] = qmp_socket_for,
                 probe_fn: Optional[Callable] = None,
                 clock_ns: Callable[[], int] = time.monotonic_ns,
                 budget_s: float = DEFAULT_BUDGET_S) -> None:
        from agent.vmm.probe import QueryRateLimiter

        self.limiter = QueryRateLimiter(interval_s, max_entries=MAX_PENDING_VMS * 4)
        self.timeout_s = timeout_s
        self.budget_s = budget_s
        self._socket_for = socket_for
        self._probe_fn = probe_fn
        self._clock_ns = clock_ns
        self._lock = threading.Lock()
        # vm key -> (identity, device ids waiting); guarded by _lock
        self._pending: collections.OrderedDict = collections.OrderedDict()
        # vm key -> token of its running job; forget_pid removes it, which voids the job's answer
        self._inflight: dict = {}
        self._tokens = itertools.count(1)
        self._results: collections.deque = collections.deque()
        self._jobs: queue.Queue = queue.Queue()
        self._thread: Optional[threading.Thread] = None
        self.queries: collections.Counter = collections.Counter()
        self.skipped: collections.Counter = collections.Counter()

    # -- loop side -----------------------------------------------------------------------

    def submit(self, s: NeedsResetSuspected) -> None:
        key = s.vm.key
        with self._lock:
            entry = self._pending.get(key)
            if entry is None:
                if len(self._pending) >= MAX_PENDING_VMS:
                    _, (_, dropped) = self._pending.popitem(last=False)
                    self.skipped["overflow"] += len(dropped)
                entry = self._pending[key] = (s.vm, set())
            if len(entry[1]) < MAX_DEVICES_PER_VM:
                entry[1].add(s.device)
            else:
                self.skipped["overflow"] += 1
        if not self._dispatch(key):
            self.skipped["rate_limited"] += 1

    def poll(self) -> list[Verdict]:
        """Verdicts that arrived; also sends waiting VMs whose rate limit has passed."""
        with self._lock:
            waiting = [k for k in self._pending if k not in self._inflight]
        for key in waiting:
            self._dispatch(key)
        with self._lock:
            out = list(self._results)
            self._results.clear()
        return out

    def forget_pid(self, pid: int) -> None:
        """The VMM process exited: drop what waits for it, its answers not yet collected, and
        the answer of a probe still running for it."""
        with self._lock:
            keys = {k for k in self._pending if k[0] == pid}
            for k in keys:
                self._pending.pop(k, None)
            running = [k for k in self._inflight if k[0] == pid]
            for k in running:
                del self._inflight[k]
            keys.update(running)
            if any(v.pid == pid for v in self._results):
                self._results = collections.deque(v for v in self._results if v.pid != pid)
        for k in keys:
            self.limiter.forget(k)

    def close(self) -> None:
        if self._thread is not None:
            self._jobs.put(None)
            self._thread.join(timeout=self.budget_s + 1.0)

    def _dispatch(self, key) -> bool:
        with self._lock:
            if key in self._inflight or key not in self._pending:
                return True
            if not self.limiter.allow(key):
                return False
            identity, devices = self._pending.pop(key)
            token = self._inflight[key] = next(self._tokens)
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="vmm-confirm", daemon=True)
            self._thread.start()
        self._jobs.put((identity, sorted(devices), token))
        return True

    # -- worker thread -------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            identity, devices, token = job
            verdicts: list[Verdict] = []
            try:
                verdicts = self._ask(identity, devices)
            except Exception:
                log.exception("VMM confirmation of VM %s failed", identity.name)
            finally:
                with self._lock:
                    if self._inflight.get(identity.key) == token:
                        del self._inflight[identity.key]
                        self._results.extend(verdicts)
                    elif verdicts:
                        # forget_pid() ran meanwhile: the VM is gone (its pid may be reused)
                        log.debug("dropping %d VMM answers for exited VM %s", len(verdicts),
                                  identity.name)

    def _ask(self, identity: VmIdentity, devices: list[str]) -> list[Verdict]:
        from agent.vmm.qmp import QmpError
        from agent.vmm.probe import ProbeFormatError, probe as qmp_probe

        targets = [w for w in map(_device_space_addr, devices) if w is not None]
        if not targets:     # no address QEMU's answer could be matched to: do not ask
            self.queries["unmatched"] += len(devices)
            return []
        path = self._socket_for(identity)
        if path is None:
            self.skipped["no_socket"] += len(devices)
            return []
        try:
            if self._probe_fn is not None:
                probe = self._probe_fn(path, self.timeout_s)
            else:
                probe = qmp_probe(path, self.timeout_s, budget_s=self.budget_s, targets=targets)
        except (QmpError, ProbeFormatError, OSError) as exc:
            self.queries["error"] += 1
            log.warning("QMP probe of VM %s failed: %s", identity.name, exc)
            return []
        now = self._clock_ns()
        out = []
        for device in devices:
            d = match(probe, device)
            if d is None:
                self.queries["unmatched"] += 1
                continue
            needs_reset = d.status.needs_reset
            self.queries["needs_reset" if needs_reset else "clear"] += 1
            log.info("VMM says device %s of VM %s %s (status 0x%02x, broken %s)", device,
                     identity.name, "needs a reset" if needs_reset else "is fine",
                     d.status.status, d.status.broken)
            out.append(Verdict(identity.pid, device, now, needs_reset, d.status.type))
        return out


@dataclass(frozen=True, slots=True)
class TypeHint:
    pid: int
    space: str
    addr: int
    type: str
    bdf: str = ""           # the PCI function (query-pci), "0000:bb:dd.f"


def qmp_socket_for_pid(pid: int, proc_root: str = "/proc") -> Optional[str]:
    return qmp_socket_path(pid, proc_root)


class PciTyper:
    """Device types from QEMU's query-pci for newly watched PCI status registers (opt-in: it is
    QMP traffic for every VM with a socket, suspicious or not). One query per VM per interval;
    registers found meanwhile wait for the next one. A worker thread, like VmmConfirmer, each
    query a QMP session bounded by `budget_s`. A query still running when `forget_pid` is
    called (the VM exited) is voided: its map and types are thrown away, so a reused pid never
    gets the previous VM's map."""

    def __init__(self, interval_s: float = DEFAULT_INTERVAL_S,
                 timeout_s: float = DEFAULT_TIMEOUT_S,
                 socket_for: Callable[[int], Optional[str]] = qmp_socket_for_pid,
                 budget_s: float = DEFAULT_BUDGET_S,
                 connect: Optional[Callable] = None) -> None:
        from agent.vmm.probe import QueryRateLimiter

        self.limiter = QueryRateLimiter(interval_s, max_entries=MAX_PENDING_VMS * 4)
        self.timeout_s = timeout_s
        self.budget_s = budget_s
        self._socket_for = socket_for
        self._connect = connect         # QmpClient.connect(path, timeout, budget_s=...) (tests)
        self._lock = threading.Lock()
        self._pending: collections.OrderedDict = collections.OrderedDict()  # pid -> {(space, addr)}
        self._maps: collections.OrderedDict = collections.OrderedDict()     # pid -> last query-pci
        # pid -> token of its running query; forget_pid removes it, which voids the answer
        self._inflight: dict = {}
        self._tokens = itertools.count(1)
        self._results: collections.deque = collections.deque()
        self._jobs: queue.Queue = queue.Queue()
        self._thread: Optional[threading.Thread] = None
        self.queries: collections.Counter = collections.Counter()

    def submit(self, pid: int, space: str, addr: int) -> None:
        from agent.vmm.probe import device_at

        with self._lock:
            known = self._maps.get(pid)
            if known is not None:
                # the VM's last map already knows this BAR: no new query
                hit = device_at(known, space, addr)
                if hit is not None and hit.device.virtio_id is not None:
                    self._results.append(TypeHint(pid, space, addr, hit.device.virtio_type,
                                              hit.device.bdf))
                    return
            regs = self._pending.get(pid)
            if regs is None:
                if len(self._pending) >= MAX_PENDING_VMS:
                    self._pending.popitem(last=False)
                regs = self._pending[pid] = set()
            if len(regs) < MAX_DEVICES_PER_VM:
                regs.add((space, addr))
        self._dispatch(pid)

    def poll(self) -> list[TypeHint]:
        from agent.vmm.probe import device_at

        with self._lock:
            waiting = [p for p in self._pending if p not in self._inflight]
            # registers that waited while their VM's map was being fetched: answer from it
            for pid in waiting:
                known = self._maps.get(pid)
                if known is None:
                    continue
                regs = self._pending[pid]
                for space, addr in list(regs):
                    hit = device_at(known, space, addr)
                    if hit is not None and hit.device.virtio_id is not None:
                        self._results.append(TypeHint(pid, space, addr, hit.device.virtio_type,
                                              hit.device.bdf))
                        regs.discard((space, addr))
                if not regs:
                    del self._pending[pid]
            waiting = [p for p in waiting if p in self._pending]
        for pid in waiting:
            self._dispatch(pid)
        with self._lock:
            out = list(self._results)
            self._results.clear()
        return out

    def forget_pid(self, pid: int) -> None:
        """The VMM process exited: drop its map, what waits for it, its hints not yet collected,
        and the answer of a query still running for it."""
        with self._lock:
            self._pending.pop(pid, None)
            self._maps.pop(pid, None)
            self._inflight.pop(pid, None)
            if any(h.pid == pid for h in self._results):
                self._results = collections.deque(h for h in self._results if h.pid != pid)
        self.limiter.forget(pid)

    def close(self) -> None:
        if self._thread is not None:
            self._jobs.put(None)
            self._thread.join(timeout=self.budget_s + 1.0)

    def _dispatch(self, pid: int) -> None:
        with self._lock:
            if pid in self._inflight or pid not in self._pending or not self.limiter.allow(pid):
                return
            regs = self._pending.pop(pid)
            token = self._inflight[pid] = next(self._tokens)
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="vmm-pci-types", daemon=True)
            self._thread.start()
        self._jobs.put((pid, sorted(regs), token))

    def _work(self) -> None:
        from agent.vmm.qmp import QmpClient, QmpError
        from agent.vmm.probe import ProbeFormatError, device_at, pci_map

        connect = self._connect or QmpClient.connect
        while True:
            job = self._jobs.get()
            if job is None:
                return
            pid, regs, token = job
            devices = hints = None
            try:
                path = self._socket_for(pid)
                if path is None:
                    continue
                try:
                    with connect(path, self.timeout_s, budget_s=self.budget_s) as client:
                        devices = pci_map(client)
                except (QmpError, ProbeFormatError, OSError) as exc:
                    self.queries["pci_map_error"] += 1
                    log.warning("query-pci of pid %s failed: %s", pid, exc)
                    continue
                self.queries["pci_map"] += 1
                hints = []
                for space, addr in regs:
                    hit = device_at(devices, space, addr)
                    if hit is not None and hit.device.virtio_id is not None:
                        hints.append(TypeHint(pid, space, addr, hit.device.virtio_type,
                                              hit.device.bdf))
            except Exception:
                log.exception("PCI typing of pid %s failed", pid)
            finally:
                with self._lock:
                    if self._inflight.get(pid) == token:
                        del self._inflight[pid]
                        if devices is not None:
                            self._maps[pid] = devices
                            self._maps.move_to_end(pid)
                            while len(self._maps) > MAX_PENDING_VMS:
                                self._maps.popitem(last=False)
                        self._results.extend(hints or ())
                    # else: forget_pid() ran meanwhile (the VM exited, its pid may be reused):
                    # the map and the hints are thrown away
