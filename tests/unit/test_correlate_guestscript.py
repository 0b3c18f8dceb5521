"""A synthetic-stream builder for correlation tests: "guest scripts" -> agent.events.

A Script owns a timeline; VMs and devices on it emit the accesses a virtio driver and a VMM
would cause, and record the truth (episode marks, scripted violations) the correlator must find.
The tests at the bottom check the builder itself.
"""
from __future__ import annotations

import heapq
from collections import Counter
from dataclasses import dataclass
from typing import Optional

from agent import events as E
from agent.correlate import Correlator, CorrelatorConfig, DeviceHint
from agent.model import Evidence, Rule, Transport
from pciguest import Function, Guest

MODERN_INIT = (0, 1, 3, 11, 15)
LEGACY_INIT = (0, 1, 3, 7)
US = 1_000


@dataclass
class Truth:
    """An episode as the script made it."""

    vm: str
    device: str
    evidence: str
    start_ns: int
    guest_saw_ns: Optional[int] = None
    reset_written_ns: Optional[int] = None
    reset_done_ns: Optional[int] = None
    driver_ok_ns: Optional[int] = None
    outcome: str = "open"


class Script:
    """A timeline of events. `gap` is how far each step moves time."""

    def __init__(self, t0: int = 1_000_000_000, gap: int = 10 * US, unit: int = 1) -> None:
        self.t = t0
        self.gap = gap
        self.unit = unit      # every step is a multiple of this: merged scripts never tie
        self.events: list[E.Event] = []
        self.episodes: list[Truth] = []
        self.violations: list[tuple[str, str, str]] = []   # (vm name, device, rule)
        self.failures: Counter = Counter()                   # (vm name, device) -> FAILED set

    def step(self, gap: int | None = None) -> int:
        self.t += (self.gap if gap is None else gap) * self.unit
        return self.t

    def emit(self, ev: E.Event) -> None:
        self.events.append(ev)

    def vm(self, pid: int, name: str | None = None, start_time: int = 100,
           announce: bool = True, **kw) -> "Vm":
        vm = Vm(self, pid, name or f"pid-{pid}", start_time)
        if name is not None and announce:
            self.emit(E.VmStarted(self.step(), pid, start_time, name, **kw))
        return vm


class Vm:
    def __init__(self, script: Script, pid: int, name: str, start_time: int) -> None:
        self.s, self.pid, self.name, self.start_time = script, pid, name, start_time
        self.tid = pid + 1
        self.next_slot = 3
        self.guest = Guest(pid, self.tid, script.step, script.emit)

    def device(self, transport: str = Transport.PCI_MODERN, base: int = 0xFEBF0000,
               vector: int | None = None, gsi: int | None = None,
               enumerated: bool | None = None, type: str = "rng",
               queue_vector: int | None = None) -> "Dev":
        """A device at `base` (status block). A PCI device with a vector or GSI is enumerated
        and programmed by the guest first (unless enumerated=False): the agent can know its
        interrupt exactly. One without (or a virtio-mmio one) is found from its traffic."""
        if enumerated is None:
            enumerated = transport != Transport.MMIO and (vector is not None or gsi is not None)
        fn = None
        if enumerated:
            legacy = transport == Transport.PCI_LEGACY
            fn = Function((self.next_slot << 3), type=type, transitional=legacy,
                          msix_vectors=2 if vector is not None else 0,
                          bar4=base if not legacy else 0xFE000000 + (self.next_slot << 16),
                          bar1=0xFEB80000 + (self.next_slot << 12),
                          io_bar=base if legacy else 0xC000, line=gsi or 11)
            self.next_slot += 1
            self.guest.program(fn, vector, queue_vector)
        return Dev(self, transport, base, vector, gsi, fn)

    def exit(self) -> None:
        self.s.emit(E.ProcessExit(self.s.step(), self.pid))
        for ep in self.s.episodes:
            if ep.vm == self.name and ep.outcome == "open":
                ep.outcome = "abandoned"


class Dev:
    def __init__(self, vm: Vm, transport: str, base: int, vector: int | None,
                 gsi: int | None, fn: Function | None = None) -> None:
        self.vm, self.transport, self.base = vm, transport, base
        self.vector, self.gsi = vector, gsi
        self.fn = fn
        # can the agent know when this device's config interrupts are raised? Yes when the guest
        # programmed them where it could see (PCI enumeration) or an operator hint says
        self.exact_irq = fn is not None
        self.s = vm.s
        if transport == Transport.PCI_LEGACY:
            self.space, self.size, self.status_addr = E.Space.PIO, 1, base + 18
            self.isr_addr: int | None = base + 19
            self.id = f"pio-0x{base:x}"
        elif transport == Transport.MMIO:
            self.space, self.size, self.status_addr = E.Space.MMIO, 4, base + 0x70
            self.isr_addr = base + 0x60
            self.id = f"mmio-0x{base:x}"
        else:
            self.space, self.size, self.status_addr = E.Space.MMIO, 1, base + 0x14
            self.isr_addr = fn.isr if fn is not None else None
            self.id = f"mmio-0x{base:x}"
        if fn is not None:
            self.id = fn.name
        self.init_values = LEGACY_INIT if transport == Transport.PCI_LEGACY else MODERN_INIT
        self.status = 0
        self.open: Truth | None = None

    def hint(self, named: bool = False) -> DeviceHint:
        self.exact_irq = True
        return DeviceHint(self.space, self.status_addr, config_vector=self.vector, gsi=self.gsi,
                          transport=self.transport if named else "",
                          vm=self.vm.name if named else "")

    # raw accesses
    def access(self, op: str, value: int, addr: int | None = None, size: int | None = None,
               gap: int | None = None) -> int:
        ts = self.s.step(gap)
        self.s.emit(E.RegisterAccess(ts, self.vm.pid, self.vm.tid, self.space, op,
                                     self.status_addr if addr is None else addr,
                                     size or self.size, value))
        return ts

    def write(self, value: int, gap: int | None = None) -> int:
        ts = self.access(E.Op.WRITE, value, gap=gap)
        self.status = value
        ep = self.open
        if ep is not None:
            if value == 0 and ep.reset_written_ns is None:
                ep.reset_written_ns = ts
            if value & E.DRIVER_OK and (ep.reset_written_ns is not None):
                ep.driver_ok_ns = ts
                ep.outcome = "recovered"
                self.open = None
        return ts

    def read(self, value: int | None = None, gap: int | None = None) -> int:
        value = self.status if value is None else value
        ts = self.access(E.Op.READ, value, gap=gap)
        ep = self.open
        if ep is not None:
            if value & E.DEVICE_NEEDS_RESET and ep.guest_saw_ns is None:
                ep.guest_saw_ns = ts
            if value == 0 and ep.reset_written_ns is not None and ep.reset_done_ns is None:
                ep.reset_done_ns = ts
        return ts

    # driver behaviour
    def init(self) -> int:
        """Reset and initialise like a Linux driver: write 0, read 0, then each step; after
        FEATURES_OK, re-read the status to check the device kept it (virtio 1.x 3.1.1 step 6)."""
        self.write(0)
        self.read(0)
        ts = 0
        for v in self.init_values[1:]:
            ts = self.write(v)
            if v & E.FEATURES_OK and not v & E.DRIVER_OK:
                self.read(v)
        return ts

    def config_interrupt(self, gap: int | None = None) -> int:
        """The VMM notifies a configuration change (MSI accepted, or INTx + ISR read)."""
        ts = self.s.step(gap)
        if self.vector is not None:
            self.s.emit(E.MsiInjected(ts, self.vm.pid, 7, 0, self.vector))
            ts = self.s.step(1)
            self.s.emit(E.ApicAccepted(ts, self.vm.pid, 7, 0, self.vector))
        elif self.gsi is not None:
            self.s.emit(E.IrqLine(ts, self.vm.pid, 7, self.gsi, 1))
            self.access(E.Op.READ, 0x2, addr=self.isr_addr)
            if self.transport == Transport.MMIO:     # a driver acknowledges what it read
                self.access(E.Op.WRITE, 0x2, addr=self.base + 0x64)
        return ts

    def needs_reset(self, notify: bool = True, react_gap: int | None = None) -> Truth:
        """The device sets 0x40 (and notifies); the guest reads the status and sees it."""
        self.status |= E.DEVICE_NEEDS_RESET
        start = self.config_interrupt() if notify and (self.vector or self.gsi) else None
        saw = self.read(gap=react_gap)
        known_irq = self.exact_irq and (self.vector is not None or self.gsi is not None)
        if not self.exact_irq:
            start = None     # raised, but when is not knowable: the episode starts at the read
        ep = Truth(self.vm.name, self.id,
                   Evidence.CONFIG_INTERRUPT if start is not None else Evidence.STATUS_READ,
                   start if start is not None else saw, guest_saw_ns=saw)
        self.s.episodes.append(ep)
        self.open = ep
        if start is None and known_irq:
            self.s.violations.append((self.vm.name, self.id, Rule.NEEDS_RESET_WITHOUT_NOTIFY))
        return ep

    def recover(self) -> int:
        """Reset and re-initialise (what a driver that handles NEEDS_RESET does)."""
        return self.init()

    def fail(self) -> int:
        """The driver gives up (sets FAILED); a driver may write it again: one failure."""
        if not self.status & E.FAILED:
            self.s.failures[(self.vm.name, self.id)] += 1
        return self.write(self.status | E.FAILED)

    def reinit_without_reset(self) -> None:
        self.s.violations.append((self.vm.name, self.id,
                                  Rule.REINIT_AFTER_FAILED if self.status & E.FAILED
                                  else Rule.BIT_CLEARED_WITHOUT_RESET))
        for v in self.init_values[1:]:
            self.write(v)


def merge(*scripts: Script) -> list[E.Event]:
    """Interleave several scripts' streams by timestamp (each is already in order)."""
    return list(heapq.merge(*(s.events for s in scripts), key=lambda e: e.ts_ns))


def run(events, config: CorrelatorConfig | None = None, flush: bool = True):
    c = Correlator(config or CorrelatorConfig())
    out = []
    for ev in events:
        out.extend(c.feed(ev))
    if flush:
        out.extend(c.flush())
    return c, out


# -- tests of the builder itself ----------------------------------------------------------

def test_builder_times_strictly_increase_and_truth_follows_the_script():
    s = Script()
    dev = s.vm(10, "a").device(vector=0x31)
    dev.init()
    ep = dev.needs_reset()
    dev.recover()
    ts = [e.ts_ns for e in s.events]
    assert ts == sorted(ts) and len(set(ts)) == len(ts)
    assert ep.outcome == "recovered"
    assert ep.start_ns < ep.guest_saw_ns < ep.reset_written_ns < ep.reset_done_ns < ep.driver_ok_ns
    kinds = [e.kind for e in s.events]
    assert kinds.count("apic") == 1 and kinds[0] == "vm"


def test_builder_records_misbehaviour_it_scripts():
    s = Script()
    dev = s.vm(10, "a").device(vector=0x31)
    dev.init()
    dev.needs_reset(notify=False)
    dev.fail()
    dev.reinit_without_reset()
    assert [v[2] for v in s.violations] == [Rule.NEEDS_RESET_WITHOUT_NOTIFY,
                                           Rule.REINIT_AFTER_FAILED]
