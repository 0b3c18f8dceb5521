"""What the device model asks capture to watch, and the devices it makes (docs/correlation.md
"The device model"), against PCI 3.0 and virtio 1.x.

Rules checked, each from the spec or the contract, never from the code's current values:

- PCI 3.0 6.1 / 6.2.5.1: a function exists once its vendor id is read; an all-ones vendor read
  is an empty slot (master abort), so a function unplugged there is gone; BARs are sized with
  all-ones and the mask read back, then assigned, and may be moved later by the OS; a 64-bit
  BAR's high dword is the next BAR.
- PCI 3.0 6.8.2 (MSI-X): message control bit 15 enable, bit 14 function mask; entries of 16
  bytes (address +0, data +8, vector control +12 bit 0 masked) in the BAR its table BIR names;
  an interrupt is delivered only from an unmasked entry with MSI-X enabled and not
  function-masked; with MSI-X off the function uses its INTx pin (the interrupt line register
  +0x3C names its line; 0xFF: not connected).
- x86 MSI: address 0xFEE << 20 | destination << 12, bit 2 logical mode; data bits 7:0 vector.
- virtio 1.x 4.1.4.3: common configuration msix_config +0x10 (the MSI-X entry of config
  changes; 0xFFFF = NO_VECTOR), device_status +0x14, config_generation +0x15, queue_select
  +0x16, queue_msix_vector +0x1A; 4.1.4.4 notify addresses base + n * multiplier; 4.1.4.5 ISR;
  4.1.4.8 / 4.1.5 legacy I/O: queue_select 14, notify 16, status 18, ISR 19, config vector 20,
  queue vector 22. 4.1.2.1: a transitional device (ids 0x1000-0x103F) has both interfaces.
- q35: PCIEXBAR at 00:00.0 +0x60 (bit 0 enable, bits 2:1 length 256/128/64 MiB) places the
  ECAM window capture must translate (`WatchEcam`).
- docs/correlation.md: the model is fed on arrival and what it implies is asked of capture at
  once (adds AND removes: `WatchRegister(add=False)`, `WatchInterrupt(add=False)`,
  `WatchDeviceBars(add=False)`, `WatchEcam(add=False)`); MSI-X table words are followed through
  the device-BAR span, never asked as watches; only the config vector or INTx line is watched
  (queue vectors are progress); the span replaces the previous one in one update; a device is
  named `pci-0000:bb:dd.f` with its type and transport (a transitional one's transport is the
  interface its driver uses, unknown until then); a config interrupt is attributed only on the
  exact vector and destination, or on the device's own unshared line; `checkpoint.dump`
  carries the model (MSI-X entries, msix_config, queue vectors) and each device's config
  vector; `Correlator.changes` is bumped whenever what checkpoint saves may have changed.
"""
from __future__ import annotations

import json

import pytest

from agent import events as E
from agent.correlate import Correlator, CorrelatorConfig
from agent.correlate.checkpoint import dump
from agent.model import (
    Evidence, Transport, WatchDeviceBars, WatchEcam, WatchInterrupt, WatchRegister,
)
from pciguest import Function, Guest

R = E.Register
PID = 4321
MS = 1_000_000
NOTIFY_WATCHED = 8          # docs: "the first 8 queue notify addresses"


class Host:
    """A Correlator fed every access of a guest as it happens; outputs are kept."""

    def __init__(self, pid: int = PID, config: CorrelatorConfig | None = None,
                 window: int = 0, **kw) -> None:
        self.c = Correlator(config or CorrelatorConfig(reorder_window_ns=window, **kw))
        self.t = 1_000_000_000
        self.out: list = []
        self.guests: dict[int, Guest] = {}
        self.guest = self.vm(pid)

    def vm(self, pid: int) -> Guest:
        g = self.guests[pid] = Guest(pid, pid + 1, self.clock, self.feed)
        return g

    def clock(self) -> int:
        self.t += 1000
        return self.t

    def feed(self, ev: E.Event) -> list:
        out = self.c.feed(ev)
        self.out.extend(out)
        return out

    def mark(self) -> int:
        return len(self.out)

    def since(self, mark: int, cls=None) -> list:
        return [o for o in self.out[mark:] if cls is None or isinstance(o, cls)]

    def access(self, space: str, op: str, addr: int, size: int, value: int,
               pid: int = PID) -> list:
        return self.feed(E.RegisterAccess(self.clock(), pid, pid + 1, space, op, addr, size,
                                          value))

    def apic(self, vector: int, apic: int = 0, pid: int = PID) -> None:
        self.feed(E.ApicAccepted(self.clock(), pid, pid + 1, apic, vector))

    def line(self, gsi: int, pid: int = PID) -> int:
        ts = self.clock()
        self.feed(E.IrqLine(ts, pid, pid + 1, gsi, 1))
        return ts

    def views(self):
        return {v.device: v for v in self.c.snapshot(self.t).devices}


def regs(out: list) -> list[tuple]:
    return [(o.pid, o.space, o.addr, o.register, o.add) for o in out
            if isinstance(o, WatchRegister)]


def modern_plan(fn: Function, pid: int = PID, add: bool = True) -> set[tuple]:
    """What virtio 4.1.4 and the contract's table say to watch for a modern function laid out
    as pciguest's (common +0, ISR +0x1000, notify +0x3000 with multiplier 4)."""
    b, m = fn.bar4, E.Space.MMIO
    want = {(pid, m, b + 0x14, R.STATUS, add), (pid, m, b + 0x15, R.CONFIG_GENERATION, add),
            (pid, m, b + 0x10, R.MSIX_CONFIG, add), (pid, m, b + 0x16, R.QUEUE_SELECT, add),
            (pid, m, b + 0x1A, R.QUEUE_MSIX_VECTOR, add), (pid, m, b + 0x1000, R.ISR, add)}
    want |= {(pid, m, b + 0x3000 + 4 * q, R.QUEUE_NOTIFY, add) for q in range(NOTIFY_WATCHED)}
    return want


def legacy_plan(io: int, pid: int = PID, add: bool = True) -> set[tuple]:
    p = E.Space.PIO
    return {(pid, p, io + 18, R.STATUS, add), (pid, p, io + 19, R.ISR, add),
            (pid, p, io + 20, R.MSIX_CONFIG, add), (pid, p, io + 14, R.QUEUE_SELECT, add),
            (pid, p, io + 22, R.QUEUE_MSIX_VECTOR, add), (pid, p, io + 16, R.QUEUE_NOTIFY, add)}


def irqs(out: list) -> list[WatchInterrupt]:
    return [o for o in out if isinstance(o, WatchInterrupt)]


def watched_regs(out: list) -> set[tuple]:
    """The registers capture watches after applying the outputs in order (checking that no
    watched register is added again and no unwatched one removed)."""
    now: set[tuple] = set()
    for pid, space, addr, reg, add in regs(out):
        key = (pid, space, addr, reg, True)
        assert (key in now) != add, f"{key} add={add} with {len(now)} watched"
        (now.add if add else now.discard)(key)
    return now


def vectors(out: list) -> list[WatchInterrupt]:
    return [o for o in out if isinstance(o, WatchInterrupt) and o.vector is not None]


def watched_irqs(out: list) -> set[tuple]:
    """What capture watches after applying the outputs in order; an add of a watched one or a
    remove of an unwatched one is a contract breach (capture's map would be wrong)."""
    now: set[tuple] = set()
    for o in irqs(out):
        key = (o.pid, "vector", o.vector) if o.vector is not None else (o.pid, "gsi", o.gsi)
        assert (key in now) != o.add, f"{o} with {now}"
        (now.add if o.add else now.discard)(key)
    return now


def bars(out: list) -> list[WatchDeviceBars]:
    return [o for o in out if isinstance(o, WatchDeviceBars)]


def model_of(c: Correlator, pid: int = PID) -> dict:
    for vm in dump(c)["vms"]:
        if vm["identity"]["pid"] == pid:
            return vm
    raise AssertionError(f"pid {pid} not dumped")


def bar_write(g: Guest, fn: Function, off: int, value: int) -> None:
    fn._w(off, 4, value)
    g.cfg_write(fn, off, value)


# -- registers (virtio 4.1.4, 4.1.5; contract table) ---------------------------------------

def test_a_programmed_modern_function_is_watched_exactly_at_its_planned_registers():
    h = Host()
    fn = Function(3 << 3, bar4=0xFD000000, bar1=0xFEB81000)
    h.guest.program(fn, config_vector=0x41, queue_vector=0x42)
    got = regs(h.out)
    # each register asked once, none removed, never an MSI-X table word
    assert sorted(got) == sorted(modern_plan(fn))
    # MSI-X read as off after the walk: its line, until MSI-X is on and msix_config set
    assert irqs(h.out)[0] == WatchInterrupt(PID, gsi=11)
    assert vectors(h.out) == [WatchInterrupt(PID, vector=0x41)]
    assert watched_irqs(h.out) == {(PID, "vector", 0x41)}


def test_each_vm_has_its_own_model_and_watches():
    h = Host()
    other = h.vm(PID + 10)
    a = Function(3 << 3, bar4=0xFD000000)
    b = Function(3 << 3, bar4=0xFC000000, bar1=0xFEB90000)     # same bdf in another guest
    h.guest.enumerate(a)
    other.enumerate(b)
    h.guest.walk_caps(a)
    other.walk_caps(b)
    assert sorted(regs(h.out)) == sorted(modern_plan(a) | modern_plan(b, pid=PID + 10))
    names = {(v.vm.pid, v.device) for v in h.c.snapshot(h.t).devices}
    assert names == {(PID, "pci-0000:00:03.0"), (PID + 10, "pci-0000:00:03.0")}


def test_a_transitional_function_is_watched_through_its_legacy_io_bar_from_enumeration():
    h = Host()
    fn = Function(4 << 3, type="net", transitional=True, io_bar=0xC040, bar4=0xFD000000)
    h.guest.enumerate(fn)
    # no capability walked yet: only the legacy interface is known (4.1.5)
    assert sorted(regs(h.out)) == sorted(legacy_plan(0xC040))
    m = h.mark()
    h.guest.walk_caps(fn)
    assert sorted(regs(h.since(m))) == sorted(modern_plan(fn))


def test_moving_the_structures_bar_removes_exactly_the_old_registers_and_adds_the_new():
    h = Host()
    fn = Function(3 << 3, bar4=0xFD000000)
    h.guest.program(fn, config_vector=0x41)
    m = h.mark()
    bar_write(h.guest, fn, 0x20, 0xFC000004)           # the OS moves BAR4
    fn.bar4 = 0xFC000000
    got = regs(h.since(m))
    removed = {r for r in got if not r[4]}
    old = Function(3 << 3, bar4=0xFD000000)
    assert removed == modern_plan(old, add=False)
    assert {r for r in got if r[4]} == modern_plan(fn)
    assert len(got) == len(removed) + len(modern_plan(fn))
    # the config vector did not change: its watch stays
    assert irqs(h.since(m)) == []
    # the device's msix_config is followed at its new address, not at the old one
    fn1 = Function(3 << 3)
    h.guest.msix_entry(fn1, 1, 0x52)
    m = h.mark()
    h.access(E.Space.MMIO, E.Op.WRITE, 0xFD000010, 2, 1)
    assert irqs(h.since(m)) == []
    h.access(E.Space.MMIO, E.Op.WRITE, 0xFC000010, 2, 1)
    assert irqs(h.since(m)) == [WatchInterrupt(PID, vector=0x41, add=False),
                                WatchInterrupt(PID, vector=0x52)]


def test_moving_the_msix_table_bar_follows_the_table_without_asking_capture_for_its_words():
    h = Host()
    fn = Function(3 << 3, bar4=0xFD000000, bar1=0xFEB80000)
    h.guest.program(fn, config_vector=0x41)
    m = h.mark()
    bar_write(h.guest, fn, 0x14, 0xFEA00000)            # the OS moves BAR1 (MSI-X table)
    assert regs(h.since(m)) == []                        # table words: no watch either way
    # entry 1 programmed at the new place, and msix_config (unchanged address) moved to it
    h.guest.msix_entry(Function(3 << 3, bar1=0xFEA00000), 1, 0x53)
    m = h.mark()
    h.access(E.Space.MMIO, E.Op.WRITE, fn.bar4 + 0x10, 2, 1)
    assert irqs(h.since(m)) == [WatchInterrupt(PID, vector=0x41, add=False),
                                WatchInterrupt(PID, vector=0x53)]
    # a write at the table's old place is nothing of the device any more
    m = h.mark()
    h.access(E.Space.MMIO, E.Op.WRITE, 0xFEB80018, 4, 0x60)
    assert irqs(h.since(m)) == []


def replace_by_e1000(h: Host, bdf: int) -> None:
    """Another (non-virtio) function now answers in the slot: its vendor/device ids read."""
    h.access(E.Space.PCICFG, E.Op.READ, E.pcicfg_addr(bdf >> 8, (bdf >> 3) & 31, bdf & 7, 0),
             4, 0x100E8086)


def test_a_function_replaced_by_a_non_virtio_one_loses_every_watch_and_back_gets_them_again():
    h = Host()
    fn = Function(3 << 3, bar4=0xFD000000, bar1=0xFEB80000)
    h.guest.program(fn, config_vector=0x41)
    m = h.mark()
    replace_by_e1000(h, 3 << 3)
    assert sorted(regs(h.since(m))) == sorted(modern_plan(fn, add=False))
    assert irqs(h.since(m)) == [WatchInterrupt(PID, vector=0x41, add=False)]
    assert bars(h.since(m)) == [WatchDeviceBars(PID, 0xFD000000, 0xFEB81000 - 0xFD000000,
                                                add=False)]
    m = h.mark()
    fn2 = Function(3 << 3, bar4=0xFD000000, bar1=0xFEB80000)
    h.guest.program(fn2, config_vector=0x41)
    assert watched_regs(h.out) == modern_plan(fn2)
    assert watched_irqs(h.out) == {(PID, "vector", 0x41)}


def test_an_unplugged_function_loses_every_watch():
    h = Host()
    fn = Function(3 << 3, bar4=0xFD000000, bar1=0xFEB80000)
    h.guest.program(fn, config_vector=0x41)
    m = h.mark()
    h.guest.probe_empty(3 << 3)                          # master abort: the slot is empty
    assert sorted(regs(h.since(m))) == sorted(modern_plan(fn, add=False))
    assert watched_irqs(h.out) == set()
    assert bars(h.since(m)) == [WatchDeviceBars(PID, 0xFD000000, 0xFEB81000 - 0xFD000000,
                                                add=False)]


def test_a_non_virtio_function_is_watched_nowhere():
    h = Host()
    # an e1000 (8086:100e) enumerated like any function: ids, BARs, line
    fn = Function(5 << 3, bar4=0xFD000000)
    fn._w(0x00, 4, 0x100E8086)
    h.guest.program(fn, config_vector=0x41)
    assert regs(h.out) == [] and irqs(h.out) == [] and bars(h.out) == []
    assert h.c.snapshot(h.t).devices == []


# -- ECAM (q35 PCIEXBAR) ---------------------------------------------------------------------

def pciexbar(h: Host, value: int, high: int = 0, pid: int = PID) -> list:
    host = E.pcicfg_addr(0, 0, 0, 0)
    out = h.access(E.Space.PCICFG, E.Op.READ, host, 4, 0x29C08086, pid=pid)   # q35 MCH ids
    out += h.access(E.Space.PCICFG, E.Op.WRITE, host + 0x64, 4, high, pid=pid)
    out += h.access(E.Space.PCICFG, E.Op.WRITE, host + 0x60, 4, value, pid=pid)
    return [o for o in out if isinstance(o, WatchEcam)]


def test_the_ecam_window_is_asked_moved_and_closed_per_vm():
    h = Host()
    assert pciexbar(h, 0xB0000001) == [WatchEcam(PID, 0xB0000000, 256 << 20)]
    # moved and shrunk to 64 MiB (length 10b): the old window goes, then the new one comes
    assert pciexbar(h, 0xC0000005) == [WatchEcam(PID, 0xB0000000, 256 << 20, add=False),
                                       WatchEcam(PID, 0xC0000000, 64 << 20)]
    # the same value again: nothing to ask
    assert pciexbar(h, 0xC0000005) == []
    # another VM's window is its own
    assert pciexbar(h, 0xE0000003, pid=PID + 1) == [WatchEcam(PID + 1, 0xE0000000, 128 << 20)]
    # closed (enable bit off): forgotten
    assert pciexbar(h, 0xC0000004) == [WatchEcam(PID, 0xC0000000, 64 << 20, add=False)]
    # above 4 GiB: the high dword is part of the base
    assert pciexbar(h, 0x00000001, high=0x8) == [WatchEcam(PID, 0x8_0000_0000, 256 << 20)]


# -- the device-BAR span (WatchDeviceBars) ---------------------------------------------------

def test_the_span_covers_every_virtio_memory_bar_of_the_vm_and_grows_without_a_gap():
    h = Host()
    a = Function(3 << 3, bar4=0xFD000000, bar1=0xFEB80000)
    h.guest.enumerate(a)
    b = Function(4 << 3, bar4=0xFC000000, bar1=0xFEB84000)   # lower start, higher end
    h.guest.enumerate(b)
    got = bars(h.out)
    assert got[-1] == WatchDeviceBars(PID, 0xFC000000, 0xFEB85000 - 0xFC000000)
    # the span is replaced, never removed while there is one (no moment without a span)
    assert all(o.add for o in got)
    # nothing new to ask when the span does not change
    m = h.mark()
    h.guest.walk_caps(a)
    h.guest.msix_enable(a)
    assert bars(h.since(m)) == []


def found_assigned(bar4: int, bar1: int) -> tuple[Host, Function]:
    """The agent started after the firmware: BAR1 and BAR4 (64-bit) hold their addresses and
    the driver reads them, never sizes them."""
    h = Host()
    fn = Function(3 << 3, bar4=bar4, bar1=bar1)
    fn._w(0x14, 4, fn.bar1)
    fn._w(0x20, 4, fn.bar4 | 0x4)
    for off in (0x00, 0x08, 0x14, 0x20, 0x24):
        h.guest.cfg_read(fn, off)
    return h, fn


def test_a_bar_found_assigned_without_its_sizing_counts_as_its_first_page():
    h, _ = found_assigned(bar4=0xFD000000, bar1=0xFEB80000)
    assert bars(h.out)[-1] == WatchDeviceBars(PID, 0xFD000000, 0xFEB81000 - 0xFD000000)
    # sized later: the real size (BAR4: 16 KiB; BAR1 stays the end)
    h2, fn2 = found_assigned(bar4=0xFEB90000, bar1=0xFEB80000)
    assert bars(h2.out)[-1] == WatchDeviceBars(PID, 0xFEB80000, 0xFEB91000 - 0xFEB80000)
    m = h2.mark()
    h2.guest.cfg_write(fn2, 0x20, 0xFFFFFFFF)
    h2.access(E.Space.PCICFG, E.Op.READ, E.pcicfg_addr(0, 3, 0, 0x20), 4, 0xFFFFC004)
    h2.guest.cfg_write(fn2, 0x20, fn2.bar4 | 0x4)
    assert bars(h2.since(m))[-1] == WatchDeviceBars(PID, 0xFEB80000,
                                                    0xFEB94000 - 0xFEB80000)


def sized_function(h: Host, bdf: int, bars64: dict[int, tuple[int, int]]) -> None:
    """A virtio function (1af4:1041) whose 64-bit memory BARs at the given offsets are sized
    (all-ones, mask read) and assigned: {offset: (base, size)}."""
    cfg = lambda off: E.pcicfg_addr(bdf >> 8, (bdf >> 3) & 31, bdf & 7, off)
    h.access(E.Space.PCICFG, E.Op.READ, cfg(0), 4, 0x10411AF4)
    for off, (base, size) in bars64.items():
        h.access(E.Space.PCICFG, E.Op.WRITE, cfg(off), 4, 0xFFFFFFFF)
        h.access(E.Space.PCICFG, E.Op.READ, cfg(off), 4, (~(size - 1) & 0xFFFFFFFF) | 0x4)
        h.access(E.Space.PCICFG, E.Op.WRITE, cfg(off), 4, (base & 0xFFFFFFFF) | 0x4)
        h.access(E.Space.PCICFG, E.Op.WRITE, cfg(off + 4), 4, base >> 32)


def test_bars_past_the_52_bit_physical_address_space_are_left_out_of_the_span():
    # x86-64 guest physical addresses have at most 52 bits: a BAR ending past 2**52 is not
    # where a guest's writes can land; one ending exactly at 2**52 is
    # (high dwords with bit 0 set: see test_the_high_dword_of_a_64_bit_bar_is_no_bar)
    top = 1 << 52
    h = Host()
    sized_function(h, 3 << 3, {0x10: (top + (1 << 32), 0x1000),
                               0x18: (top - 0x2000, 0x1000), 0x20: (top - 0x1000, 0x1000)})
    assert bars(h.out)[-1] == WatchDeviceBars(PID, top - 0x2000, 0x2000)
    h2 = Host()
    sized_function(h2, 3 << 3, {0x10: (top + (1 << 32), 0x1000), 0x18: (0xFD000000, 0x4000)})
    assert bars(h2.out) == [WatchDeviceBars(PID, 0xFD000000, 0x4000)]


def test_the_high_dword_of_a_64_bit_bar_is_no_bar():
    # PCI 3.0 6.2.5.1: a 64-bit BAR takes two dwords; the second is its high address half
    h = Host()
    sized_function(h, 3 << 3, {0x20: (0x38_0000_0000, 0x4000)})
    assert bars(h.out) == [WatchDeviceBars(PID, 0x38_0000_0000, 0x4000)]


def test_the_span_shrinks_to_the_bars_left_and_goes_with_the_last_function():
    h = Host()
    a = Function(3 << 3, bar4=0xFD000000, bar1=0xFEB80000)
    b = Function(4 << 3, bar4=0xFC000000, bar1=0xFEB84000)
    h.guest.enumerate(a)
    h.guest.enumerate(b)
    m = h.mark()
    replace_by_e1000(h, 4 << 3)
    assert bars(h.since(m)) == [WatchDeviceBars(PID, 0xFD000000, 0xFEB81000 - 0xFD000000)]
    m = h.mark()
    replace_by_e1000(h, 3 << 3)
    assert bars(h.since(m)) == [WatchDeviceBars(PID, 0xFD000000, 0xFEB81000 - 0xFD000000,
                                                add=False)]


# -- interrupts (PCI 6.8.2, virtio 4.1.4.3 msix_config) ---------------------------------------

def test_the_config_vector_is_msix_config_s_entry_not_entry_0():
    """Entry numbers are the guest's choice: here queue 0 uses entry 0 and config changes
    entry 1. Only entry 1's vector is watched and only it is a config interrupt."""
    h = Host()
    fn = Function(3 << 3, msix_vectors=2)
    g = h.guest
    g.enumerate(fn)
    g.walk_caps(fn)
    g.msix_enable(fn, masked=True)
    g.msix_entry(fn, 0, 0x42)
    g.msix_entry(fn, 1, 0x41)
    g.msix_enable(fn)
    g.msix_config(fn, 1)
    g.queue_vector(fn, 0, 0)
    assert vectors(h.out) == [WatchInterrupt(PID, vector=0x41)]
    assert watched_irqs(h.out) == {(PID, "vector", 0x41)}
    h.apic(0x42)
    assert h.views()["pci-0000:00:03.0"].config_interrupts_total == 0
    h.apic(0x41)
    assert h.views()["pci-0000:00:03.0"].config_interrupts_total == 1
    f = model_of(h.c)["pci"]["functions"]
    [virtio] = [x for x in f if x["bdf"] == 3 << 3]
    assert virtio["msix_config"] == 1
    assert virtio["queue_select"] == 0 and virtio["queue_vectors"] == {"0": 0}
    [dev] = model_of(h.c)["devices"]
    assert (dev["msix_config"], dev["config_vector"], dev["config_dest"]) == (1, 0x41, 0)


def test_queue_vectors_follow_queue_select_of_each_interface():
    h = Host()
    fn = Function(3 << 3)
    h.guest.program(fn, config_vector=0x41)
    h.guest.queue_vector(fn, 3, 1)
    h.guest.queue_vector(fn, 5, 0xFFFF)
    tfn = Function(4 << 3, type="blk", transitional=True, io_bar=0xC080, bar4=0xFC000000,
                   bar1=0xFEB90000)
    h.guest.program(tfn, config_vector=0x45)
    h.guest.queue_vector(tfn, 2, 1)
    f = {x["bdf"]: x for x in model_of(h.c)["pci"]["functions"]}
    assert f[3 << 3]["queue_vectors"] == {"3": 1, "5": 0xFFFF}
    assert f[3 << 3]["queue_select"] == 5
    assert f[4 << 3]["queue_vectors"] == {"2": 1} and f[4 << 3]["msix_config"] == 0
    # the legacy config vector register (+20) names the config entry like msix_config does
    assert WatchInterrupt(PID, vector=0x45) in h.out
    # queue vectors are progress, not watched
    assert {o.vector for o in vectors(h.out)} == {0x41, 0x45}
    assert watched_irqs(h.out) == {(PID, "vector", 0x41), (PID, "vector", 0x45)}


def test_msix_config_values_are_16_bit_entry_numbers():
    h = Host()
    fn = Function(3 << 3)
    h.guest.program(fn, config_vector=0x41)
    h.guest.msix_entry(fn, 1, 0x52)
    m = h.mark()
    # a 4-byte write over msix_config (+0x10) and its neighbour: bits 15:0 are msix_config
    h.access(E.Space.MMIO, E.Op.WRITE, fn.bar4 + 0x10, 4, 0x0003_0001)
    assert irqs(h.since(m)) == [WatchInterrupt(PID, vector=0x41, add=False),
                                WatchInterrupt(PID, vector=0x52)]
    h.access(E.Space.MMIO, E.Op.WRITE, fn.bar4 + 0x16, 4, 0x0001_0007)
    h.access(E.Space.MMIO, E.Op.WRITE, fn.bar4 + 0x1A, 4, 0x0002_0001)
    f = model_of(h.c)["pci"]["functions"][-1]
    assert f["queue_select"] == 7 and f["queue_vectors"] == {"7": 1}


def test_a_config_vector_is_watched_only_while_deliverable():
    h = Host()
    fn = Function(3 << 3, line=10)
    g = h.guest
    g.enumerate(fn)
    g.walk_caps(fn)
    assert irqs(h.out) == [WatchInterrupt(PID, gsi=10)]     # MSI-X read as off: INTx
    g.msix_enable(fn)
    g.msix_config(fn, 0)              # MSI-X on, entry 0 not programmed: neither line nor vector
    assert watched_irqs(h.out) == set()
    m = h.mark()
    g.msix_entry(fn, 0, 0x41, masked=True)
    assert irqs(h.since(m)) == []     # entry masked: not deliverable
    g.msix_entry(fn, 0, 0x41)         # unmasked: the vector
    assert irqs(h.since(m)) == [WatchInterrupt(PID, vector=0x41)]
    m = h.mark()
    h.guest.msix_entry(fn, 0, 0x41, masked=True)
    assert irqs(h.since(m)) == [WatchInterrupt(PID, vector=0x41, add=False)]
    m = h.mark()
    h.guest.msix_entry(fn, 0, 0x41)
    assert irqs(h.since(m)) == [WatchInterrupt(PID, vector=0x41)]
    m = h.mark()
    h.access(E.Space.MMIO, E.Op.WRITE, fn.bar4 + 0x10, 2, 0xFFFF)   # NO_VECTOR
    assert irqs(h.since(m)) == [WatchInterrupt(PID, vector=0x41, add=False)]


def test_msix_control_and_line_writes_move_the_interrupt_watch():
    h = Host()
    fn = Function(3 << 3, line=10)
    h.guest.program(fn, config_vector=0x41)
    assert watched_irqs(h.out) == {(PID, "vector", 0x41)}
    g = h.guest
    fn2 = Function(4 << 3, line=10, bar4=0xFC000000, bar1=0xFEB84000)
    g.enumerate(fn2)
    g.walk_caps(fn2)
    g.msix_entry(fn2, 0, 0x51)
    g.msix_config(fn2, 0)
    assert watched_irqs(h.out) == {(PID, "vector", 0x41), (PID, "gsi", 10)}
    m = h.mark()
    g.msix_enable(fn2)                        # MSI-X on after msix_config: the vector now
    assert irqs(h.since(m)) == [WatchInterrupt(PID, gsi=10, add=False),
                                WatchInterrupt(PID, vector=0x51)]
    m = h.mark()
    h.guest.msix_enable(fn, on=False)         # MSI-X off: the INTx line
    assert irqs(h.since(m)) == [WatchInterrupt(PID, vector=0x41, add=False),
                                WatchInterrupt(PID, gsi=10)]
    m = h.mark()
    fn._w(0x3C, 1, 0xFF)
    h.guest.cfg_write(fn, 0x3C, 0xFF, 1)     # not connected
    assert irqs(h.since(m)) == [WatchInterrupt(PID, gsi=10, add=False)]


def test_a_function_masked_msix_function_has_no_intx_line():
    """PCI 3.0 6.8.2.3: with MSI-X Enable set the function must not use INTx#, whatever the
    Function Mask; masked messages are pending, not sent another way."""
    h = Host()
    fn = Function(3 << 3, line=10)
    h.guest.program(fn, config_vector=0x41)
    m = h.mark()
    h.guest.msix_enable(fn, masked=True)
    assert irqs(h.since(m)) == [WatchInterrupt(PID, vector=0x41, add=False)]
    [dev] = model_of(h.c)["devices"]
    assert (dev["gsi"], dev["config_vector"]) == (None, None)
    m = h.mark()
    h.guest.msix_enable(fn)
    assert irqs(h.since(m)) == [WatchInterrupt(PID, vector=0x41)]


def test_a_function_without_msix_uses_its_line_and_0xff_is_none():
    h = Host()
    fn = Function(3 << 3, msix_vectors=0, line=10)
    h.guest.program(fn, config_vector=None)
    assert irqs(h.out) == [WatchInterrupt(PID, gsi=10)]
    h2 = Host()
    fn2 = Function(3 << 3, msix_vectors=0, line=0xFF)
    h2.guest.program(fn2, config_vector=None)
    assert irqs(h2.out) == []
    [dev] = model_of(h2.c)["devices"]
    assert (dev["gsi"], dev["config_vector"]) == (None, None)


def test_a_function_whose_msix_state_was_not_read_has_no_interrupt_watched():
    # the capability list read up to the MSI-X capability, not its message control: whether the
    # function uses MSI-X or its line is unknown, so neither is watched
    h = Host()
    fn = Function(3 << 3, line=10)
    h.guest.enumerate(fn)
    h.guest.cfg_read(fn, 0x06, 2)
    h.guest.cfg_read(fn, 0x34, 1)
    h.guest.cfg_read(fn, 0x40, 1)
    h.guest.cfg_read(fn, 0x41, 1)
    for ptr in (0x4C, 0x5C, 0x6C, 0x7C):
        for off, size in ((0, 1), (1, 1), (3, 1), (4, 1), (8, 4), (12, 4)):
            h.guest.cfg_read(fn, ptr + off, size)
    h.guest.cfg_read(fn, 0x7C + 16, 4)
    assert regs(h.out) and irqs(h.out) == []


def test_two_functions_watch_both_vectors_and_a_gone_one_only_its_own():
    h = Host()
    a = Function(3 << 3, bar4=0xFD000000, bar1=0xFEB80000)
    b = Function(4 << 3, bar4=0xFC000000, bar1=0xFEB84000)
    h.guest.program(a, config_vector=0x41)
    h.guest.program(b, config_vector=0x51)
    assert vectors(h.out) == [WatchInterrupt(PID, vector=0x41), WatchInterrupt(PID, vector=0x51)]
    assert watched_irqs(h.out) == {(PID, "vector", 0x41), (PID, "vector", 0x51)}
    m = h.mark()
    replace_by_e1000(h, 3 << 3)
    assert irqs(h.since(m)) == [WatchInterrupt(PID, vector=0x41, add=False)]


def test_functions_beyond_the_model_bound_leave_the_others_watched():
    # 256 functions per VM (LRU): whatever falls out, the function in use keeps its watch
    h = Host()
    a = Function(3 << 3, bar4=0xFD000000, bar1=0xFEB80000)
    b = Function(4 << 3, bar4=0xFC000000, bar1=0xFEB84000)
    h.guest.program(a, config_vector=0x41)
    h.guest.program(b, config_vector=0x51)
    h.guest.msix_config(b, 0)                  # b touched last
    for i in range(255):
        bus = 1 + i // 32
        h.access(E.Space.PCICFG, E.Op.READ, E.pcicfg_addr(bus, i % 32, 0, 0), 4, 0x12348086)
    h.guest.msix_config(b, 0)                  # any reprogramming looks again
    assert (PID, "vector", 0x51) in watched_irqs(h.out)


def test_an_evicted_device_s_vector_is_unwatched_and_the_others_stay():
    h = Host(max_devices=1)
    a = Function(3 << 3, bar4=0xFD000000, bar1=0xFEB80000)
    b = Function(4 << 3, bar4=0xFC000000, bar1=0xFEB84000)
    h.guest.program(a, config_vector=0x41)
    h.guest.program(b, config_vector=0x51)          # a evicted (max_devices=1)
    assert [v.device for v in h.c.snapshot(h.t).devices] == ["pci-0000:00:04.0"]
    h.guest.msix_config(b, 0)
    assert watched_irqs(h.out) == {(PID, "vector", 0x51)}


# -- config interrupts attributed from the model ------------------------------------------------

def init_driver(h: Host, status_addr: int, space: str = E.Space.MMIO) -> None:
    for v in (0, 1, 3, 11, 15):
        h.access(space, E.Op.WRITE, status_addr, 1, v)


def line_rise_then_isr_and_status_read(h: Host, line: int, fn: Function, name: str):
    """A line rises, the driver reads ISR (config bit) then status with NEEDS_RESET: the
    device's open episode and the rise's time."""
    rise = h.line(line)
    h.access(E.Space.MMIO, E.Op.READ, fn.bar4 + 0x1000, 1, 0x2)
    h.access(E.Space.MMIO, E.Op.READ, fn.bar4 + 0x14, 1, 0x4F)
    return h.views()[name].open_episode, rise


def test_a_config_interrupt_counts_only_on_its_vector_and_destination_as_reprogrammed():
    h = Host()
    fn = Function(3 << 3)
    h.guest.program(fn, config_vector=0x41, dest=1)
    init_driver(h, fn.bar4 + 0x14)
    name = "pci-0000:00:03.0"
    h.apic(0x41, apic=0)
    assert h.views()[name].config_interrupts_total == 0       # another CPU's 0x41
    h.apic(0x41, apic=1)
    assert h.views()[name].config_interrupts_total == 1
    # affinity moved to CPU 2, same vector
    h.guest.msix_entry(fn, 0, 0x41, dest=2)
    h.apic(0x41, apic=1)
    assert h.views()[name].config_interrupts_total == 1
    h.apic(0x41, apic=2)
    assert h.views()[name].config_interrupts_total == 2
    # a new vector: the old one is nobody's config vector any more
    h.guest.msix_entry(fn, 0, 0x61, dest=2)
    h.apic(0x41, apic=2)
    assert h.views()[name].config_interrupts_total == 2
    h.apic(0x61, apic=2)
    assert h.views()[name].config_interrupts_total == 3
    [dev] = model_of(h.c)["devices"]
    assert (dev["config_vector"], dev["config_dest"]) == (0x61, 2)


def test_moving_off_a_vector_another_device_now_uses_leaves_it_that_devices():
    h = Host()
    a = Function(3 << 3, bar4=0xFD000000, bar1=0xFEB80000)
    b = Function(4 << 3, bar4=0xFC000000, bar1=0xFEB84000)
    h.guest.program(a, config_vector=0x41, dest=0)
    h.guest.program(b, config_vector=0x51, dest=1)
    init_driver(h, a.bar4 + 0x14)
    init_driver(h, b.bar4 + 0x14)
    h.guest.msix_entry(b, 0, 0x41, dest=1)       # b moves onto 0x41 (on CPU 1)
    h.guest.msix_entry(a, 0, 0x71, dest=0)       # then a moves off it
    h.apic(0x41, apic=1)
    v = h.views()
    assert v["pci-0000:00:04.0"].config_interrupts_total == 1
    assert v["pci-0000:00:03.0"].config_interrupts_total == 0
    h.apic(0x71, apic=0)
    assert h.views()["pci-0000:00:03.0"].config_interrupts_total == 1


def test_an_msix_devices_line_register_is_no_shared_line_for_an_intx_device():
    """A function using MSI-X does not use its INTx pin (PCI 6.8.2): an INTx device whose line
    register has the same value is the only one on that line, so its config interrupt is
    timed by the line's rise."""
    h = Host()
    a = Function(3 << 3, bar4=0xFD000000, bar1=0xFEB80000, line=11)
    b = Function(4 << 3, bar4=0xFC000000, bar1=0xFEB84000, msix_vectors=0, line=11)
    h.guest.program(a, config_vector=0x41)
    h.guest.program(b, config_vector=None)
    init_driver(h, a.bar4 + 0x14)
    init_driver(h, b.bar4 + 0x14)
    ep, rise = line_rise_then_isr_and_status_read(h, 11, b, "pci-0000:00:04.0")
    assert (ep.evidence, ep.start_ns) == (Evidence.CONFIG_INTERRUPT, rise)
    [dev_a] = [d for d in model_of(h.c)["devices"] if d["id"] == "pci-0000:00:03.0"]
    assert dev_a["gsi"] is None


def test_an_intx_device_whose_line_another_devices_hint_shares_is_not_timed():
    from agent.correlate import DeviceHint
    cfg = CorrelatorConfig(reorder_window_ns=0, hints=(DeviceHint(
        E.Space.MMIO, 0xFE800070, transport=Transport.MMIO, gsi=11, vm=f"pid-{PID}"),))
    h = Host(config=cfg)
    b = Function(4 << 3, bar4=0xFC000000, bar1=0xFEB84000, msix_vectors=0, line=11)
    h.guest.program(b, config_vector=None)
    init_driver(h, b.bar4 + 0x14)
    ep, _ = line_rise_then_isr_and_status_read(h, 11, b, "pci-0000:00:04.0")
    assert ep.evidence == Evidence.STATUS_READ


def test_an_intx_device_switching_to_msix_is_timed_by_its_vector_not_its_line():
    h = Host()
    fn = Function(3 << 3, line=10)
    g = h.guest
    g.enumerate(fn)
    g.walk_caps(fn)
    init_driver(h, fn.bar4 + 0x14)
    [dev] = model_of(h.c)["devices"]
    assert (dev["gsi"], dev["config_vector"]) == (10, None)
    g.msix_entry(fn, 0, 0x41)
    g.msix_config(fn, 0)
    g.msix_enable(fn)
    [dev] = model_of(h.c)["devices"]
    assert (dev["gsi"], dev["config_vector"]) == (None, 0x41)
    # a rise of line 10 and an ISR read are no longer the config interrupt's timing
    ep, _ = line_rise_then_isr_and_status_read(h, 10, fn, "pci-0000:00:03.0")
    assert ep.evidence == Evidence.STATUS_READ


# -- the device (name, type, transport) ------------------------------------------------------

def test_the_device_is_named_by_its_bus_device_function_with_its_type():
    h = Host()
    bdf = (1 << 8) | (0x1F << 3) | 7
    fn = Function(bdf, type="net", bar4=0xFD000000)
    h.guest.program(fn, config_vector=0x41)
    [view] = h.c.snapshot(h.t).devices
    assert (view.device, view.type, view.transport) == ("pci-0000:01:1f.7", "net",
                                                       Transport.PCI_MODERN)
    assert view.vm.pid == PID and view.status == 0 and view.resets_total == 0


def test_a_device_exists_before_its_driver_and_its_first_reset_is_counted():
    h = Host()
    fn = Function(3 << 3, type="blk")
    h.guest.program(fn, config_vector=0x41)
    assert h.c.stats()["devices_discovered"] == 1
    init_driver(h, fn.bar4 + 0x14)
    [view] = h.c.snapshot(h.t).devices
    assert (view.device, view.resets_total, view.status) == ("pci-0000:00:03.0", 1, 15)
    assert h.c.stats()["devices_discovered"] == 1


def test_a_transitional_device_s_transport_is_unknown_until_driven_and_then_kept():
    h = Host()
    fn = Function(3 << 3, type="net", transitional=True, io_bar=0xC040, bar4=0xFD000000)
    h.guest.enumerate(fn)
    [view] = h.c.snapshot(h.t).devices
    assert (view.device, view.type, view.transport) == ("pci-0000:00:03.0", "net",
                                                       Transport.UNKNOWN)
    [dev] = model_of(h.c)["devices"]
    assert dev["layout"] == [Transport.PCI_LEGACY, E.Space.PIO, 0xC040]
    h.guest.walk_caps(fn)          # its modern interface is now known too
    [dev] = model_of(h.c)["devices"]
    assert dev["layout"] == [Transport.PCI_MODERN, E.Space.MMIO, 0xFD000000]
    assert dev["transport"] == Transport.UNKNOWN
    # the driver picks legacy I/O
    for v in (0, 1, 3, 7):
        h.access(E.Space.PIO, E.Op.WRITE, 0xC040 + 18, 1, v)
    [view] = h.c.snapshot(h.t).devices
    assert (view.transport, view.resets_total) == (Transport.PCI_LEGACY, 1)
    # the guest reads its configuration again (a capability walk): still driven through legacy
    h.guest.walk_caps(fn)
    h.guest.cfg_read(fn, 0x00)
    [dev] = model_of(h.c)["devices"]
    assert dev["transport"] == Transport.PCI_LEGACY
    assert dev["layout"] == [Transport.PCI_LEGACY, E.Space.PIO, 0xC040]


def test_structures_moved_before_the_driver_start_are_where_the_device_is():
    h = Host()
    fn = Function(3 << 3, bar4=0xFD000000)
    h.guest.program(fn, config_vector=0x41)
    bar_write(h.guest, fn, 0x20, 0xFC000004)
    [dev] = model_of(h.c)["devices"]
    assert dev["layout"] == [Transport.PCI_MODERN, E.Space.MMIO, 0xFC000000]
    # the driver starts at the new place: that is this device, nothing is discovered
    init_driver(h, 0xFC000014)
    [view] = h.c.snapshot(h.t).devices
    assert (view.device, view.resets_total) == ("pci-0000:00:03.0", 1)
    # the old place is not the device's any more
    h.access(E.Space.MMIO, E.Op.WRITE, 0xFD000014, 1, 0)
    assert [v.resets_total for v in h.c.snapshot(h.t).devices
            if v.device == "pci-0000:00:03.0"] == [1]


def test_another_device_plugged_into_the_slot_takes_its_type_and_transport():
    h = Host()
    fn = Function(3 << 3, type="rng", bar4=0xFD000000)
    h.guest.program(fn, config_vector=0x41)
    h.guest.probe_empty(3 << 3)
    net = Function(3 << 3, type="net", transitional=True, io_bar=0xC040, bar4=0xFD000000)
    h.guest.enumerate(net)
    [view] = h.c.snapshot(h.t).devices
    assert (view.device, view.type, view.transport) == ("pci-0000:00:03.0", "net",
                                                       Transport.UNKNOWN)


def test_a_device_found_from_traffic_keeps_its_counters_under_its_pci_name():
    h = Host()
    init_driver(h, 0xFD000014)          # no enumeration seen: found from its init writes
    assert [v.device for v in h.c.snapshot(h.t).devices] == ["mmio-0xfd000000"]
    fn = Function(3 << 3, type="blk", bar4=0xFD000000)
    h.guest.program(fn, config_vector=0x41)
    [view] = h.c.snapshot(h.t).devices
    assert (view.device, view.type, view.transport, view.resets_total) == (
        "pci-0000:00:03.0", "blk", Transport.PCI_MODERN, 1)
    assert h.c.stats()["devices_renamed"] == 1
    assert h.c.stats()["devices_discovered"] == 1
    # the config vector is now its own
    h.apic(0x41)
    assert h.views()["pci-0000:00:03.0"].config_interrupts_total == 1


def test_a_device_named_from_query_pci_keeps_its_counters_when_enumeration_is_seen():
    """docs: a device found from traffic whose enumeration is seen later takes its PCI name;
    it stays the same device. One `run --vmm-pci-types on` already named keeps its counters
    too."""
    h = Host()
    init_driver(h, 0xFD000014)
    assert h.c.annotate_device(PID, E.Space.MMIO, 0xFD000014, "blk", bdf="0000:00:03.0")
    fn = Function(3 << 3, type="blk", bar4=0xFD000000)
    h.guest.program(fn, config_vector=0x41)
    [view] = h.c.snapshot(h.t).devices
    assert (view.device, view.resets_total) == ("pci-0000:00:03.0", 1)


def test_the_least_recently_active_device_is_evicted_when_over_the_bound():
    h = Host(max_devices=2)
    fns = [Function(s << 3, bar4=0xF0000000 + (s << 20), bar1=0xFEB80000 + (s << 12))
           for s in (3, 4, 5)]
    h.guest.program(fns[0], config_vector=0x41)
    h.guest.program(fns[1], config_vector=0x42)
    h.guest.program(fns[2], config_vector=0x43)
    assert sorted(v.device for v in h.c.snapshot(h.t).devices) == [
        "pci-0000:00:04.0", "pci-0000:00:05.0"]
    assert h.c.snapshot(h.t).evictions["device"] == 1


# -- models are bounded like VMs ---------------------------------------------------------------

def test_models_are_kept_for_twice_max_vms_vmms_least_recent_first_out():
    """The comment on Correlator._pci: device models per VMM pid, bounded like VMs
    (2 * max_vms); the least recently fed goes first."""
    h = Host(max_vms=2)
    fns = {}
    for i in range(4):
        pid = 100 + i
        g = h.vm(pid)
        fns[pid] = Function(3 << 3, bar4=0xFD000000 + (i << 20))
        g.enumerate(fns[pid])
    # VMM 100 fed again: 101 is now the least recent of the 4 kept ... then 104 arrives
    h.guests[100].cfg_read(fns[100], 0x08)
    g = h.vm(104)
    g.enumerate(Function(3 << 3, bar4=0xFD500000))
    for pid in (100, 102, 103, 101):
        m = h.mark()
        h.guests[pid].walk_caps(fns[pid])
        got = [r for r in regs(h.since(m)) if r[0] == pid and r[4]]
        if pid == 101:
            assert got == []           # its model went: its ids are unknown now
        else:
            assert sorted(got) == sorted(modern_plan(fns[pid], pid=pid))


# -- what the state file carries changes `changes` -------------------------------------------

def test_changes_is_bumped_when_the_device_model_makes_a_device():
    h = Host()
    fn = Function(3 << 3)
    g = h.guest
    g.enumerate(fn)
    before = h.c.changes
    state = json.dumps(dump(h.c), sort_keys=True)
    g.cfg_read(fn, 0x06, 2)
    g.walk_caps(fn)                  # the structures become known: a device with its registers
    assert json.dumps(dump(h.c), sort_keys=True) != state
    assert h.c.changes > before


def test_changes_is_bumped_when_the_guest_programs_what_the_state_file_carries():
    h = Host()
    fn = Function(3 << 3)
    h.guest.program(fn, config_vector=0x41)
    before, state = h.c.changes, json.dumps(dump(h.c), sort_keys=True)
    h.guest.msix_entry(fn, 1, 0x42, masked=True)      # Linux's placeholder programming
    assert json.dumps(dump(h.c), sort_keys=True) != state
    assert h.c.changes > before
    # the device's own msix_config (saved with the device) set while MSI-X is still off
    h2 = Host()
    fn2 = Function(3 << 3)
    h2.guest.enumerate(fn2)
    h2.guest.walk_caps(fn2)
    before = h2.c.changes
    h2.guest.msix_config(fn2, 0)
    assert [d["msix_config"] for d in model_of(h2.c)["devices"]] == [0]
    assert h2.c.changes > before


def device_state(c: Correlator) -> list:
    """What checkpoint.dump saves of the VMs and their devices (the model's bytes aside)."""
    return [(vm["identity"], vm["devices"]) for vm in dump(c)["vms"]]


class Watching(Host):
    """A Host that checks, for every event, that a change of what the state file saves of the
    devices comes with a bump of `changes` (processed at once: reorder window 0)."""

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.checked = 0

    def feed(self, ev: E.Event) -> list:
        before, state = self.c.changes, json.dumps(device_state(self.c), sort_keys=True)
        out = super().feed(ev)
        if json.dumps(device_state(self.c), sort_keys=True) != state:
            self.checked += 1
            assert self.c.changes > before, f"saved state changed, changes not bumped: {ev}"
        return out


def test_every_device_change_the_state_file_carries_bumps_changes():
    h = Watching()
    g = h.guest
    a = Function(3 << 3, bar4=0xFD000000, bar1=0xFEB80000, line=10)
    g.enumerate(a)
    g.walk_caps(a)                       # a device, its registers; INTx line 10 (MSI-X off)
    g.msix_enable(a)                     # no line any more
    g.msix_entry(a, 0, 0x41)
    g.msix_config(a, 0)                  # the config vector
    g.msix_entry(a, 0, 0x41, dest=1)     # affinity
    g.msix_entry(a, 0, 0x51, dest=1)     # vector
    bar_write(g, a, 0x20, 0xFC000004)    # structures moved before the driver
    t = Function(4 << 3, type="net", transitional=True, io_bar=0xC040, bar4=0xFB000000,
                 bar1=0xFEB84000)
    g.enumerate(t)                       # legacy layout, transport unknown
    g.walk_caps(t)                       # modern layout now
    n = Function(5 << 3, msix_vectors=0, line=11, bar4=0xFA000000, bar1=0xFEB88000)
    g.program(n, config_vector=None)
    assert h.checked >= 10


def test_the_transport_a_transitional_device_s_driver_picks_bumps_changes():
    h = Watching()
    t = Function(4 << 3, type="net", transitional=True, io_bar=0xC040, bar4=0xFB000000)
    h.guest.program(t, config_vector=None)
    init_driver(h, 0xC040 + 18, space=E.Space.PIO)


def test_functions_whose_bars_overlapped_while_reassigned_are_watched_where_they_end_up():
    h = Host()
    a = Function(3 << 3, bar4=0xFD000000, bar1=0xFEB80000)
    b = Function(4 << 3, bar4=0xFD000000, bar1=0xFEB84000)    # assigned over a's for a while
    h.guest.program(a, config_vector=0x41)
    h.guest.program(b, config_vector=0x51)
    bar_write(h.guest, b, 0x20, 0xFC000004)
    b.bar4 = 0xFC000000
    m = h.mark()
    bar_write(h.guest, a, 0x20, 0xFB000004)
    a.bar4 = 0xFB000000
    assert modern_plan(a) <= set(regs(h.since(m)))
    init_driver(h, 0xFB000014)
    init_driver(h, 0xFC000014)
    assert {v.device: v.resets_total for v in h.c.snapshot(h.t).devices} == {
        "pci-0000:00:03.0": 1, "pci-0000:00:04.0": 1}


def test_a_restart_keeps_the_interface_a_transitional_device_s_driver_picked():
    """docs/correlation.md "Carried over a restart": devices keep their transport and
    register block."""
    from agent.correlate.checkpoint import restore
    h = Host()
    t = Function(4 << 3, type="net", transitional=True, io_bar=0xC040, bar4=0xFB000000)
    h.guest.program(t, config_vector=0x45)
    init_driver(h, 0xC040 + 18, space=E.Space.PIO)
    state = json.loads(json.dumps(dump(h.c)))
    fresh = Correlator(CorrelatorConfig(reorder_window_ns=0))
    restore(fresh, state, lambda identity: True, h.t)
    assert [(v.device, v.transport) for v in fresh.snapshot(h.t).devices] == [
        ("pci-0000:00:04.0", Transport.PCI_LEGACY)]
    [dev] = model_of(fresh)["devices"]
    assert dev["layout"] == [Transport.PCI_LEGACY, E.Space.PIO, 0xC040]


# -- bounds: VMs, models and devices evicted around the model's devices ------------------------

def test_the_oldest_device_made_from_enumeration_alone_is_the_one_evicted():
    # devices the driver never touched: their activity is their enumeration
    h = Host(max_devices=2)
    for s in (3, 4, 5):
        h.guest.program(Function(s << 3, bar4=0xF0000000 + (s << 20),
                                 bar1=0xFEB80000 + (s << 12), msix_vectors=0),
                        config_vector=None)
    assert sorted(v.device for v in h.c.snapshot(h.t).devices) == [
        "pci-0000:00:04.0", "pci-0000:00:05.0"]


def test_an_evicted_vm_whose_enumeration_events_come_back_has_its_pci_device_again():
    """docs: an evicted VM whose events come back keeps its name; its devices are discovered
    again (here from its model)."""
    h = Host(window=50 * MS, max_vms=1)
    a = Function(3 << 3, bar4=0xFD000000)
    h.guest.program(a, config_vector=0x41)
    h.vm(PID + 1).cfg_read(Function(3 << 3), 0)     # another VMM: VM PID evicted
    h.guest.cfg_read(a, 0x08)                         # PID again: VM PID+1 evicted
    h.out += h.c.flush()
    snap = h.c.snapshot(h.t)
    assert [(v.vm.pid, v.device) for v in snap.devices] == [(PID, "pci-0000:00:03.0")]
    assert snap.evictions["vm"] == 2


def test_an_evicted_vm_s_pci_device_found_again_is_watched_again():
    h = Host(window=50 * MS, max_vms=1)
    a = Function(3 << 3, bar4=0xFD000000)
    h.guest.program(a, config_vector=0x41)
    h.vm(PID + 1).cfg_read(Function(3 << 3), 0)
    h.guest.cfg_read(a, 0x08)
    h.out += h.c.flush()
    h.t += 10 ** 9
    init_driver(h, 0xFD000014)
    h.out += h.c.flush()
    assert [(v.device, v.resets_total) for v in h.c.snapshot(h.t).devices] == [
        ("pci-0000:00:03.0", 1)]


def test_a_model_dropped_before_its_events_are_processed_breaks_nothing():
    """Models are bounded (2 * max_vms VMMs): one may go while its VM's events still wait in
    the reordering window; they then make no device, and the VMs stay bounded."""
    h = Host(window=50 * MS, max_vms=1)
    a = Function(3 << 3, bar4=0xFD000000)
    h.guest.program(a, config_vector=0x41)
    for pid in (PID + 1, PID + 2):
        g = h.vm(pid)
        fn = Function(3 << 3, bar4=0xFC000000)
        g.enumerate(fn)
        g.walk_caps(fn)
    h.out += h.c.flush()
    snap = h.c.snapshot(h.t)
    assert [(v.vm.pid, v.device) for v in snap.devices] == [(PID + 2, "pci-0000:00:03.0")]
    assert snap.vms == 1


def test_a_late_msix_write_of_a_vm_whose_model_was_dropped_changes_nothing():
    h = Host(window=50 * MS, max_vms=2)
    a = Function(3 << 3, bar4=0xFD000000)
    h.guest.program(a, config_vector=0x41)
    h.out += h.c.tick(h.t + 60 * MS)                  # PID's device exists
    h.t += 60 * MS
    late = h.clock()                                  # PID's write, delivered last
    for pid in range(PID + 1, PID + 5):               # 4 more VMMs: PID's model goes
        h.vm(pid).cfg_read(Function(3 << 3), 0)
    h.feed(E.RegisterAccess(late, PID, PID + 1, E.Space.MMIO, E.Op.WRITE, a.bar4 + 0x10, 2, 1))
    h.out += h.c.flush()
    snap = h.c.snapshot(h.t)
    assert snap.vms == 2 and snap.evictions["vm"] == 3


def test_a_status_address_the_model_names_is_no_discovery_candidate_any_more():
    """docs: unconfirmed addresses are kept in an LRU of max_candidates_per_vm; an address
    the model made a register of is confirmed, so it takes no place there."""
    h = Host(max_candidates_per_vm=2)
    h.access(E.Space.MMIO, E.Op.WRITE, 0xFD000014, 1, 0)     # a candidate (reset write)
    h.guest.program(Function(3 << 3, bar4=0xFD000000), config_vector=None)
    h.access(E.Space.MMIO, E.Op.WRITE, 0xFA000014, 1, 0)
    h.access(E.Space.MMIO, E.Op.WRITE, 0xFB000014, 1, 0)
    assert h.c.stats().get("candidates_evicted", 0) == 0
    h.access(E.Space.MMIO, E.Op.WRITE, 0xF9000014, 1, 0)
    assert h.c.stats()["candidates_evicted"] == 1


def test_the_least_recently_active_device_goes_not_the_first_made():
    h = Host(max_devices=2)
    fns = [Function(s << 3, bar4=0xF0000000 + (s << 20), bar1=0xFEB80000 + (s << 12),
                    msix_vectors=0) for s in (3, 4, 5)]
    h.guest.program(fns[0], config_vector=None)
    h.guest.program(fns[1], config_vector=None)
    init_driver(h, fns[0].bar4 + 0x14)          # the first one made is the one in use
    h.guest.program(fns[2], config_vector=None)
    assert sorted(v.device for v in h.c.snapshot(h.t).devices) == [
        "pci-0000:00:03.0", "pci-0000:00:05.0"]


def test_with_msix_enabled_the_line_is_no_interrupt_of_the_device_even_without_a_vector():
    """PCI 3.0 6.8.2.3: with MSI-X enabled the function must not use INTx#. A config entry
    not programmed (or NO_VECTOR) leaves the device with no known config interrupt at all."""
    h = Host()
    fn = Function(3 << 3, line=10)
    g = h.guest
    g.enumerate(fn)
    g.walk_caps(fn)
    [dev] = model_of(h.c)["devices"]
    assert (dev["gsi"], dev["config_vector"]) == (10, None)      # MSI-X off: INTx
    g.msix_enable(fn)
    g.msix_config(fn, 0)                                         # entry 0 never written
    [dev] = model_of(h.c)["devices"]
    assert (dev["gsi"], dev["config_vector"]) == (None, None)
    h.access(E.Space.MMIO, E.Op.WRITE, fn.bar4 + 0x10, 2, 0xFFFF)
    [dev] = model_of(h.c)["devices"]
    assert (dev["gsi"], dev["config_vector"], dev["msix_config"]) == (None, None, 0xFFFF)


def test_the_span_never_reaches_past_the_52_bit_physical_address_space():
    # a 64-bit BAR placed at 2**52 (past any x86-64 guest physical address): whatever else the
    # span holds, it ends at or below 2**52
    top = 1 << 52
    h = Host()
    sized_function(h, 3 << 3, {0x10: (top, 0x1000), 0x20: (0xFD000000, 0x4000)})
    got = bars(h.out)
    assert got and all(o.base + o.size <= top for o in got)
    assert got[-1].base <= 0xFD000000 and got[-1].base + got[-1].size >= 0xFD004000
