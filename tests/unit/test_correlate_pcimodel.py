"""The device model: what a guest programmed into PCI configuration space and MSI-X, read back
exactly; and correlation attributing interrupts from it only (never from timing)."""
from __future__ import annotations

import json

from agent import events as E
from agent.correlate import Correlator, CorrelatorConfig
from agent.correlate.checkpoint import dump, restore
from agent.correlate.pcimodel import PciModel, bdf_name
from agent.model import (
    Evidence, Rule, Transport, Violation, WatchDeviceBars, WatchEcam, WatchInterrupt, WatchRegister,
)
from pciguest import Function, Guest
from test_correlate_guestscript import Script, run

MS = 1_000_000


class Feed:
    """A Guest whose accesses go straight into a PciModel (and are kept)."""

    def __init__(self) -> None:
        self.t = 0
        self.events: list[E.Event] = []
        self.model = PciModel()
        self.guest = Guest(1, 2, self.clock, self.take)

    def clock(self) -> int:
        self.t += 1000
        return self.t

    def take(self, ev: E.Event) -> None:
        self.events.append(ev)
        if ev.space == E.Space.PCICFG:
            self.model.config_access(ev.addr, ev.op == E.Op.WRITE, ev.size, ev.value)


def test_modern_function_identity_bars_and_structures_from_enumeration():
    f = Feed()
    fn = Function(0x18, type="net", bar4=0xFE000000, bar1=0xFEB80000)
    f.guest.program(fn, config_vector=None)
    v = f.model.virtio(0x18)
    assert v.name == "pci-0000:00:03.0" and v.type == "net"
    assert (v.common.space, v.common.addr, v.common.length) == (E.Space.MMIO, 0xFE000000, 0x1000)
    assert v.isr.addr == 0xFE001000 and v.notify.addr == 0xFE003000
    assert v.notify_multiplier == 4 and v.legacy_io is None
    assert v.msix_table.addr == 0xFEB80000 and v.msix_table.length == 2 * 16
    assert v.interrupt_line == 11
    bar4 = f.model.function(0x18).bar(4)
    assert (bar4.base, bar4.size, bar4.io) == (0xFE000000, 0x4000, False)


def test_transitional_function_type_from_subsystem_and_legacy_io_bar():
    f = Feed()
    fn = Function(0x20, type="blk", transitional=True, io_bar=0xC040)
    f.guest.program(fn, config_vector=None)
    v = f.model.virtio(0x20)
    assert v.type == "blk" and v.legacy_io == 0xC040
    bar0 = f.model.function(0x20).bar(0)
    assert bar0.io and bar0.size == 0x40


def test_ids_and_bdf_names_follow_the_spec_numbering():
    assert bdf_name(0x18) == "0000:00:03.0"
    assert bdf_name((1 << 8) | (0x1F << 3) | 7) == "0000:01:1f.7"
    assert E.pcicfg_split(E.pcicfg_addr(1, 0x1F, 7, 0x34)) == ((1 << 8) | (0x1F << 3) | 7, 0x34)


def test_an_empty_slot_is_no_function_and_an_unknown_identity_no_virtio_device():
    f = Feed()
    f.guest.probe_empty(0x28)
    assert f.model.function(0x28) is None
    m = PciModel()
    # BAR writes alone (no identity read) create nothing
    m.config_access(E.pcicfg_addr(0, 5, 0, 0x10), True, 4, 0xFE000000)
    assert m.function(5 << 3) is None and m.virtio(5 << 3) is None


def test_a_guest_cannot_forge_an_identity_by_writing_read_only_registers():
    f = Feed()
    fn = Function(0x18, type="rng")
    f.guest.program(fn, config_vector=None)
    f.guest.cfg_write(fn, 0x00, 0x10411AF4)       # vendor/device are read-only
    f.guest.cfg_write(fn, 0x2E, 0x0001, 2)
    assert f.model.virtio(0x18).type == "rng"


def test_bar_reassignment_moves_the_structures():
    f = Feed()
    fn = Function(0x18, bar4=0xFE000000)
    f.guest.program(fn, config_vector=None)
    f.guest.cfg_write(fn, 0x20, 0xFD000004)      # the OS moves BAR4
    assert f.model.virtio(0x18).common.addr == 0xFD000000


def test_msix_vectors_need_the_whole_entry_unmasked_and_msix_enabled():
    f = Feed()
    fn = Function(0x18)
    f.guest.program(fn, config_vector=None)
    model_fn = f.model.function(0x18)
    table = f.model.virtio(0x18).msix_table

    def table_write(offset, value):
        model_fn.msix_access(offset, value, 4)

    table_write(0, 0xFEE01000)        # destination APIC 1, physical
    table_write(8, 0x41)
    assert model_fn.vector_of(0) is None            # control not written: masked at reset
    table_write(12, 0)
    assert model_fn.vector_of(0) is None            # MSI-X not enabled yet
    f.guest.msix_enable(fn)
    assert model_fn.vector_of(0) == (1, 0x41)
    table_write(12, 1)                              # masked
    assert model_fn.vector_of(0) is None
    table_write(12, 0)
    f.guest.msix_enable(fn, masked=True)            # function mask
    assert model_fn.vector_of(0) is None
    f.guest.msix_enable(fn)
    table_write(0, 0xFEE0000C)                      # logical destination mode
    assert model_fn.vector_of(0) == (None, 0x41)
    assert model_fn.vector_of(0xFFFF) is None and table.length == 32


def test_q35_pciexbar_programming_opens_the_ecam_window():
    c = Correlator()
    t = [1000]

    def ev(op, off, size, value):
        t[0] += 1000
        return E.RegisterAccess(t[0], 5, 6, E.Space.PCICFG, op, E.pcicfg_addr(0, 0, 0, off),
                                size, value)

    out = c.feed(ev(E.Op.READ, 0, 4, 0x29C08086))
    out += c.feed(ev(E.Op.WRITE, 0x64, 4, 0))
    out += c.feed(ev(E.Op.WRITE, 0x60, 4, 0xB0000001))   # 256 MiB at 0xB0000000, enabled
    assert [o for o in out if isinstance(o, WatchEcam)] == [WatchEcam(5, 0xB0000000, 256 << 20)]
    out = c.feed(ev(E.Op.WRITE, 0x60, 4, 0xB0000000))    # disabled
    assert out[0] == WatchEcam(5, 0xB0000000, 256 << 20, add=False)


def test_registers_are_watched_where_the_guest_placed_them_before_the_driver_starts():
    s = Script()
    vm = s.vm(7, "vm")
    dev = vm.device(Transport.PCI_MODERN, 0xFE000000, vector=0x41)     # programmed, no status yet
    c, out = run(s.events)
    regs = {(o.addr, o.register) for o in out if isinstance(o, WatchRegister) and o.add}
    assert (0xFE000014, E.Register.STATUS) in regs
    assert (0xFE001000, E.Register.ISR) in regs
    assert (0xFE003000, E.Register.QUEUE_NOTIFY) in regs
    assert (0xFE000010, E.Register.MSIX_CONFIG) in regs
    # MSI-X table writes come through the device-BAR span, not 48 watch entries a device
    assert not any(reg == E.Register.MSIX_TABLE for _, reg in regs)
    assert any(isinstance(o, WatchDeviceBars) and o.base <= dev.fn.bar1 < o.base + o.size
               for o in out)
    assert WatchInterrupt(7, vector=0x41) in out
    [view] = c.snapshot(s.t).devices
    assert (view.device, view.type, view.transport) == ("pci-0000:00:03.0", "rng",
                                                       Transport.PCI_MODERN)


def test_a_queue_interrupt_just_before_the_fault_never_opens_the_episode():
    """What broke the timing heuristic: a completion on the queue vector, then a
    config_generation read, then the real config interrupt is missing or late."""
    s = Script()
    vm = s.vm(7, "vm")
    dev = vm.device(Transport.PCI_MODERN, 0xFE000000, vector=0x41, queue_vector=0x42)
    dev.init()
    t_queue = s.step()
    s.emit(E.ApicAccepted(t_queue, 7, 8, 0, 0x42))
    dev.access(E.Op.READ, 1, addr=0xFE000015, size=1)      # config_generation
    ep = dev.needs_reset()
    dev.recover()
    c, out = run(s.events)
    [ended] = [o.episode for o in out if hasattr(o, "episode")]
    assert ended.start_ns == ep.start_ns > t_queue and ended.evidence == Evidence.CONFIG_INTERRUPT
    [view] = c.snapshot(s.t).devices
    assert view.config_interrupts_total == 1


def test_a_fault_with_no_config_interrupt_on_the_exact_vector_has_no_notify_phase():
    s = Script()
    vm = s.vm(7, "vm")
    dev = vm.device(Transport.PCI_MODERN, 0xFE000000, vector=0x41, queue_vector=0x42)
    dev.init()
    s.emit(E.ApicAccepted(s.step(), 7, 8, 0, 0x42))        # a queue interrupt, not config
    ep = dev.needs_reset(notify=False)
    dev.recover()
    c, out = run(s.events, flush=True)
    c.tick(s.t + 10 ** 9)
    [ended] = [o.episode for o in out if hasattr(o, "episode")]
    assert ended.evidence == Evidence.STATUS_READ and ended.start_ns == ep.guest_saw_ns
    assert "notify" not in ended.phase_seconds()
    violations = [o.rule for o in out + c.tick(s.t + 10 ** 9) if isinstance(o, Violation)]
    assert Rule.NEEDS_RESET_WITHOUT_NOTIFY in violations


def test_a_delivery_to_another_cpu_on_the_same_vector_is_not_the_config_interrupt():
    s = Script()
    vm = s.vm(7, "vm")
    dev = vm.device(Transport.PCI_MODERN, 0xFE000000, vector=0x41)    # destination APIC 0
    dev.init()
    s.emit(E.ApicAccepted(s.step(), 7, 8, 1, 0x41))        # APIC 1: another device's 0x41
    c, out = run(s.events)
    assert c.snapshot(s.t).devices[0].config_interrupts_total == 0


def test_spurious_split_irqchip_msis_are_not_progress():
    s = Script()
    vm = s.vm(7, "vm")
    dev = vm.device(Transport.PCI_MODERN, 0xFE000000, vector=0x41)
    dev.init()
    s.emit(E.MsiInjected(s.step(), 7, 8, 0, 0))
    c, _ = run(s.events)
    assert c._vms[7].last_progress_ns == -1


def test_reprogramming_the_config_entry_follows_the_guest():
    s = Script()
    vm = s.vm(7, "vm")
    dev = vm.device(Transport.PCI_MODERN, 0xFE000000, vector=0x41)
    dev.init()
    vm.guest.msix_entry(dev.fn, 0, 0x51)       # irq affinity change: new vector
    dev.vector = 0x51
    ep = dev.needs_reset()
    dev.recover()
    c, out = run(s.events)
    assert WatchInterrupt(7, vector=0x41, add=False) in out
    assert WatchInterrupt(7, vector=0x51) in out
    [ended] = [o.episode for o in out if hasattr(o, "episode")]
    assert ended.start_ns == ep.start_ns and ended.evidence == Evidence.CONFIG_INTERRUPT


def test_intx_device_config_interrupt_timed_by_its_own_line():
    s = Script()
    vm = s.vm(7, "vm")
    dev = vm.device(Transport.PCI_MODERN, 0xFE000000, gsi=10)      # no MSI-X: INTx, line 10
    dev.init()
    ep = dev.needs_reset()
    dev.recover()
    c, out = run(s.events)
    assert WatchInterrupt(7, gsi=10) in out
    [ended] = [o.episode for o in out if hasattr(o, "episode")]
    assert ended.start_ns == ep.start_ns and ended.evidence == Evidence.CONFIG_INTERRUPT


def test_a_shared_intx_line_does_not_time_the_interrupt():
    s = Script()
    vm = s.vm(7, "vm")
    a = vm.device(Transport.PCI_MODERN, 0xFE000000, gsi=11)
    vm.device(Transport.PCI_MODERN, 0xFE100000, gsi=11)
    a.init()
    ep = a.needs_reset()
    a.recover()
    c, out = run(s.events)
    [ended] = [o.episode for o in out if hasattr(o, "episode")]
    # the ISR read says it was a config interrupt; which rise of the shared line, nobody knows
    assert ended.evidence == Evidence.STATUS_READ and ended.start_ns == ep.guest_saw_ns
    assert c.snapshot(s.t).devices[0].config_interrupts_total == 1


def test_transitional_device_driven_through_its_legacy_interface():
    s = Script()
    vm = s.vm(7, "vm")
    dev = vm.device(Transport.PCI_LEGACY, 0xC040, vector=0x45, type="net")
    dev.init()
    ep = dev.needs_reset()
    dev.recover()
    c, out = run(s.events)
    [view] = c.snapshot(s.t).devices
    assert (view.device, view.type, view.transport) == ("pci-0000:00:03.0", "net",
                                                       Transport.PCI_LEGACY)
    [ended] = [o.episode for o in out if hasattr(o, "episode")]
    assert ended.start_ns == ep.start_ns and ended.evidence == Evidence.CONFIG_INTERRUPT


def test_a_device_found_from_traffic_takes_its_pci_name_when_enumeration_is_seen():
    s = Script()
    vm = s.vm(7, "vm")
    dev = vm.device(Transport.PCI_MODERN, 0xFE000000, enumerated=False)
    dev.init()
    vm.guest.program(Function(3 << 3, bar4=0xFE000000), config_vector=0x41)
    c, _ = run(s.events)
    [view] = c.snapshot(s.t).devices
    assert view.device == "pci-0000:00:03.0" and view.resets_total == 1


def test_the_model_survives_a_restart_through_the_state_file():
    s = Script()
    vm = s.vm(7, "vm", start_time=5)
    dev = vm.device(Transport.PCI_MODERN, 0xFE000000, vector=0x41)
    dev.init()
    c, _ = run(s.events)
    state = json.loads(json.dumps(dump(c)))
    fresh = Correlator(CorrelatorConfig())
    out = restore(fresh, state, lambda i: True, s.t)
    assert WatchInterrupt(7, vector=0x41) in out
    assert any(isinstance(o, WatchRegister) and o.addr == 0xFE000014 for o in out)
    # the guest is not going to enumerate again: the next fault is still attributed exactly
    s2 = Script(t0=s.t + MS)
    vm2 = s2.vm(7, "vm", start_time=5, announce=False)
    dev2 = vm2.device(Transport.PCI_MODERN, 0xFE000000, vector=0x41, enumerated=False)
    dev2.exact_irq = True
    dev2.status = 15
    ep = dev2.needs_reset()
    dev2.recover()
    out = []
    for ev in s2.events:
        out += fresh.feed(ev)
    out += fresh.flush()
    [ended] = [o.episode for o in out if hasattr(o, "episode")]
    assert ended.device == "pci-0000:00:03.0" and ended.start_ns == ep.start_ns


def test_intx_guest_reading_status_before_its_isr_still_gets_the_exact_start():
    """The lab guest (and a polling driver) reads status first, then the ISR: the ISR's config
    bit, arriving after the episode opened at the read, re-times it to its own line's rise."""
    s = Script()
    vm = s.vm(7, "vm")
    dev = vm.device(Transport.PCI_MODERN, 0xFE000000, gsi=10)
    dev.init()
    dev.status |= E.DEVICE_NEEDS_RESET
    rise = s.step()
    s.emit(E.IrqLine(rise, 7, 8, 10, 1))
    saw = dev.read()
    dev.access(E.Op.READ, 0x3, addr=dev.isr_addr)
    dev.recover()
    c, out = run(s.events)
    [ended] = [o.episode for o in out if hasattr(o, "episode")]
    assert (ended.evidence, ended.start_ns, ended.guest_saw_ns) == (
        Evidence.CONFIG_INTERRUPT, rise, saw)
    assert c.snapshot(s.t).episodes_started == {Evidence.CONFIG_INTERRUPT: 1}
    # a rise after the read is not the one that told the guest
    s2 = Script()
    vm2 = s2.vm(7, "vm")
    dev2 = vm2.device(Transport.PCI_MODERN, 0xFE000000, gsi=10)
    dev2.init()
    dev2.status |= E.DEVICE_NEEDS_RESET
    saw2 = dev2.read()
    s2.emit(E.IrqLine(s2.step(), 7, 8, 10, 1))
    dev2.access(E.Op.READ, 0x3, addr=dev2.isr_addr)
    dev2.recover()
    _, out2 = run(s2.events)
    [ended2] = [o.episode for o in out2 if hasattr(o, "episode")]
    assert (ended2.evidence, ended2.start_ns) == (Evidence.STATUS_READ, saw2)


def test_a_transitional_device_transport_is_what_its_driver_picks():
    """Transitional ids expose both interfaces (virtio 1.x 4.1.2.1): never driven, the transport
    is unknown, not a guess; the first status access decides."""
    for space, status_addr, want in ((E.Space.PIO, 0xC040 + 18, Transport.PCI_LEGACY),
                                     (E.Space.MMIO, 0xFE000014, Transport.PCI_MODERN)):
        s = Script()
        vm = s.vm(7, "vm")
        fn = Function(3 << 3, type="net", transitional=True, io_bar=0xC040, bar4=0xFE000000)
        vm.guest.program(fn, config_vector=None)
        c, _ = run(s.events)
        assert [(v.device, v.type, v.transport) for v in c.snapshot(s.t).devices] == [
            ("pci-0000:00:03.0", "net", Transport.UNKNOWN)]
        s.emit(E.RegisterAccess(s.step(), 7, 8, space, E.Op.WRITE, status_addr, 1, 0))
        c, _ = run(s.events)
        assert [v.transport for v in c.snapshot(s.t).devices] == [want]
