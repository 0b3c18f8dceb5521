"""Register accesses: discovery from traffic, the status register, ISR / InterruptACK, MSI-X
programming, kicks and APIC deliveries, against the rules they come from.

Rules (virtio 1.x and docs/correlation.md, the correlation core's contract):

- virtio 1.x 4.1.4.3 (modern common configuration: msix_config u16 at 0x10, device_status u8 at
  0x14, config_generation u8 at 0x15), 4.1.4.8 (legacy I/O BAR: status at 18, ISR at 19, config
  vector at 20), 4.2.2 (virtio-mmio: MagicValue 0x74726976 at 0x00, DeviceID at 0x08, 0 is a
  placeholder; QueueNotify at 0x50, InterruptStatus 0x60 (read), InterruptACK 0x64 (write),
  Status 0x70; 4.2.2.2: 32-bit accesses only).
- "Discovery from traffic": the transport comes from the access size (port I/O 1 byte: legacy,
  base = status - 18; MMIO 1 byte: modern, base = status - 0x14; MMIO 4 bytes: virtio-mmio,
  base = status - 0x70); any other size is no status register (`accesses_not_status_layout`).
  An address is confirmed by the driver's reset-and-init writes 0, 1, 3 in a row (reads in
  between ignored; any alignment), or by one read or write of a running device's status
  (ACKNOWLEDGE|DRIVER|DRIVER_OK, no reserved bit; modern also FEATURES_OK) at a base where VMMs
  put it (legacy 32-aligned, modern 4 KiB-aligned, mmio 0x200-aligned), or the kernel marking it
  `Register.STATUS`, or a hint (space, address, and the VM it names or any VM). Unconfirmed
  addresses are an LRU of `max_candidates_per_vm` (`candidates_evicted`). The 0 write of the
  sequence is a reset (`resets_total`). Type from a hint or the virtio-mmio DeviceID read.
  Bounds: the least recently active device is evicted.
- A transitional device's transport is the interface its driver uses (docs "The device model").
- "Config interrupts": MSI-X on the vector of entry `msix_config` as programmed, accepted by
  its destination APIC (physical mode; any APIC in logical mode), reprogramming followed; INTx /
  mmio: the ISR read (pci) or the InterruptACK write (mmio) with bit 1. Folded identical
  accesses (`repeats`) of a config-change ISR read / ACK are config interrupts each.
- Suspicion: kicks placed on a device (virtio-mmio QueueNotify at window + 0x50; an enumerated
  function's notify capability (4.1.4.4: the driver writes the 16-bit queue index); a device
  found from traffic by QEMU's layout, notify region at common cfg + 0x3000, 4 KiB; else
  `kicks_unattributed`); progress is an APIC acceptance on a vector that is no device's config
  vector (or on it but at another APIC than the programmed destination), an ISR /
  InterruptStatus read or InterruptACK with the used-buffer bit; a status access ends the wait.
- `stats()`: `inferred_resets` (a read of 0 while driver bits are set, not in `resets_total`).
- `Correlator.changes` grows whenever what `checkpoint.dump` saves may have changed;
  `checkpoint.dump` carries each device's `msix_config` (the last one written).
"""
from __future__ import annotations

import pytest

from agent import events as E
from agent.correlate import Correlator, CorrelatorConfig, DeviceHint
from agent.correlate import checkpoint
from agent.model import (
    EpisodeEnded, Evidence, NeedsResetSuspected, Outcome, Rule, Transport, Violation,
    WatchInterrupt, WatchRegister,
)
from pciguest import Function, Guest as PciGuest

US = 1_000
MS = 1_000_000
S = 1_000_000_000
PID = 5150
NAME = "disc-vm"
MMIO, PIO = E.Space.MMIO, E.Space.PIO
R, W = E.Op.READ, E.Op.WRITE
MAGIC = 0x74726976

MODERN = 0xFEBF4000          # 4 KiB-aligned modern common cfg (QEMU)
LEGACY = 0xC040              # 32-aligned legacy I/O BAR
MMIOW = 0xFEB00400           # 0x200-aligned virtio-mmio window
BAR4 = 0xFE000000            # enumerated function: common +0, ISR +0x1000, notify +0x3000 (x4)
FN_NAME = "pci-0000:00:03.0"
CONFIG_VEC, QUEUE_VEC = 0x40, 0x41


class Vm:
    """A VM on a correlator with no reordering window (events apply as they are fed)."""

    def __init__(self, c: Correlator | None = None, pid: int = PID, name: str | None = NAME,
                 t0: int = 1 * S, **cfg) -> None:
        cfg.setdefault("reorder_window_ns", 0)
        self.c = c or Correlator(CorrelatorConfig(**cfg))
        self.pid, self.t = pid, t0
        self.out: list = []
        if name is not None:
            self.feed(E.VmStarted(self.at(), pid, 100, name))

    def at(self, dt: int = 10 * US) -> int:
        self.t += dt
        return self.t

    def feed(self, ev) -> list:
        got = self.c.feed(ev)
        self.out += got
        return got

    def acc(self, op, addr, value, size=1, space=MMIO, reg=E.Register.UNKNOWN, repeats=0,
            dt=10 * US, ts=None) -> int:
        ts = self.at(dt) if ts is None else ts
        self.feed(E.RegisterAccess(ts, self.pid, self.pid + 1, space, op, addr, size, value,
                                   register=reg, repeats=repeats))
        return ts

    def writes(self, addr, values, size=1, space=MMIO) -> None:
        for v in values:
            self.acc(W, addr, v, size, space)

    def kick(self, addr, dt=10 * US, ts=None) -> int:
        ts = self.at(dt) if ts is None else ts
        self.feed(E.QueueNotify(ts, self.pid, self.pid + 1, addr))
        return ts

    def apic(self, vector, apicid=0, dt=10 * US, ts=None) -> int:
        ts = self.at(dt) if ts is None else ts
        self.feed(E.ApicAccepted(ts, self.pid, self.pid, apicid, vector))
        return ts

    def tick(self, now) -> list:
        got = self.c.tick(now)
        self.out += got
        return got

    def pci(self) -> PciGuest:
        return PciGuest(self.pid, self.pid + 1, self.at, self.feed)

    def views(self):
        return {v.device: v for v in self.c.snapshot(self.t).devices}

    def stat(self, name) -> int:
        return self.c.stats().get(name, 0)


def of(out, cls):
    return [o for o in out if isinstance(o, cls)]


def modern(vm: Vm, base: int = MODERN, values=(0, 1, 3, 11, 15)) -> None:
    vm.writes(base + 0x14, values)


def legacy(vm: Vm, base: int = LEGACY, values=(0, 1, 3, 7)) -> None:
    vm.writes(base + 18, values, space=PIO)


def mmio(vm: Vm, base: int = MMIOW, values=(0, 1, 3, 11, 15)) -> None:
    vm.writes(base + 0x70, values, size=4)


def programmed(vm: Vm, fn: Function | None = None, dest: int = 0) -> Function:
    """The guest enumerates a modern function (QEMU layout at BAR4) and programs MSI-X entry 0
    (config, CONFIG_VEC) and entry 1 (queue 0, QUEUE_VEC), then its driver initialises it."""
    fn = fn or Function(3 << 3, bar4=BAR4)
    vm.pci().program(fn, CONFIG_VEC, QUEUE_VEC, dest=dest)
    modern(vm, fn.common)
    return fn


# -- 1. the transport from the access size -------------------------------------------------

@pytest.mark.parametrize("space,size,status,dev_id,transport,regs", [
    # any alignment: 0x...48 is not 32-aligned, 0x...234 not 4 KiB-, 0x...100 not 0x200-aligned
    (PIO, 1, 0xC048 + 18, "pio-0xc048", Transport.PCI_LEGACY,
     {0xC048 + 18: E.Register.STATUS, 0xC048 + 19: E.Register.ISR,
      0xC048 + 20: E.Register.MSIX_CONFIG}),
    (MMIO, 1, 0xFEBF1234 + 0x14, "mmio-0xfebf1234", Transport.PCI_MODERN,
     {0xFEBF1234 + 0x14: E.Register.STATUS, 0xFEBF1234 + 0x15: E.Register.CONFIG_GENERATION,
      0xFEBF1234 + 0x10: E.Register.MSIX_CONFIG}),
    (MMIO, 4, 0xFEB00100 + 0x70, "mmio-0xfeb00100", Transport.MMIO,
     {0xFEB00100 + 0x70: E.Register.STATUS, 0xFEB00100 + 0xFC: E.Register.CONFIG_GENERATION,
      0xFEB00100 + 0x60: E.Register.ISR, 0xFEB00100 + 0x64: E.Register.INTERRUPT_ACK}),
])
def test_the_init_writes_confirm_a_status_register_of_the_size_s_transport(
        space, size, status, dev_id, transport, regs):
    vm = Vm()
    vm.acc(W, status, 0, size, space)
    vm.acc(R, status, 0, size, space)           # reads in between are ignored
    vm.acc(W, status, 1, size, space)
    vm.acc(R, status, 1, size, space)
    assert vm.views() == {}
    vm.acc(W, status, 3, size, space)
    watched = {o.addr: o.register for o in of(vm.out, WatchRegister) if o.add}
    assert watched == regs
    assert all(o.pid == PID and o.space == space for o in of(vm.out, WatchRegister))
    [view] = vm.views().values()
    assert (view.device, view.transport, view.type, view.status) == (dev_id, transport,
                                                                     "unknown", 3)
    # the 0 of the sequence was a reset; the writes built ACKNOWLEDGE|DRIVER: no violation
    assert view.resets_total == 1 and of(vm.out, Violation) == []
    assert vm.stat("devices_discovered") == 1
    final = 7 if transport == Transport.PCI_LEGACY else 15
    vm.acc(W, status, final - 4 if final == 15 else final, size, space)
    vm.acc(W, status, final, size, space)
    assert vm.views()[dev_id].status == final and of(vm.out, Violation) == []


@pytest.mark.parametrize("space,size", [(MMIO, 2), (PIO, 2), (PIO, 4), (MMIO, 8)])
def test_an_access_of_no_status_size_is_counted_and_is_no_candidate(space, size):
    vm = Vm(max_candidates_per_vm=1)
    modern(vm, MODERN, (0,))                    # a candidate waiting for 1, 3
    for v in (0, 1, 3, 0x0F):
        vm.acc(W, 0xC000 + 0x12 if space == PIO else 0xFEB80014, v, size, space)
    assert vm.views() == {} and vm.stat("accesses_not_status_layout") == 4
    assert vm.stat("candidates_evicted") == 0
    modern(vm, MODERN, (1, 3))                  # the candidate was kept
    assert list(vm.views()) == [f"mmio-0x{MODERN:x}"]


def test_an_address_below_the_status_offset_is_no_status_register():
    vm = Vm()
    vm.writes(0x10, (0, 1, 3))                  # a modern status there would have a base < 0
    assert vm.views() == {} and vm.stat("accesses_not_status_layout") == 3


# -- 2. confirmation: the reset-and-init writes in a row -----------------------------------

def test_only_0_1_3_in_a_row_confirm():
    vm = Vm()
    modern(vm, MODERN, (0, 1, 5, 3))            # broken by a 5
    modern(vm, MODERN + 0x1000, (1, 3))         # the 0 was lost
    modern(vm, MODERN + 0x2000, (0, 3, 1))
    assert vm.views() == {}
    modern(vm, MODERN, (0, 1, 3))               # the last three writes are what counts
    modern(vm, MODERN + 0x2000, (0, 1, 0, 1, 3))
    assert sorted(vm.views()) == [f"mmio-0x{MODERN:x}", f"mmio-0x{MODERN + 0x2000:x}"]
    assert all(v.resets_total == 1 for v in vm.views().values())


def test_candidates_are_an_lru_touched_by_reads_and_writes():
    vm = Vm(max_candidates_per_vm=2)
    a, b, c = MODERN + 0x14, MODERN + 0x1014, MODERN + 0x2014
    vm.acc(W, a, 0)
    vm.acc(W, b, 0)
    vm.acc(W, a, 1)                             # a is the most recently used now
    vm.acc(W, c, 0)                             # evicts b, the least recently used
    assert vm.stat("candidates_evicted") == 1
    vm.acc(W, b, 1)                             # b starts again (evicting a): 1 alone
    vm.acc(W, b, 3)
    assert vm.views() == {} and vm.stat("candidates_evicted") == 2
    vm2 = Vm(max_candidates_per_vm=2)
    vm2.acc(W, a, 0)
    vm2.acc(W, a, 1)
    vm2.acc(W, b, 0)
    vm2.acc(R, a, 0)                            # a read touches a too
    vm2.acc(W, c, 0)                            # evicts b
    vm2.acc(W, a, 3)
    assert list(vm2.views()) == [f"mmio-0x{MODERN:x}"]
    assert vm2.stat("candidates_evicted") == 1


def test_candidates_are_per_vm():
    one = Vm(max_candidates_per_vm=1)
    c = one.c
    two = Vm(c, pid=PID + 10, name="other", t0=one.t)
    one.acc(W, MODERN + 0x14, 0)
    two.t = one.t
    two.acc(W, MODERN + 0x1014, 0)              # another VM's candidate evicts nothing here
    one.t = two.t
    one.acc(W, MODERN + 0x14, 1)
    one.acc(W, MODERN + 0x14, 3)
    assert c.stats().get("candidates_evicted", 0) == 0
    assert [v.vm.pid for v in c.snapshot(one.t).devices] == [PID]


# -- 2. confirmation: one access of a running device at a VMM's base --------------------

@pytest.mark.parametrize("op", [R, W])
@pytest.mark.parametrize("space,size,base,off,value,found", [
    (MMIO, 1, MODERN, 0x14, 0x0F, True),
    (MMIO, 1, MODERN, 0x14, 0x07, False),            # modern: FEATURES_OK too
    (MMIO, 1, MODERN + 0x800, 0x14, 0x0F, False),    # not 4 KiB-aligned
    (MMIO, 1, MODERN, 0x14, 0x3F, False),            # reserved bits
    (MMIO, 1, MODERN, 0x14, 0x0B, False),            # no DRIVER_OK
    (PIO, 1, 0xC020, 18, 0x07, True),                # legacy: no FEATURES_OK
    (PIO, 1, 0xC030, 18, 0x07, False),               # not 32-aligned
    (MMIO, 4, MMIOW, 0x70, 0x0F, True),
    (MMIO, 4, MMIOW + 0x100, 0x70, 0x0F, False),     # not 0x200-aligned
])
def test_one_access_of_a_running_status_at_a_vmm_base_confirms(op, space, size, base, off,
                                                               value, found):
    vm = Vm()
    vm.acc(op, base + off, value, size, space)
    views = vm.views()
    if not found:
        assert views == {} and of(vm.out, WatchRegister) == []
        return
    [view] = views.values()
    assert view.device == f"{space}-0x{base:x}" and view.status == value
    # picked up running: no reset was seen, no violation, no episode
    assert view.resets_total == 0 and of(vm.out, Violation) == []
    assert WatchRegister(PID, space, base + off, E.Register.STATUS) in vm.out
    # the driver goes on from there: the next writes are judged against this status
    vm.acc(W, base + off, value & ~0x04, size, space)
    [v] = of(vm.out, Violation)
    assert (v.rule, v.vm.name, v.device) == (Rule.BIT_CLEARED_WITHOUT_RESET, NAME, view.device)
    assert vm.c.snapshot(vm.t).violations == {(v.vm, Rule.BIT_CLEARED_WITHOUT_RESET): 1}


def test_a_zero_write_alone_confirms_nothing():
    vm = Vm()
    vm.acc(W, MODERN + 0x14, 0)
    vm.acc(W, MMIOW + 0x70, 0, 4)
    vm.acc(W, 0xC000 + 18, 0, 1, PIO)
    assert vm.views() == {}


def test_a_running_status_read_with_needs_reset_opens_an_episode_at_pickup():
    vm = Vm()
    t = vm.acc(R, MODERN + 0x14, 0x4F)
    [view] = vm.views().values()
    ep = view.open_episode
    assert (ep.evidence, ep.start_ns, ep.guest_saw_ns) == (Evidence.STATUS_READ, t, t)


def test_a_status_the_kernel_marks_is_confirmed_on_any_access():
    vm = Vm()
    # not aligned, not running, not the init writes: the kernel's watch says what it is
    vm.acc(R, 0xFEBF1234 + 0x14, 0, reg=E.Register.STATUS)
    [view] = vm.views().values()
    assert (view.device, view.transport, view.status) == ("mmio-0xfebf1234",
                                                          Transport.PCI_MODERN, 0)


def test_an_other_transport_s_device_at_the_same_base_is_left_alone():
    """A modern device at B is `mmio-0xB`; 4-byte accesses at B + 0x70 would be a virtio-mmio
    status at the same base: the device exists, and they are not its status."""
    vm = Vm()
    modern(vm, MODERN)
    vm.writes(MODERN + 0x70, (0, 1, 3), size=4)
    vm.acc(R, MODERN + 0x70, 0x4F, 4)
    [view] = vm.views().values()
    assert (view.device, view.transport) == (f"mmio-0x{MODERN:x}", Transport.PCI_MODERN)
    assert view.open_episode is None and view.needs_reset_total == 0
    assert vm.stat("devices_discovered") == 1


def test_writes_that_are_not_a_device_s_status_do_not_change_its_status_or_resets():
    vm = Vm()
    modern(vm, MODERN)
    vm.writes(MODERN + 0x70, (0, 1, 3), size=4)
    [view] = vm.views().values()
    assert (view.status, view.resets_total) == (15, 1)


# -- 4. the virtio-mmio MagicValue and DeviceID ----------------------------------------------

def test_device_id_read_after_discovery_types_the_device():
    vm = Vm()
    mmio(vm)
    vm.acc(R, MMIOW + 0x08, 2, 4)
    assert vm.views()[f"mmio-0x{MMIOW:x}"].type == "blk"
    vm.acc(R, MMIOW + 0x08, 0, 4)               # 4.2.2: 0 is a placeholder, no device type
    assert vm.views()[f"mmio-0x{MMIOW:x}"].type == "unknown"


def test_device_id_read_before_discovery_types_the_device_found_later():
    vm = Vm()
    vm.acc(R, MMIOW, MAGIC, 4)
    vm.acc(R, MMIOW + 0x08, 1, 4)
    assert vm.views() == {}
    mmio(vm)
    assert vm.views()[f"mmio-0x{MMIOW:x}"].type == "net"


@pytest.mark.parametrize("op,addr,size,space", [
    (W, MMIOW + 0x08, 4, MMIO),      # DeviceID is read-only: a write is no DeviceID
    (R, MMIOW + 0x08, 2, MMIO),      # 4.2.2.2: only 32-bit accesses are virtio-mmio registers
    (R, MMIOW + 0x0C, 4, MMIO),      # VendorID, not DeviceID
])
def test_only_a_32_bit_read_of_device_id_types_the_device(op, addr, size, space):
    vm = Vm()
    vm.acc(op, addr, 2, size, space)
    mmio(vm)
    vm.acc(op, addr, 2, size, space)
    assert vm.views()[f"mmio-0x{MMIOW:x}"].type == "unknown"


def test_a_port_read_at_offset_8_of_a_legacy_device_is_no_device_id():
    vm = Vm()
    legacy(vm, 0xC000)
    vm.acc(R, 0xC008, 2, 4, PIO)                # legacy 4.1.4.8: queue address
    assert vm.views()["pio-0xc000"].type == "unknown"


def test_a_magic_value_read_is_a_candidate_only_when_it_is_virt():
    vm = Vm(max_candidates_per_vm=1)
    vm.acc(W, MODERN + 0x14, 0)
    vm.acc(R, MMIOW, 0x12345678, 4)             # not "virt": no virtio-mmio window there
    assert vm.stat("candidates_evicted") == 0
    vm.acc(R, MMIOW, MAGIC, 4)                  # a window: remembered (evicts the 0 write)
    assert vm.stat("candidates_evicted") == 1
    modern(vm, MODERN, (1, 3))
    assert vm.views() == {}


def test_magic_value_of_a_known_device_changes_nothing():
    vm = Vm(max_candidates_per_vm=1)
    mmio(vm)
    vm.acc(W, MODERN + 0x14, 0)
    vm.acc(R, MMIOW, MAGIC, 4)                  # its own device exists: no candidate
    vm.acc(R, MMIOW + 0x08, 4, 4)
    assert vm.stat("candidates_evicted") == 0
    modern(vm, MODERN, (1, 3))
    views = vm.views()
    assert views[f"mmio-0x{MMIOW:x}"].type == "rng" and f"mmio-0x{MODERN:x}" in views


# -- hints ------------------------------------------------------------------------------------

def test_a_hinted_address_is_a_device_on_its_first_access():
    hint = DeviceHint(PIO, 0xC012, type="net")
    vm = Vm(hints=(hint,))
    vm.acc(R, 0xC012, 0, 1, PIO)                # not running, not the init writes
    [view] = vm.views().values()
    assert (view.device, view.type, view.transport) == ("pio-0xc000", "net", Transport.PCI_LEGACY)


def test_a_hint_is_for_its_space_and_address_only():
    hint = DeviceHint(PIO, 0xC012, type="net")
    vm = Vm(hints=(hint,))
    vm.acc(R, 0xC012, 0, 1, MMIO)
    vm.acc(R, 0xC013, 0, 1, PIO)
    vm.acc(R, 0xC011, 0, 1, PIO)
    assert vm.views() == {}


def test_a_hint_s_transport_overrides_the_access_size():
    hint = DeviceHint(MMIO, MMIOW + 0x70, transport=Transport.MMIO, type="blk")
    vm = Vm(hints=(hint,))
    vm.acc(R, MMIOW + 0x70, 0, 1)               # 1 byte would say modern
    [view] = vm.views().values()
    assert (view.device, view.type, view.transport) == (f"mmio-0x{MMIOW:x}", "blk", Transport.MMIO)


def test_a_hint_naming_a_vm_is_for_that_vm_only():
    named = DeviceHint(MMIO, MODERN + 0x14, type="blk", vm="other")
    anyvm = DeviceHint(MMIO, MODERN + 0x14, type="net")
    vm = Vm(hints=(named,))
    vm.acc(R, MODERN + 0x14, 0)
    assert vm.views() == {}
    vm = Vm(hints=(named, anyvm))
    vm.acc(R, MODERN + 0x14, 0)
    assert [v.type for v in vm.views().values()] == ["net"]
    vm = Vm(hints=(named, anyvm), name="other")
    vm.acc(R, MODERN + 0x14, 0)
    assert [v.type for v in vm.views().values()] == ["blk"]


def test_a_hint_for_a_vm_without_identity_matches_its_made_up_name():
    hint = DeviceHint(MMIO, MODERN + 0x14, type="net", vm=f"pid-{PID}")
    vm = Vm(hints=(hint,), name=None)
    vm.acc(R, MODERN + 0x14, 0)
    assert [v.type for v in vm.views().values()] == ["net"]


# -- bounds: the least recently active device -------------------------------------------------

def test_any_register_access_makes_a_device_recently_active():
    vm = Vm(max_devices=2)
    modern(vm, MODERN)
    modern(vm, MODERN + 0x1000)
    vm.acc(R, MODERN + 0x15, 0, reg=E.Register.CONFIG_GENERATION)   # the older one is active
    modern(vm, MODERN + 0x2000)
    assert sorted(vm.views()) == [f"mmio-0x{MODERN:x}", f"mmio-0x{MODERN + 0x2000:x}"]
    assert WatchRegister(PID, MMIO, MODERN + 0x1014, E.Register.STATUS, add=False) in vm.out


# -- the status register ----------------------------------------------------------------------

def test_a_read_of_0_with_driver_bits_set_is_an_inferred_reset():
    vm = Vm()
    modern(vm)
    vm.acc(R, MODERN + 0x14, 0)                 # the reset write was lost
    assert vm.stat("inferred_resets") == 1
    assert vm.views()[f"mmio-0x{MODERN:x}"].resets_total == 1   # only the one written
    vm.acc(W, MODERN + 0x14, 0)
    vm.acc(R, MODERN + 0x14, 0)                 # after a reset written: nothing inferred
    assert vm.stat("inferred_resets") == 1
    modern(vm, MODERN, (1, 3, 11, 15))
    vm.acc(R, MODERN + 0x14, 0)
    assert vm.stat("inferred_resets") == 2
    assert of(vm.out, Violation) == []


def test_a_reset_during_an_episode_is_saved_state_so_changes_grows():
    vm = Vm()
    modern(vm)
    vm.acc(R, MODERN + 0x14, 0x4F)
    before = vm.c.changes
    vm.acc(W, MODERN + 0x14, 0)
    assert vm.c.changes > before
    before = vm.c.changes
    vm.acc(R, MODERN + 0x14, 0)
    assert vm.c.changes > before


def test_a_status_access_ends_the_wait_of_a_suspicion_even_at_the_interrupt_s_time():
    vm = Vm()
    programmed(vm)
    t = vm.apic(CONFIG_VEC, dt=500 * MS)
    assert vm.stat("pending_suspicions") == 1
    vm.acc(R, BAR4 + 0x14, 0x0F, ts=t)           # the guest looks at status right away
    assert vm.stat("pending_suspicions") == 0
    for _ in range(20):
        vm.kick(BAR4 + 0x3000, dt=100 * MS)
    vm.tick(vm.t + 2 * S)
    assert of(vm.out, NeedsResetSuspected) == []
    assert vm.views()[FN_NAME].suspected_since_ns is None


def restored_during_an_episode() -> Vm:
    """A modern device's NEEDS_RESET episode is open when the agent's state is saved; a new
    agent restores it (the VM still running) and goes on at the same time."""
    vm = Vm()
    modern(vm)
    vm.acc(R, MODERN + 0x14, 0x4F)
    state = checkpoint.dump(vm.c)
    c2 = Correlator(CorrelatorConfig(reorder_window_ns=0))
    checkpoint.restore(c2, state, lambda identity: True, vm.t)
    return Vm(c2, name=None, t0=vm.t)


def test_a_restored_episode_is_judged_against_the_gap_on_the_first_status_access():
    vm = restored_during_an_episode()
    t = vm.acc(R, MODERN + 0x14, 0x0F)          # running again: reset and re-init in the gap
    [ended] = of(vm.out, EpisodeEnded)
    assert ended.episode.outcome == Outcome.RECOVERED and ended.episode.resumed
    # seen recovered at this read; when DRIVER_OK was written is unknown
    assert ended.episode.end_ns == t and ended.episode.driver_ok_ns is None


# -- transitional devices: the interface the driver uses ---------------------------------------

def test_a_transitional_device_s_transport_is_the_interface_its_driver_uses():
    vm = Vm()
    fn = Function(3 << 3, transitional=True, msix_vectors=0, bar4=BAR4, io_bar=0xC000)
    vm.pci().program(fn, None)
    assert vm.views()[FN_NAME].transport == "unknown"
    legacy(vm, 0xC000)
    assert vm.views()[FN_NAME].transport == Transport.PCI_LEGACY
    modern(vm, BAR4)                            # the modern driver binds instead
    assert vm.views()[FN_NAME].transport == Transport.PCI_MODERN
    vm.acc(R, BAR4 + 0x14, 0x4F)
    [view] = vm.views().values()
    assert view.open_episode.transport == Transport.PCI_MODERN


def test_a_transitional_device_first_driven_through_its_modern_interface_is_modern():
    vm = Vm()
    fn = Function(3 << 3, transitional=True, msix_vectors=0, bar4=BAR4, io_bar=0xC000)
    vm.pci().program(fn, None)
    vm.acc(R, BAR4 + 0x14, 0)
    assert vm.views()[FN_NAME].transport == Transport.PCI_MODERN


# -- ISR and InterruptACK ----------------------------------------------------------------------

def test_legacy_isr_read_with_the_config_bit_is_a_config_interrupt():
    vm = Vm()
    legacy(vm)
    vm.acc(R, LEGACY + 19, 0x1, space=PIO)      # used buffer only
    assert vm.views()[f"pio-0x{LEGACY:x}"].config_interrupts_total == 0
    vm.acc(R, LEGACY + 19, 0x3, space=PIO)
    assert vm.views()[f"pio-0x{LEGACY:x}"].config_interrupts_total == 1
    vm.acc(W, LEGACY + 19, 0x2, space=PIO)      # the ISR is read, a write says nothing
    assert vm.views()[f"pio-0x{LEGACY:x}"].config_interrupts_total == 1


def test_folded_isr_reads_count_only_when_the_folded_value_had_the_config_bit():
    vm = Vm()
    legacy(vm)
    vm.acc(R, LEGACY + 19, 0x1, space=PIO)
    vm.acc(R, LEGACY + 19, 0x1, space=PIO, repeats=5)   # five more queue-only reads
    assert vm.views()[f"pio-0x{LEGACY:x}"].config_interrupts_total == 0
    vm.acc(R, LEGACY + 19, 0x2, space=PIO)
    vm.acc(R, LEGACY + 19, 0x2, space=PIO, repeats=3)   # three folded config reads, then one
    assert vm.views()[f"pio-0x{LEGACY:x}"].config_interrupts_total == 5
    vm.acc(R, LEGACY + 19, 0x0, space=PIO, repeats=2)   # the last value had the bit: +2
    vm.acc(R, LEGACY + 19, 0x0, space=PIO, repeats=4)   # ... not this time
    assert vm.views()[f"pio-0x{LEGACY:x}"].config_interrupts_total == 7


def test_mmio_counts_the_interrupt_ack_not_the_interrupt_status_read():
    vm = Vm()
    mmio(vm)
    dev = f"mmio-0x{MMIOW:x}"
    vm.acc(R, MMIOW + 0x60, 0x2, 4)
    vm.acc(R, MMIOW + 0x60, 0x2, 4, repeats=3)
    assert vm.views()[dev].config_interrupts_total == 0
    vm.acc(W, MMIOW + 0x64, 0x2, 4)
    assert vm.views()[dev].config_interrupts_total == 1
    vm.acc(R, MMIOW + 0x64, 0x2, 4)             # InterruptACK is write-only: a read is nothing
    assert vm.views()[dev].config_interrupts_total == 1
    vm.acc(W, MMIOW + 0x64, 0x1, 4, repeats=4)  # four folded config ACKs before this one
    vm.acc(W, MMIOW + 0x64, 0x1, 4, repeats=6)  # six folded queue ACKs
    assert vm.views()[dev].config_interrupts_total == 5


def _mmio_wait(vm: Vm) -> int:
    """A virtio-mmio device kicked right after its config interrupt (the ACK): a suspicion."""
    mmio(vm)
    t = vm.acc(W, MMIOW + 0x64, 0x2, 4, dt=500 * MS)
    vm.kick(MMIOW + 0x50, dt=100 * MS)
    return t


@pytest.mark.parametrize("progress", [
    lambda vm: vm.acc(R, MMIOW + 0x60, 0x1, 4),
    lambda vm: vm.acc(W, MMIOW + 0x64, 0x1, 4),
    lambda vm: vm.apic(0x55),
], ids=["interrupt-status", "interrupt-ack", "apic"])
def test_used_buffer_evidence_is_progress(progress):
    vm = Vm()
    _mmio_wait(vm)
    progress(vm)
    vm.tick(vm.t + 2 * S)
    assert of(vm.out, NeedsResetSuspected) == []
    assert vm.stat("suspicions_cleared_by_progress") == 1


def test_without_progress_the_mmio_device_kicked_after_its_ack_is_suspected():
    vm = Vm()
    t = _mmio_wait(vm)
    vm.acc(R, MMIOW + 0x60, 0x0, 4)             # no used-buffer bit: no progress
    vm.acc(W, MMIOW + 0x64, 0x0, 4)
    vm.tick(vm.t + 2 * S)
    [s] = of(vm.out, NeedsResetSuspected)
    assert (s.device, s.since_ns) == (f"mmio-0x{MMIOW:x}", t)


def test_legacy_isr_read_with_the_used_buffer_bit_is_progress():
    """An enumerated transitional device driven through its legacy interface, with MSI-X
    programmed: kicks at its notify capability, the legacy ISR read shows a used buffer."""
    vm = Vm()
    fn = Function(3 << 3, transitional=True, bar4=BAR4, io_bar=0xC000)
    vm.pci().program(fn, CONFIG_VEC, QUEUE_VEC)
    legacy(vm, 0xC000)
    vm.apic(CONFIG_VEC, dt=500 * MS)
    vm.kick(BAR4 + 0x3000, dt=100 * MS)
    vm.acc(R, 0xC000 + 19, 0x1, space=PIO)
    vm.tick(vm.t + 2 * S)
    assert of(vm.out, NeedsResetSuspected) == []
    assert vm.stat("suspicions_cleared_by_progress") == 1


# -- msix_config and MSI-X reprogramming ----------------------------------------------------------

def test_a_found_device_s_msix_config_write_is_carried_by_the_state():
    vm = Vm()
    modern(vm)
    vm.acc(R, MODERN + 0x10, 1, 2)              # a read is not what the driver wrote
    [d] = checkpoint.dump(vm.c)["vms"][0]["devices"]
    assert d["msix_config"] is None
    vm.acc(W, MODERN + 0x10, 1, 2)
    [d] = checkpoint.dump(vm.c)["vms"][0]["devices"]
    assert d["msix_config"] == 1


def test_msix_reprogramming_moves_the_config_vector_in_event_order():
    vm = Vm()
    fn = programmed(vm)
    pci = vm.pci()
    vm.apic(CONFIG_VEC)
    assert vm.views()[FN_NAME].config_interrupts_total == 1
    pci.msix_entry(fn, 0, 0x45)                 # irq affinity: entry 0 now on 0x45
    vm.apic(CONFIG_VEC)
    assert vm.views()[FN_NAME].config_interrupts_total == 1
    vm.apic(0x45)
    assert vm.views()[FN_NAME].config_interrupts_total == 2
    pci.msix_config(fn, 1)                      # config changes now on entry 1 (QUEUE_VEC)
    vm.apic(0x45)
    vm.apic(QUEUE_VEC)
    assert vm.views()[FN_NAME].config_interrupts_total == 3


# -- kicks ------------------------------------------------------------------------------------

def _suspected_after_kick(vm: Vm, kick) -> list:
    """Config interrupt, then `kick(vm)`; what is suspected a window later."""
    vm.apic(CONFIG_VEC, dt=2 * S)
    kick(vm)
    vm.tick(vm.t + 2 * S)
    return of(vm.out, NeedsResetSuspected)


@pytest.mark.parametrize("kick,suspected", [
    (lambda vm: vm.acc(W, BAR4 + 0x3000, 0, 2, reg=E.Register.QUEUE_NOTIFY), True),
    (lambda vm: vm.acc(R, BAR4 + 0x3000, 0, 2, reg=E.Register.QUEUE_NOTIFY), False),
    (lambda vm: vm.acc(W, BAR4 + 0x3000 + 4 * 10, 10, 2), True),     # queue 10: not watched
    (lambda vm: vm.acc(R, BAR4 + 0x3000 + 4 * 10, 10, 2), False),
    (lambda vm: vm.kick(BAR4 + 0x3000 + 4 * 10), True),
    (lambda vm: vm.acc(W, BAR4 + 0x2000 + 4, 10, 2), False),         # device config
], ids=["watched-write", "watched-read", "queue10-write", "queue10-read", "fast-mmio",
        "device-cfg"])
def test_a_16_bit_notify_write_is_a_kick_of_the_enumerated_device(kick, suspected):
    vm = Vm()
    programmed(vm)
    got = _suspected_after_kick(vm, kick)
    assert [s.device for s in got] == ([FN_NAME] if suspected else [])
    assert vm.stat("kicks_unattributed") == 0
    if not suspected:
        assert vm.stat("pending_suspicions") == 1   # the wait goes on (an idle device)


def test_a_2_byte_write_that_is_no_kick_is_no_unattributed_kick():
    vm = Vm()
    programmed(vm)
    vm.acc(W, 0xFEC00000, 1, 2)
    assert vm.stat("kicks_unattributed") == 0 and vm.stat("accesses_not_status_layout") == 1


def test_an_enumerated_device_s_kicks_are_where_its_notify_capability_says():
    """4.1.4.4: the notify addresses are cap.offset + queue_notify_off * multiplier in the BAR
    the capability names: QEMU's layout guess is for devices found from traffic only."""
    fn = Function(3 << 3, bar4=BAR4)
    ptr = fn.space[0x34]
    while ptr:
        if fn.space[ptr] == 0x09 and fn.space[ptr + 3] == 2:        # notify: 0x100 long
            fn.space[ptr + 12:ptr + 16] = (0x100).to_bytes(4, "little")
        ptr = fn.space[ptr + 1]
    vm = Vm()
    programmed(vm, fn)
    got = _suspected_after_kick(vm, lambda vm: vm.kick(BAR4 + 0x3800))
    assert got == [] and vm.stat("kicks_unattributed") == 1
    vm2 = Vm()
    programmed(vm2, Function(3 << 3, bar4=BAR4))
    assert _suspected_after_kick(vm2, lambda vm: vm.kick(BAR4 + 0x3800)) != []


@pytest.mark.parametrize("offset,placed", [
    (0x3000, True), (0x3FFF, True), (0x3004, True), (0x3050, True), (0x2FFF, False),
    (0x4000, False),
    (0x50, False),                  # the window + 0x50 of virtio-mmio, not of a PCI device
])
def test_kicks_of_a_modern_device_found_from_traffic_by_qemu_s_layout(offset, placed):
    vm = Vm()
    modern(vm)
    vm.kick(MODERN + offset)
    assert vm.stat("kicks_unattributed") == (0 if placed else 1)


def modern_after_its_config_interrupt() -> tuple[Vm, int]:
    """A modern device found from traffic, hinted with its config vector only, and that
    vector's interrupt: the VM and the interrupt's time."""
    hint = DeviceHint(MMIO, MODERN + 0x14, config_vector=CONFIG_VEC)
    vm = Vm(hints=(hint,))
    modern(vm)
    return vm, vm.apic(CONFIG_VEC, dt=2 * S)


def test_a_modern_device_found_from_traffic_kicked_after_its_config_interrupt_is_suspected():
    vm, t = modern_after_its_config_interrupt()
    k = vm.kick(MODERN + 0x3008, dt=100 * MS)
    vm.tick(k + 1 * S)
    [s] = of(vm.out, NeedsResetSuspected)
    assert (s.device, s.since_ns, s.ts_ns) == (f"mmio-0x{MODERN:x}", t, k + 1 * S)


def test_kicks_at_many_addresses_are_all_placed():
    vm, t = modern_after_its_config_interrupt()
    for q in range(300):                        # page-per-vq aside, 4 bytes a queue
        vm.kick(MODERN + 0x3000 + 4 * q, dt=100 * US)
    vm.kick(MODERN + 0x3000, dt=100 * US)
    assert vm.stat("kicks_unattributed") == 0
    vm.tick(vm.t + 2 * S)
    assert [s.since_ns for s in of(vm.out, NeedsResetSuspected)] == [t]


def test_kicks_in_a_vm_whose_device_model_was_dropped_are_not_placed():
    """Device models are bounded (2 x max_vms pids): a VM kept for its open episode whose model
    went is left with devices the model no longer describes; their kicks are not placed."""
    vm = Vm(max_vms=2)
    programmed(vm)
    vm.acc(R, BAR4 + 0x14, 0x4F)                # an open episode: the VM is evicted last
    for pid in range(PID + 1, PID + 5):
        PciGuest(pid, pid + 1, vm.at, vm.feed).probe_empty(0)
    assert [v.vm.pid for v in vm.c.snapshot(vm.t).devices] == [PID]
    vm.kick(BAR4 + 0x3000)
    assert vm.stat("kicks_unattributed") == 1


def test_kicks_of_an_enumerated_device_without_notify_capability_are_not_placed():
    fn = Function(3 << 3, bar4=BAR4)
    ptr = fn.space[0x34]
    while ptr:
        if fn.space[ptr] == 0x09 and fn.space[ptr + 3] == 2:
            fn.space[ptr + 3] = 5                # a PCI-cfg-access capability instead
            fn.space[ptr + 2] = 16
        ptr = fn.space[ptr + 1]
    vm = Vm()
    programmed(vm, fn)
    vm.kick(BAR4 + 0x3000)
    assert vm.stat("kicks_unattributed") == 1


@pytest.mark.parametrize("offset,placed", [(0x50, True), (0x54, False), (0x3000, False)])
def test_kicks_of_a_virtio_mmio_device_at_queue_notify(offset, placed):
    vm = Vm()
    mmio(vm)
    vm.kick(MMIOW + offset)
    assert vm.stat("kicks_unattributed") == (0 if placed else 1)


def test_kicks_of_an_unaligned_virtio_mmio_window_are_not_placed():
    vm = Vm()
    mmio(vm, MMIOW + 0x100)                     # found by its writes at any alignment
    vm.kick(MMIOW + 0x150)
    assert vm.stat("kicks_unattributed") == 1


def test_kicks_are_not_placed_on_legacy_or_vhost_devices():
    vm = Vm()
    vm.feed(E.VhostStatus(vm.at(), PID, PID + 1, W, 3, 0))
    legacy(vm, 0xC000)
    vm.kick(0xC000 + 0x3000)                    # an MMIO address, not the legacy port space
    vm.kick(0xC000 + 16)
    assert vm.stat("kicks_unattributed") == 2
    assert sorted(vm.views()) == ["pio-0xc000", "vhost-fd3"]


def test_a_kick_before_the_device_is_found_is_placed_once_it_is():
    vm = Vm()
    vm.kick(MMIOW + 0x50)
    assert vm.stat("kicks_unattributed") == 1
    mmio(vm)
    t = vm.acc(W, MMIOW + 0x64, 0x2, 4, dt=500 * MS)
    vm.kick(MMIOW + 0x50, dt=100 * MS)
    vm.tick(vm.t + 2 * S)
    assert vm.stat("kicks_unattributed") == 1
    assert [s.since_ns for s in of(vm.out, NeedsResetSuspected)] == [t]


def suspected_at(vm, due: int):
    """The one suspicion, judged at `due` and not a nanosecond before (the window's edge)."""
    vm.tick(due - 1)
    assert of(vm.out, NeedsResetSuspected) == []
    vm.tick(due)
    [s] = of(vm.out, NeedsResetSuspected)
    return s


def test_a_kick_placed_before_is_placed_again():
    vm = Vm()
    mmio(vm)
    vm.kick(MMIOW + 0x50, dt=100 * MS)          # long before the interrupt: idle then
    t = vm.acc(W, MMIOW + 0x64, 0x2, 4, dt=3 * S)
    k = vm.kick(MMIOW + 0x50, dt=100 * MS)
    s = suspected_at(vm, k + 1 * S)
    assert (s.ts_ns, s.since_ns) == (k + 1 * S, t)


def test_the_first_kick_after_the_interrupt_starts_the_window():
    vm = Vm()
    programmed(vm)
    t = vm.apic(CONFIG_VEC, dt=2 * S)
    k = vm.kick(BAR4 + 0x3000, dt=300 * MS)
    vm.kick(BAR4 + 0x3000, dt=500 * MS)
    s = suspected_at(vm, k + 1 * S)
    assert (s.ts_ns, s.since_ns, s.device) == (k + 1 * S, t, FN_NAME)


def test_a_kick_at_the_interrupt_s_time_is_a_kick_after_it():
    vm = Vm()
    programmed(vm)
    t = vm.apic(CONFIG_VEC, dt=2 * S)
    vm.kick(BAR4 + 0x3000, ts=t)
    vm.tick(t + 1 * S)
    [s] = of(vm.out, NeedsResetSuspected)
    assert (s.ts_ns, s.since_ns) == (t + 1 * S, t)


def test_a_kick_within_the_window_before_the_interrupt_starts_it_at_the_interrupt():
    vm = Vm()
    programmed(vm)
    vm.kick(BAR4 + 0x3000, dt=2 * S)
    t = vm.apic(CONFIG_VEC, dt=500 * MS)
    s = suspected_at(vm, t + 1 * S)
    assert (s.ts_ns, s.since_ns) == (t + 1 * S, t)


# -- APIC deliveries ----------------------------------------------------------------------------

def test_physical_destination_only_its_apic_s_acceptance_is_the_config_interrupt():
    vm = Vm()
    programmed(vm, dest=1)
    vm.apic(CONFIG_VEC, apicid=0, dt=2 * S)     # the same vector on another CPU: not ours
    assert vm.views()[FN_NAME].config_interrupts_total == 0
    assert vm.stat("pending_suspicions") == 0
    t = vm.apic(CONFIG_VEC, apicid=1)
    assert vm.views()[FN_NAME].config_interrupts_total == 1
    vm.kick(BAR4 + 0x3000, dt=100 * MS)
    vm.apic(CONFIG_VEC, apicid=2, dt=100 * MS)  # another CPU's vector 0x40: progress
    vm.tick(vm.t + 2 * S)
    assert of(vm.out, NeedsResetSuspected) == []
    assert vm.stat("suspicions_cleared_by_progress") == 1
    assert vm.views()[FN_NAME].config_interrupts_total == 1 and t


def test_logical_destination_any_apic_s_acceptance_is_the_config_interrupt():
    vm = Vm()
    fn = Function(3 << 3, bar4=BAR4)
    pci = vm.pci()
    pci.enumerate(fn)
    pci.walk_caps(fn)
    pci.msix_enable(fn, masked=True)
    base = fn.bar1
    for off, value in ((0, 0xFEE01004), (4, 0), (8, CONFIG_VEC), (12, 0)):   # logical mode
        vm.acc(W, base + off, value, 4)
    pci.msix_enable(fn)
    pci.msix_config(fn, 0)
    modern(vm, BAR4)
    for apicid in (0, 3, 7):
        vm.apic(CONFIG_VEC, apicid=apicid, dt=300 * MS)
    assert vm.views()[FN_NAME].config_interrupts_total == 3


def test_an_acceptance_on_no_config_vector_is_progress_without_any_msi_event():
    vm = Vm()
    programmed(vm)
    vm.apic(CONFIG_VEC, dt=2 * S)
    vm.kick(BAR4 + 0x3000, dt=100 * MS)
    vm.apic(QUEUE_VEC, dt=100 * MS)
    vm.tick(vm.t + 2 * S)
    assert of(vm.out, NeedsResetSuspected) == []
    assert vm.stat("suspicions_cleared_by_progress") == 1
    assert vm.views()[FN_NAME].config_interrupts_total == 1


# -- more register-access rules ----------------------------------------------------------------

def test_a_transitional_device_s_transport_follows_its_driver_after_a_type_change():
    vm = Vm()
    fn = Function(3 << 3, transitional=True, msix_vectors=0, bar4=BAR4, io_bar=0xC000)
    pci = vm.pci()
    pci.program(fn, None)
    legacy(vm, 0xC000)
    assert vm.c.annotate_device(PID, PIO, 0xC000 + 18, "net")
    pci.cfg_read(fn, 0x00)                      # the guest reads its configuration again
    modern(vm, BAR4)                            # and the modern driver binds
    assert vm.views()[FN_NAME].transport == Transport.PCI_MODERN


def _intx_modern(vm: Vm) -> Function:
    fn = Function(3 << 3, msix_vectors=0, bar4=BAR4, line=11)
    vm.pci().program(fn, None)
    modern(vm, BAR4)
    return fn


def test_an_isr_config_read_with_no_line_rise_seen_is_the_notification_of_a_0x40_read():
    """INTx: the ISR read with bit 1 says a config interrupt happened (when is unknown without
    the line's rise): it is the notification of the NEEDS_RESET read right after it."""
    vm = Vm()
    fn = _intx_modern(vm)
    vm.acc(R, fn.isr, 0x2, dt=500 * MS)
    t = vm.acc(R, BAR4 + 0x14, 0x4F, dt=1 * MS)
    vm.tick(t + 1 * S)
    assert of(vm.out, Violation) == []
    [view] = vm.views().values()
    assert view.config_interrupts_total == 1
    assert (view.open_episode.evidence, view.open_episode.start_ns) == (Evidence.STATUS_READ, t)


def test_an_isr_config_read_starts_the_wait_of_a_suspicion():
    vm = Vm()
    fn = _intx_modern(vm)
    t = vm.acc(R, fn.isr, 0x2, dt=500 * MS)
    k = vm.kick(fn.notify, dt=100 * MS)
    vm.tick(k + 1 * S)
    [s] = of(vm.out, NeedsResetSuspected)
    assert (s.device, s.since_ns, s.ts_ns) == (FN_NAME, t, k + 1 * S)


def test_device_id_read_before_discovery_types_an_unaligned_window_too():
    vm = Vm()
    base = MMIOW + 0x100                        # found by its init writes at any alignment
    vm.acc(R, base + 0x08, 2, 4)
    mmio(vm, base)
    assert vm.views()[f"mmio-0x{base:x}"].type == "blk"


def test_device_id_read_after_discovery_types_an_unaligned_window_too():
    vm = Vm()
    base = MMIOW + 0x100
    mmio(vm, base)
    vm.acc(R, base + 0x08, 2, 4)
    assert vm.views()[f"mmio-0x{base:x}"].type == "blk"


@pytest.mark.parametrize("pickup", [
    lambda vm: vm.acc(R, MODERN + 0x1014, 0x0F),             # a running status read
    lambda vm: vm.acc(W, MODERN + 0x1014, 0x0F),             # a running status write
    lambda vm: modern(vm, MODERN + 0x1000, (0, 1, 3)),       # the init writes
    lambda vm: vm.acc(R, MODERN + 0x1014, 0, reg=E.Register.STATUS),
], ids=["read", "write", "init", "kernel-marked"])
def test_a_device_evicted_for_a_new_one_ends_its_episode_abandoned_then(pickup):
    vm = Vm(max_devices=1)
    modern(vm)
    vm.acc(R, MODERN + 0x14, 0x4F)
    pickup(vm)
    [ended] = of(vm.out, EpisodeEnded)
    assert ended.episode.outcome == Outcome.ABANDONED and ended.episode.end_ns == vm.t
    assert list(vm.views()) == [f"mmio-0x{MODERN + 0x1000:x}"]


def test_a_hinted_device_evicting_another_ends_its_episode_abandoned_then():
    hint = DeviceHint(MMIO, MODERN + 0x1014, type="net")
    vm = Vm(max_devices=1, hints=(hint,))
    modern(vm)
    vm.acc(R, MODERN + 0x14, 0x4F)
    t = vm.acc(R, MODERN + 0x1014, 0)
    [ended] = of(vm.out, EpisodeEnded)
    assert ended.episode.outcome == Outcome.ABANDONED and ended.episode.end_ns == t


def test_a_restored_episode_s_first_write_with_driver_ok_is_its_recovery():
    """docs/run.md "Restarts": a driver write during NEEDS_RESET with no reset seen follows a
    reset in the gap: it is the re-initialisation, measured (DRIVER_OK: recovered then)."""
    vm = restored_during_an_episode()
    t = vm.acc(W, MODERN + 0x14, 0x0F)
    [ended] = of(vm.out, EpisodeEnded)
    assert ended.episode.outcome == Outcome.RECOVERED and ended.episode.driver_ok_ns == t
    assert ended.episode.reinit_values == [0x0F]


def test_a_device_found_from_traffic_recovers_by_its_reset_and_re_initialisation():
    """2.1.2 / 3.1.1: NEEDS_RESET read, reset written, 0 read back, init again to DRIVER_OK:
    recovered at DRIVER_OK; the values written after the reset are kept (max_reinit_values)."""
    vm = Vm(max_reinit_values=2)
    modern(vm)
    saw = vm.acc(R, MODERN + 0x14, 0x4F)
    reset = vm.acc(W, MODERN + 0x14, 0)
    done = vm.acc(R, MODERN + 0x14, 0)
    modern(vm, MODERN, (1, 3, 11))
    ok = vm.acc(W, MODERN + 0x14, 15)
    [ended] = of(vm.out, EpisodeEnded)
    ep = ended.episode
    assert (ep.outcome, ep.vm.name, ep.device) == (Outcome.RECOVERED, NAME, f"mmio-0x{MODERN:x}")
    assert (ep.start_ns, ep.guest_saw_ns, ep.reset_written_ns, ep.reset_done_ns,
            ep.driver_ok_ns) == (saw, saw, reset, done, ok)
    assert ep.reinit_values == [1, 3]
    [view] = vm.views().values()
    assert (view.recoveries_total, view.resets_total, view.needs_reset_total) == (1, 2, 1)
