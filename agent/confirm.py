"""Confirmation of a suspected NEEDS_RESET by the VMM (QEMU's x-query-virtio-status over QMP).

Correlation emits `NeedsResetSuspected` from kernel evidence alone (a config interrupt, then kicks
that never complete, the status register never read: how Linux guests look). `VmmConfirmer` asks
the VMM, off the event loop:

- only on suspicion (a VM with nothing suspicious costs no QMP traffic);
- at most one probe per VM per `interval_s` (`vmm_probe.QueryRateLimiter`); devices suspected
  while their VM is rate-limited wait (bounded) and are answered by its next probe;
- on one worker thread, each probe a short-lived connection with a per-command timeout, so a
  busy or dead monitor never blocks the event loop;
- the socket comes from the VMM's command line (`agent.vmident`), reached through
  /proc/PID/root (`agent.qmp.reachable_path`). No socket (libvirt's own monitor, fd-passed
  monitors): nothing is asked, the verdict stays "suspected".

The loop calls `submit()` for each NeedsResetSuspected and `poll()` every iteration; `poll()`
returns `Verdict`s for `Correlator.vmm_status()`.

`PciTyper` (opt-in, `run --vmm-pci-types on`): device types from `query-pci` for newly watched
PCI status registers, fed to `Correlator.annotate_device()`.
"""
from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional

from agent.events import Space
from agent.model import NeedsResetSuspected, VmIdentity

log = logging.getLogger(__name__)

DEFAULT_INTERVAL_S = 10.0
DEFAULT_TIMEOUT_S = 2.0
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
    """Correlation's device id "mmio-0x<base>" / "pio-0x<base>" -> (space, base)."""
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
    qdev id names the virtio device. Otherwise (virtio-mmio: QMP has no memory map) the only
    non-PCI device that needs a reset, if exactly one does."""
    from agent.vmm_probe import device_at

    where = _device_space_addr(device)
    if where is None:
        return None
    hit = device_at(list(probe.pci), where[0], where[1])
    if hit is not None:
        for d in probe.devices:
            if d.pci is not None and d.pci.bdf == hit.device.bdf:
                return d
        return None
    broken = [d for d in probe.devices if d.pci is None and d.status.needs_reset]
    return broken[0] if len(broken) == 1 else None


def qmp_socket_for(identity: VmIdentity, proc_root: str = "/proc") -> Optional[str]:
    """A reachable QMP socket path of this VM's process (None: none, or the pid was reused)."""
    from agent.qmp import QmpSocket, reachable_path
    from agent.vmident import ProcessGone, read_vm

    try:
        info = read_vm(identity.pid, proc_root)
    except ProcessGone:
        return None
    if info.identity.start_time != identity.start_time or not info.qmp_socket:
        return None
    return reachable_path(QmpSocket(info.qmp_socket, "-qmp"), identity.pid, proc_root)


class VmmConfirmer:
    def __init__(self, interval_s: float = DEFAULT_INTERVAL_S,
                 timeout_s: float = DEFAULT_TIMEOUT_S,
                 socket_for: Callable[[VmIdentity], Optional[str]] = qmp_socket_for,
                 probe_fn: Optional[Callable] = None,
                 clock_ns: Callable[[], int] = time.monotonic_ns) -> None:
        from agent.vmm_probe import QueryRateLimiter, probe

        self.limiter = QueryRateLimiter(interval_s, max_entries=MAX_PENDING_VMS * 4)
        self.timeout_s = timeout_s
        self._socket_for = socket_for
        self._probe = probe_fn or probe
        self._clock_ns = clock_ns
        self._lock = threading.Lock()
        # vm key -> (identity, device ids waiting); guarded by _lock
        self._pending: collections.OrderedDict = collections.OrderedDict()
        self._inflight: set = set()
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
        out = []
        while self._results:
            out.append(self._results.popleft())
        return out

    def forget_pid(self, pid: int) -> None:
        """The VMM process exited: drop what waits for it."""
        with self._lock:
            keys = [k for k in self._pending if k[0] == pid]
            for k in keys:
                self._pending.pop(k, None)
        for k in keys:
            self.limiter.forget(k)

    def close(self) -> None:
        if self._thread is not None:
            self._jobs.put(None)
            self._thread.join(timeout=self.timeout_s * 4)

    def _dispatch(self, key) -> bool:
        with self._lock:
            if key in self._inflight or key not in self._pending:
                return True
            if not self.limiter.allow(key):
                return False
            identity, devices = self._pending.pop(key)
            self._inflight.add(key)
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="vmm-confirm", daemon=True)
            self._thread.start()
        self._jobs.put((identity, sorted(devices)))
        return True

    # -- worker thread -------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            identity, devices = job
            try:
                self._results.extend(self._ask(identity, devices))
            except Exception:
                log.exception("VMM confirmation of VM %s failed", identity.name)
            finally:
                with self._lock:
                    self._inflight.discard(identity.key)

    def _ask(self, identity: VmIdentity, devices: list[str]) -> list[Verdict]:
        from agent.qmp import QmpError
        from agent.vmm_probe import ProbeFormatError

        path = self._socket_for(identity)
        if path is None:
            self.skipped["no_socket"] += len(devices)
            return []
        try:
            probe = self._probe(path, self.timeout_s)
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


def qmp_socket_for_pid(pid: int, proc_root: str = "/proc") -> Optional[str]:
    from agent.qmp import QmpSocket, reachable_path
    from agent.vmident import ProcessGone, read_vm

    try:
        info = read_vm(pid, proc_root)
    except ProcessGone:
        return None
    if not info.qmp_socket:
        return None
    return reachable_path(QmpSocket(info.qmp_socket, "-qmp"), pid, proc_root)


class PciTyper:
    """Device types from QEMU's query-pci for newly watched PCI status registers (opt-in: it is
    QMP traffic for every VM with a socket, suspicious or not). One query per VM per interval;
    registers found meanwhile wait for the next one. A worker thread, like VmmConfirmer."""

    def __init__(self, interval_s: float = DEFAULT_INTERVAL_S,
                 timeout_s: float = DEFAULT_TIMEOUT_S,
                 socket_for: Callable[[int], Optional[str]] = qmp_socket_for_pid) -> None:
        from agent.vmm_probe import QueryRateLimiter

        self.limiter = QueryRateLimiter(interval_s, max_entries=MAX_PENDING_VMS * 4)
        self.timeout_s = timeout_s
        self._socket_for = socket_for
        self._lock = threading.Lock()
        self._pending: collections.OrderedDict = collections.OrderedDict()  # pid -> {(space, addr)}
        self._maps: collections.OrderedDict = collections.OrderedDict()     # pid -> last query-pci
        self._inflight: set = set()
        self._results: collections.deque = collections.deque()
        self._jobs: queue.Queue = queue.Queue()
        self._thread: Optional[threading.Thread] = None
        self.queries: collections.Counter = collections.Counter()

    def submit(self, pid: int, space: str, addr: int) -> None:
        from agent.vmm_probe import device_at

        with self._lock:
            known = self._maps.get(pid)
        if known is not None:
            # the VM's last map already knows this BAR: no new query
            hit = device_at(known, space, addr)
            if hit is not None and hit.device.virtio_id is not None:
                self._results.append(TypeHint(pid, space, addr, hit.device.virtio_type))
                return
        with self._lock:
            regs = self._pending.get(pid)
            if regs is None:
                if len(self._pending) >= MAX_PENDING_VMS:
                    self._pending.popitem(last=False)
                regs = self._pending[pid] = set()
            if len(regs) < MAX_DEVICES_PER_VM:
                regs.add((space, addr))
        self._dispatch(pid)

    def poll(self) -> list[TypeHint]:
        from agent.vmm_probe import device_at

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
                        self._results.append(TypeHint(pid, space, addr, hit.device.virtio_type))
                        regs.discard((space, addr))
                if not regs:
                    del self._pending[pid]
            waiting = [p for p in waiting if p in self._pending]
        for pid in waiting:
            self._dispatch(pid)
        out = []
        while self._results:
            out.append(self._results.popleft())
        return out

    def forget_pid(self, pid: int) -> None:
        with self._lock:
            self._pending.pop(pid, None)
            self._maps.pop(pid, None)
        self.limiter.forget(pid)

    def _dispatch(self, pid: int) -> None:
        with self._lock:
            if pid in self._inflight or pid not in self._pending or not self.limiter.allow(pid):
                return
            regs = self._pending.pop(pid)
            self._inflight.add(pid)
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="vmm-pci-types", daemon=True)
            self._thread.start()
        self._jobs.put((pid, sorted(regs)))

    def _work(self) -> None:
        from agent.qmp import QmpClient, QmpError
        from agent.vmm_probe import ProbeFormatError, device_at, pci_map

        while True:
            pid, regs = self._jobs.get()
            try:
                path = self._socket_for(pid)
                if path is None:
                    continue
                try:
                    with QmpClient.connect(path, self.timeout_s) as client:
                        devices = pci_map(client)
                except (QmpError, ProbeFormatError, OSError) as exc:
                    self.queries["pci_map_error"] += 1
                    log.warning("query-pci of pid %s failed: %s", pid, exc)
                    continue
                self.queries["pci_map"] += 1
                with self._lock:
                    self._maps[pid] = devices
                    self._maps.move_to_end(pid)
                    while len(self._maps) > MAX_PENDING_VMS:
                        self._maps.popitem(last=False)
                for space, addr in regs:
                    hit = device_at(devices, space, addr)
                    if hit is not None and hit.device.virtio_id is not None:
                        self._results.append(TypeHint(pid, space, addr, hit.device.virtio_type))
            except Exception:
                log.exception("PCI typing of pid %s failed", pid)
            finally:
                with self._lock:
                    self._inflight.discard(pid)
