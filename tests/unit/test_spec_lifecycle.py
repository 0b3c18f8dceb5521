"""VM and device lifecycle against docs/correlation.md ("VMs", "Discovery from traffic",
bounds and evictions, retention of exited VMs, pid reuse, hints, `annotate_device`,
`snapshot`, `stats`) and the output contract: the `WatchRegister` / `WatchInterrupt` outputs
are what capture applies to its kernel maps, so every removal mirrors an earlier addition, and
what a removed device watched goes away while what a live device still uses stays.

Expected values come from those rules. The `Capture` class below applies the watch outputs the
way capture does (a map per kind; adding twice is one entry) and refuses a removal of what is
not there, or an output that is neither an add nor a removal.
"""
from __future__ import annotations

import pytest

from agent import events as E
from agent.correlate import Correlator, CorrelatorConfig, DeviceHint
from agent.correlate.checkpoint import dump
from agent.model import (
    EpisodeEnded, NeedsResetSuspected, Outcome, Rule, Transport, Violation, VmIdentity,
    WatchInterrupt, WatchRegister,
)
from pciguest import Function, Guest

S = 1_000_000_000
MS = 1_000_000
MMIO, PIO = E.Space.MMIO, E.Space.PIO
R, W = E.Op.READ, E.Op.WRITE
RUNNING = 0x0F          # ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK
LEGACY_RUNNING = 0x07   # ACKNOWLEDGE | DRIVER | DRIVER_OK (legacy has no FEATURES_OK)
NEEDS_RESET = 0x4F


def cfg(**kw) -> CorrelatorConfig:
    kw.setdefault("reorder_window_ns", 0)
    return CorrelatorConfig(**kw)


def acc(ts, addr, value, op=R, size=1, space=MMIO, pid=100, register=E.Register.UNKNOWN):
    return E.RegisterAccess(ts, pid, 1, space, op, addr, size, value, register)


def modern(base, ts, value=RUNNING, pid=100, op=R):
    """A 1-byte access of a modern common cfg's device_status (+0x14)."""
    return acc(ts, base + 0x14, value, op=op, pid=pid)


def legacy(base, ts, value=LEGACY_RUNNING, pid=100, op=R):
    """A 1-byte access of a legacy I/O BAR's status (+18)."""
    return acc(ts, base + 18, value, op=op, space=PIO, pid=pid)


def vmmio(base, ts, value=RUNNING, pid=100, op=R):
    """A 4-byte access of a virtio-mmio window's Status (+0x70)."""
    return acc(ts, base + 0x70, value, op=op, size=4, pid=pid)


class Capture:
    """Capture's watch maps as the outputs drive them (the kernel maps must stay exact)."""

    def __init__(self) -> None:
        self.regs: dict = {}     # (pid, space, addr) -> register
        self.irqs: set = set()   # (pid, "vector" | "gsi", n)

    def apply(self, outs) -> list:
        for o in outs:
            assert o is not None
            if isinstance(o, WatchRegister):
                assert o.add is True or o.add is False, o
                assert isinstance(o.pid, int) and o.space in (MMIO, PIO), o
                assert isinstance(o.addr, int) and isinstance(o.register, int), o
                key = (o.pid, o.space, o.addr)
                if o.add:
                    self.regs[key] = o.register
                else:
                    assert self.regs.get(key) == o.register, f"removes what is not watched: {o}"
                    del self.regs[key]
            elif isinstance(o, WatchInterrupt):
                assert o.add is True or o.add is False, o
                assert isinstance(o.pid, int), o
                assert (o.vector is None) != (o.gsi is None), o
                key = (o.pid, "vector", o.vector) if o.vector is not None else (o.pid, "gsi", o.gsi)
                if o.add:
                    self.irqs.add(key)
                else:
                    assert key in self.irqs, f"removes what is not watched: {o}"
                    self.irqs.discard(key)
        return outs

    def regs_of(self, pid: int) -> dict:
        return {k[1:]: v for k, v in self.regs.items() if k[0] == pid}

    def irqs_of(self, pid: int) -> set:
        return {k[1:] for k in self.irqs if k[0] == pid}


def feed_all(c: Correlator, events, cap: Capture | None = None) -> list:
    out = []
    for ev in events:
        out += c.feed(ev)
    out += c.flush()
    if cap is not None:
        cap.apply(out)
    return out


def devices(snap, exited=None) -> dict:
    return {(v.vm.name, v.device): v for v in snap.devices
            if exited is None or v.exited == exited}


def violation(c: Correlator, base: int, ts: int, pid: int = 100) -> list:
    """A modern device found from its init (0, 1, 3, 7, 15) whose driver then clears
    DRIVER_OK without a reset: status_bit_cleared_without_reset (virtio 1.x 2.1)."""
    out = []
    for i, v in enumerate((0, 1, 3, 7, RUNNING, 7)):
        out += c.feed(modern(base, ts + i, v, pid=pid, op=W))
    return out + c.flush()


# -- VMs: identity ---------------------------------------------------------------------------

def test_events_without_vmstarted_make_a_vm_named_after_the_pid():
    """"events of a pid with no VmStarted create a VM named pid-<pid> (start_time 0, vmm
    unknown)"."""
    c = Correlator(cfg())
    feed_all(c, [modern(0xFE000000, 1000, pid=321)])
    (view,) = c.snapshot(2000).devices
    assert view.vm == VmIdentity(pid=321, start_time=0, name="pid-321", namespace="", uuid="",
                                 vmm="unknown")
    assert c.identities() == [view.vm]


def test_vmstarted_renames_a_made_up_identity_with_its_episodes_and_violations():
    """A VmStarted for a pid whose VM has a made-up identity renames that VM: its open
    episodes and violation counts follow. `changes` is bumped (the identity is saved)."""
    c = Correlator(cfg())
    violation(c, 0xFE000000, 1000)
    feed_all(c, [modern(0xFD000000, 2000), modern(0xFD000000, 2001, NEEDS_RESET)])
    old = VmIdentity(pid=100, start_time=0, name="pid-100", vmm="unknown")
    assert c.snapshot(3000).violations == {(old, Rule.BIT_CLEARED_WITHOUT_RESET): 1}
    before = c.changes
    assert before >= 1
    feed_all(c, [E.VmStarted(2500, 100, start_time=5, name="vm-a")])
    new = VmIdentity(pid=100, start_time=5, name="vm-a")
    assert c.changes > before
    snap = c.snapshot(3000)
    assert snap.violations == {(new, Rule.BIT_CLEARED_WITHOUT_RESET): 1}
    (ep,) = [v.open_episode for v in snap.devices if v.open_episode is not None]
    assert ep.vm == new and ep.device == "mmio-0xfd000000"
    assert {v.vm for v in snap.devices} == {new}
    assert c.identities() == [new]
    # the saved state says the identity is the real one now
    (entry,) = dump(c)["vms"]
    assert entry["fallback"] == False and entry["identity"]["name"] == "vm-a"  # noqa: E712


def test_vmstarted_repeated_with_the_same_identity_keeps_the_violation_counts():
    """"A VmStarted for a pid whose VM has ... the same start_time, renames that VM (its open
    episodes and violation counts follow)": announced again unchanged, the counts stay."""
    c = Correlator(cfg())
    feed_all(c, [E.VmStarted(500, 100, start_time=5, name="vm-a")])
    violation(c, 0xFE000000, 1000)
    ident = VmIdentity(pid=100, start_time=5, name="vm-a")
    assert c.snapshot(3000).violations == {(ident, Rule.BIT_CLEARED_WITHOUT_RESET): 1}
    feed_all(c, [E.VmStarted(2600, 100, start_time=5, name="vm-a")])
    assert c.snapshot(3000).violations == {(ident, Rule.BIT_CLEARED_WITHOUT_RESET): 1}


def test_after_the_rename_a_different_start_time_is_pid_reuse():
    """Once a VM has its real identity, a VmStarted with a different start_time is pid reuse:
    the old VM ends (open episodes abandoned) and a new one begins; nothing is shared."""
    c = Correlator(cfg())
    feed_all(c, [modern(0xFD000000, 1000), modern(0xFD000000, 1001, NEEDS_RESET),
                 E.VmStarted(1500, 100, start_time=5, name="vm-a")])
    out = feed_all(c, [E.VmStarted(2000, 100, start_time=9, name="vm-b")])
    (ended,) = [o.episode for o in out if isinstance(o, EpisodeEnded)]
    assert ended.outcome == Outcome.ABANDONED and ended.vm.name == "vm-a"
    snap = c.snapshot(3000)
    assert [(v.vm.name, v.exited) for v in snap.devices] == [("vm-a", True)]
    assert [i.name for i in c.identities()] == ["vm-b"]


def test_a_renamed_series_adds_to_the_count_kept_for_the_same_identity():
    """Violation counts are cumulative per (VM, rule): a VM whose identity still has a count
    kept for scrapes (its exit is retained) adds its own to it when it takes that identity."""
    c = Correlator(cfg())
    ident = VmIdentity(pid=100, start_time=5, name="vm-a")
    feed_all(c, [E.VmStarted(500, 100, start_time=5, name="vm-a")])
    violation(c, 0xFE000000, 1000)
    feed_all(c, [E.ProcessExit(2000, 100)])
    assert c.snapshot(2000).violations == {(ident, Rule.BIT_CLEARED_WITHOUT_RESET): 1}
    violation(c, 0xFE000000, 3000)        # events after the exit: a pid-100 VM
    feed_all(c, [E.VmStarted(4000, 100, start_time=5, name="vm-a")])
    assert c.snapshot(5000).violations == {(ident, Rule.BIT_CLEARED_WITHOUT_RESET): 2}


def test_exit_bumps_changes_even_for_a_vm_without_devices():
    """ProcessExit ends the VM: what checkpoint saves changed (the VM is gone)."""
    c = Correlator(cfg())
    feed_all(c, [E.IrqLine(1000, 100, 1, gsi=5, level=1)])
    assert c.identities()
    feed_all(c, [E.IrqLine(1100, 100, 1, gsi=5, level=1)])
    before = c.changes
    assert before >= 1
    feed_all(c, [E.ProcessExit(2000, 100)])
    assert c.changes > before
    assert c.identities() == []


# -- retention of exited VMs ----------------------------------------------------------------

def test_exited_vm_kept_for_retain_exited_ns_then_gone_with_its_violations():
    """After ProcessExit the devices (exited=True) and violation counts stay in snapshots for
    retain_exited_ns: at exit + retain they are gone. Even 1 ns of retention keeps them."""
    c = Correlator(cfg(retain_exited_ns=1))
    violation(c, 0xFE000000, 1000)
    feed_all(c, [E.ProcessExit(2000, 100)])
    snap = c.snapshot(2000)
    assert [(v.device, v.exited) for v in snap.devices] == [("mmio-0xfe000000", True)]
    assert sum(snap.violations.values()) == 1
    assert c.stats()["retired_vms"] == 1
    assert c.snapshot(2001).devices == []


def test_retention_boundary_and_expiry_on_tick():
    c = Correlator(cfg(retain_exited_ns=10 * S))
    violation(c, 0xFE000000, 1000)
    feed_all(c, [E.ProcessExit(2000, 100)])
    assert len(c.snapshot(2000 + 10 * S - 1).devices) == 1
    assert c.snapshot(2000 + 10 * S).devices == []
    c.tick(2000 + 10 * S)
    assert c.stats()["retired_vms"] == 0
    assert c.snapshot(2000).violations == {}


def test_exited_vms_kept_up_to_max_devices_oldest_freed_first():
    """At most max_devices devices of exited VMs are kept, the oldest exit freed first."""
    c = Correlator(cfg(max_devices=2))
    for i, pid in enumerate((1, 2, 3)):
        t = (i + 1) * 10_000
        feed_all(c, [modern(0xFE000000, t, pid=pid), E.ProcessExit(t + 100, pid)])
        if pid == 2:
            assert sorted(v.vm.pid for v in c.snapshot(t + 200).devices) == [1, 2]
    assert sorted(v.vm.pid for v in c.snapshot(40_000).devices) == [2, 3]
    assert c.stats()["retired_vms"] == 2


def test_expired_exits_no_longer_count_against_the_bound():
    c = Correlator(cfg(max_devices=2, retain_exited_ns=1 * S))
    feed_all(c, [modern(0xFE000000, 1000, pid=1), E.ProcessExit(2000, 1)])
    c.tick(3 * S)                       # pid 1's retention is over
    assert c.snapshot(3 * S).devices == []
    for pid, t in ((2, 4 * S), (3, 4 * S + 10_000)):
        feed_all(c, [modern(0xFE000000, t, pid=pid), E.ProcessExit(t + 100, pid)])
    assert sorted(v.vm.pid for v in c.snapshot(4 * S + 20_000).devices) == [2, 3]


def test_pid_reuse_old_series_dropped_when_retention_ends_while_new_vm_lives():
    """The old VM's violation counts are kept for retain_exited_ns, then dropped (bounded
    label set), even though a new VM now has its pid."""
    c = Correlator(cfg(retain_exited_ns=1 * S))
    feed_all(c, [E.VmStarted(500, 100, start_time=5, name="old")])
    violation(c, 0xFE000000, 1000)
    feed_all(c, [E.VmStarted(2000, 100, start_time=9, name="new")])
    violation(c, 0xFD000000, 3000)
    old = VmIdentity(pid=100, start_time=5, name="old")
    new = VmIdentity(pid=100, start_time=9, name="new")
    assert set(c.snapshot(4000).violations) == {(old, Rule.BIT_CLEARED_WITHOUT_RESET),
                                                (new, Rule.BIT_CLEARED_WITHOUT_RESET)}
    c.tick(2 * S)
    assert c.snapshot(2 * S).violations == {(new, Rule.BIT_CLEARED_WITHOUT_RESET): 1}


def test_evicted_vm_violations_dropped_others_kept():
    """Bounds: a new VM beyond max_vms evicts the VM with the oldest last event; violation
    counts of a VM that is gone are dropped, the others stay."""
    c = Correlator(cfg(max_vms=2))
    violation(c, 0xFE000000, 1000, pid=1)
    violation(c, 0xFE000000, 2000, pid=2)
    feed_all(c, [modern(0xFE000000, 3000, pid=3)])
    snap = c.snapshot(4000)
    assert snap.evictions["vm"] == 1
    assert [k[0].pid for k in snap.violations] == [2]
    assert [v.vm.pid for v in snap.devices] == [2, 3]      # evicted VMs are not kept


# -- snapshot and stats ----------------------------------------------------------------------

def test_snapshot_marks_an_open_episode_stuck_once_old_enough():
    """"snap: open episodes carry stuck=True once old enough" (stuck_after_ns old, at
    snapshot time, whether or not a tick has reported it)."""
    c = Correlator(cfg(stuck_after_ns=10 * S))
    t = 1000 * S
    feed_all(c, [modern(0xFE000000, t - 1), modern(0xFE000000, t, NEEDS_RESET)])
    snap = c.snapshot(t + 1)
    assert snap.now_ns == t + 1
    (v,) = snap.devices
    assert v.open_episode.start_ns == t and v.open_episode.stuck is False
    assert c.snapshot(t + 10 * S - 1).devices[0].open_episode.stuck is False
    assert c.snapshot(t + 10 * S).devices[0].open_episode.stuck is True


def test_snapshot_status_zero_for_a_device_never_read():
    """A hinted device of a named VM exists from the start; its status is not seen yet: 0."""
    hint = DeviceHint(MMIO, 0xFE000014, transport=Transport.PCI_MODERN, type="net", vm="vm-a")
    c = Correlator(cfg(hints=(hint,)))
    feed_all(c, [E.VmStarted(1000, 100, start_time=5, name="vm-a")])
    (v,) = c.snapshot(2000).devices
    assert (v.device, v.type, v.status) == ("mmio-0xfe000000", "net", 0)


def test_pending_suspicion_is_not_shown_as_suspected():
    """A config interrupt on the hinted vector is counted; the suspicion it opens is pending
    (`pending_suspicions`), not a NEEDS_RESET suspicion: suspected_since_ns stays None."""
    hint = DeviceHint(MMIO, 0xFE000014, transport=Transport.PCI_MODERN, config_vector=0x41)
    c = Correlator(cfg(hints=(hint,)))
    feed_all(c, [modern(0xFE000000, 1000), E.ApicAccepted(2000, 100, 1, apicid=0, vector=0x41)])
    (v,) = c.snapshot(3000).devices
    assert v.config_interrupts_total == 1
    assert v.suspected_since_ns is None
    assert c.stats()["pending_suspicions"] == 1


def test_buffered_events_counts_what_the_reorder_window_holds():
    c = Correlator(CorrelatorConfig(reorder_window_ns=50 * MS))
    c.feed(modern(0xFE000000, 1000))
    c.feed(modern(0xFE000000, 2000))
    assert c.stats()["buffered_events"] == 2
    c.flush()
    assert c.stats()["buffered_events"] == 0


def test_pci_model_of_an_unknown_pid_is_none():
    c = Correlator(cfg())
    assert c.pci_model(999) is None


# -- annotate_device ---------------------------------------------------------------------------

def test_annotate_sets_the_type_and_without_a_pci_address_keeps_the_name():
    c = Correlator(cfg())
    feed_all(c, [modern(0xFE000000, 1000)])
    before = c.changes
    assert before >= 1
    assert c.annotate_device(100, MMIO, 0xFE000014, "net") is True
    assert c.changes > before
    before = c.changes
    assert c.annotate_device(100, MMIO, 0xFE000015, "blk") is True   # any of its registers
    assert c.changes > before
    (v,) = c.snapshot(2000).devices
    assert (v.device, v.type) == ("mmio-0xfe000000", "blk")
    assert c.stats().get("devices_renamed", 0) == 0
    assert c.annotate_device(100, MMIO, 0xFD000014, "net") is False
    assert c.annotate_device(7, MMIO, 0xFE000014, "net") is False


def test_annotate_with_pci_address_renames_and_the_open_episode_follows():
    """Given its PCI address the device takes the name pci-<bdf> (devices_renamed); its open
    episode follows. A name another device already has is not taken."""
    c = Correlator(cfg())
    feed_all(c, [modern(0xFE000000, 1000), modern(0xFE000000, 1001, NEEDS_RESET),
                 modern(0xFD000000, 1002), modern(0xFC000000, 1003)])
    assert c.annotate_device(100, MMIO, 0xFE000014, "rng", bdf="0000:00:03.0")
    assert c.annotate_device(100, MMIO, 0xFD000014, "net", bdf="0000:00:04.0")
    assert c.stats()["devices_renamed"] == 2
    # a third device told the address of the first: its type is set, its name is kept
    assert c.annotate_device(100, MMIO, 0xFC000014, "blk", bdf="0000:00:03.0")
    snap = c.snapshot(2000)
    assert sorted((v.device, v.type) for v in snap.devices) == [
        ("mmio-0xfc000000", "blk"), ("pci-0000:00:03.0", "rng"), ("pci-0000:00:04.0", "net")]
    (ep,) = [v.open_episode for v in snap.devices if v.open_episode is not None]
    assert ep.device == "pci-0000:00:03.0"
    assert c.stats()["devices_renamed"] == 2
    out = feed_all(c, [E.ProcessExit(3000, 100)])
    (ended,) = [o.episode for o in out if isinstance(o, EpisodeEnded)]
    assert ended.device == "pci-0000:00:03.0"


def test_annotate_does_not_rename_an_enumerated_device():
    """A device whose enumeration was seen already has its PCI name."""
    c = Correlator(cfg())
    fn = Function(0x18, type="rng")
    t = [0]

    def clock():
        t[0] += 1000
        return t[0]
    evs: list = []
    Guest(100, 2, clock, evs.append).program(fn, config_vector=0x41)
    feed_all(c, evs + [modern(fn.common, t[0] + 1000)])
    assert c.annotate_device(100, MMIO, fn.common + 0x14, "net", bdf="0000:00:09.0")
    (v,) = c.snapshot(t[0] + 2000).devices
    assert (v.device, v.type) == ("pci-0000:00:03.0", "net")


# -- discovery and hints ---------------------------------------------------------------------

def test_repeated_vmstarted_does_not_make_a_hinted_device_again():
    """Hints naming a VM are devices from the start; the same identity announced again
    keeps that device (its counters) and asks capture for nothing more."""
    hint = DeviceHint(MMIO, 0xFE000014, transport=Transport.PCI_MODERN, vm="vm-a")
    c = Correlator(cfg(hints=(hint,)))
    cap = Capture()
    feed_all(c, [E.VmStarted(1000, 100, start_time=5, name="vm-a"),
                 modern(0xFE000000, 1100, 0, op=W)], cap)
    out = feed_all(c, [E.VmStarted(2000, 100, start_time=5, name="vm-a")], cap)
    assert [o for o in out if isinstance(o, (WatchRegister, WatchInterrupt))] == []
    assert c.stats()["devices_discovered"] == 1
    (v,) = c.snapshot(3000).devices
    assert v.resets_total == 1


def test_least_recently_active_device_evicted_first_hinted_devices_included():
    """Bounds: the least recently active device is evicted; a named hint's device, active
    since its VM appeared, is the oldest here."""
    hint = DeviceHint(MMIO, 0xFE000014, transport=Transport.PCI_MODERN, vm="vm-a")
    c = Correlator(cfg(hints=(hint,), max_devices=2))
    feed_all(c, [E.VmStarted(1000, 100, start_time=5, name="vm-a"),
                 modern(0xFD000000, 2000), modern(0xFC000000, 3000)])
    snap = c.snapshot(4000)
    assert snap.evictions["device"] == 1
    assert sorted(v.device for v in snap.devices) == ["mmio-0xfc000000", "mmio-0xfd000000"]


def test_legacy_device_type_not_taken_from_a_byte_at_offset_8():
    """Only virtio-mmio has a DeviceID register at +0x08; a legacy device found from traffic
    has type unknown whatever was read at its +8."""
    c = Correlator(cfg())
    feed_all(c, [acc(900, 0xC008, 1, space=PIO), legacy(0xC000, 1000)])
    (v,) = c.snapshot(2000).devices
    assert (v.device, v.transport, v.type) == ("pio-0xc000", Transport.PCI_LEGACY, "unknown")


def test_mmio_device_type_from_its_device_id_read():
    c = Correlator(cfg())
    feed_all(c, [acc(900, 0xFEB00008, 2, size=4), vmmio(0xFEB00000, 1000)])
    (v,) = c.snapshot(2000).devices
    assert (v.device, v.transport, v.type) == ("mmio-0xfeb00000", Transport.MMIO, "blk")


def test_a_confirmed_status_register_is_no_candidate_any_more():
    """Unconfirmed addresses are kept in an LRU of max_candidates_per_vm; an address confirmed
    as a status register (here by the driver's 0, 1, 3) leaves it."""
    c = Correlator(cfg(max_candidates_per_vm=2))
    feed_all(c, [modern(0xFE000010, 1000 + i, v, op=W) for i, v in enumerate((0, 1, 3))])
    assert c.stats()["devices_discovered"] == 1
    feed_all(c, [acc(2000, 0xFD000123, 0), acc(2001, 0xFD000456, 0)])
    assert c.stats().get("candidates_evicted", 0) == 0
    feed_all(c, [acc(2002, 0xFD000789, 0)])
    assert c.stats()["candidates_evicted"] == 1


def test_evicted_device_found_again_on_its_next_access():
    """An evicted device's registers are no longer its: its next status access discovers it
    again (evicting the other one, max_devices=1)."""
    c = Correlator(cfg(max_devices=1))
    cap = Capture()
    feed_all(c, [modern(0xFE000000, 1000), modern(0xFD000000, 2000)], cap)
    assert [v.device for v in c.snapshot(2500).devices] == ["mmio-0xfd000000"]
    feed_all(c, [modern(0xFE000000, 3000, RUNNING)], cap)
    snap = c.snapshot(4000)
    assert [v.device for v in snap.devices] == ["mmio-0xfe000000"]
    assert snap.evictions["device"] == 2 and c.stats()["devices_discovered"] == 3
    assert cap.regs_of(100) == {(MMIO, 0xFE000014): E.Register.STATUS,
                                (MMIO, 0xFE000015): E.Register.CONFIG_GENERATION,
                                (MMIO, 0xFE000010): E.Register.MSIX_CONFIG}


# -- hinted interrupts and their watches --------------------------------------------------------

def test_hinted_vector_and_gsi_watched_then_removed_with_the_device():
    """A hint's config_vector is exact: its ApicAccepted is the device's config interrupt.
    Capture is asked to watch the device's registers, the vector and the GSI; when the VM
    exits, exactly those watches are removed."""
    hint = DeviceHint(MMIO, 0xFE000014, transport=Transport.PCI_MODERN, config_vector=0x41,
                      gsi=10)
    c = Correlator(cfg(hints=(hint,)))
    cap = Capture()
    out = feed_all(c, [modern(0xFE000000, 1000)], cap)
    assert [o for o in out if isinstance(o, WatchInterrupt)] == [
        WatchInterrupt(100, vector=0x41), WatchInterrupt(100, gsi=10)]
    assert cap.regs_of(100) == {(MMIO, 0xFE000014): E.Register.STATUS,
                                (MMIO, 0xFE000015): E.Register.CONFIG_GENERATION,
                                (MMIO, 0xFE000010): E.Register.MSIX_CONFIG}
    feed_all(c, [E.ApicAccepted(2000, 100, 1, apicid=3, vector=0x41)], cap)
    assert c.snapshot(2500).devices[0].config_interrupts_total == 1
    out = feed_all(c, [E.ProcessExit(3000, 100)], cap)
    assert [o for o in out if isinstance(o, WatchInterrupt)] == [
        WatchInterrupt(100, vector=0x41, add=False), WatchInterrupt(100, gsi=10, add=False)]
    assert sorted((o.addr, o.register) for o in out if isinstance(o, WatchRegister)) == [
        (0xFE000010, E.Register.MSIX_CONFIG), (0xFE000014, E.Register.STATUS),
        (0xFE000015, E.Register.CONFIG_GENERATION)]
    assert all(not o.add for o in out if isinstance(o, WatchRegister))
    assert cap.regs == {} and cap.irqs == set()


def test_device_without_interrupts_removes_only_its_registers():
    c = Correlator(cfg())
    cap = Capture()
    feed_all(c, [modern(0xFE000000, 1000)], cap)
    out = feed_all(c, [E.ProcessExit(2000, 100)], cap)
    assert [o for o in out if not isinstance(o, WatchRegister)] == []
    assert len(out) == 3 and cap.regs == {} and cap.irqs == set()


def test_a_shared_gsi_is_watched_once_and_removed_with_its_last_device():
    """Devices sharing an INTx line: the GSI is watched once, and removed only when no
    remaining device of the VM uses it (evictions, max_devices=3)."""
    hints = (DeviceHint(MMIO, 0xFE000014, transport=Transport.PCI_MODERN, gsi=10),
             DeviceHint(MMIO, 0xFD000014, transport=Transport.PCI_MODERN, gsi=10),
             DeviceHint(MMIO, 0xFC000014, transport=Transport.PCI_MODERN, gsi=11))
    c = Correlator(cfg(hints=hints, max_devices=3))
    cap = Capture()
    out = feed_all(c, [modern(0xFE000000, 1000), modern(0xFD000000, 2000),
                       modern(0xFC000000, 3000)], cap)
    assert [o for o in out if isinstance(o, WatchInterrupt)] == [
        WatchInterrupt(100, gsi=10), WatchInterrupt(100, gsi=11)]
    out = feed_all(c, [modern(0xFB000000, 4000)], cap)      # evicts the first
    assert [o for o in out if isinstance(o, WatchInterrupt)] == []
    assert cap.irqs_of(100) == {("gsi", 10), ("gsi", 11)}
    out = feed_all(c, [modern(0xFA000000, 5000)], cap)      # evicts the second
    assert [o for o in out if isinstance(o, WatchInterrupt)] == [
        WatchInterrupt(100, gsi=10, add=False)]
    assert cap.irqs_of(100) == {("gsi", 11)}
    feed_all(c, [E.ProcessExit(6000, 100)], cap)
    assert cap.regs == {} and cap.irqs == set()


def test_a_vector_still_used_by_a_live_device_stays_watched():
    """Two hints name the same config vector: evicting the first device must not remove the
    vector's watch (nor its attribution) from the device that still has it."""
    hints = (DeviceHint(MMIO, 0xFE000014, transport=Transport.PCI_MODERN, config_vector=0x41),
             DeviceHint(MMIO, 0xFD000014, transport=Transport.PCI_MODERN, config_vector=0x41))
    c = Correlator(cfg(hints=hints, max_devices=2))
    cap = Capture()
    feed_all(c, [modern(0xFE000000, 1000), modern(0xFD000000, 2000)], cap)
    out = feed_all(c, [modern(0xFC000000, 3000)], cap)      # evicts the first
    assert [o for o in out if isinstance(o, WatchInterrupt)] == []
    assert cap.irqs_of(100) == {("vector", 0x41)}
    feed_all(c, [E.ApicAccepted(4000, 100, 1, apicid=0, vector=0x41)], cap)
    views = devices(c.snapshot(5000))
    assert views[("pid-100", "mmio-0xfd000000")].config_interrupts_total == 1


def test_overlapping_register_blocks_removed_without_error():
    """Discovery by 0, 1, 3 takes any alignment, so two legacy blocks can overlap (status of
    one = ISR of the other). Evicting one, then the VM's exit, still removes every watch."""
    c = Correlator(cfg(max_devices=2))
    cap = Capture()
    seq = [legacy(0xC001, 1000 + i, v, op=W) for i, v in enumerate((0, 1, 3))]
    seq += [legacy(0xC000, 2000 + i, v, op=W) for i, v in enumerate((0, 1, 3))]
    seq += [acc(3000, 0xC001 + 20, 1, op=W, size=2, space=PIO)]  # the first device's vector reg
    feed_all(c, seq, cap)
    assert c.stats()["devices_discovered"] == 2
    feed_all(c, [legacy(0xC100, 4000)], cap)          # evicts pio-0xc000 (least recent)
    assert sorted(v.device for v in c.snapshot(5000).devices) == ["pio-0xc001", "pio-0xc100"]
    out = feed_all(c, [E.ProcessExit(6000, 100)])
    removed = {(o.space, o.addr, o.register) for o in out
               if isinstance(o, WatchRegister) and not o.add}
    assert {(PIO, 0xC001 + 18, E.Register.STATUS), (PIO, 0xC001 + 19, E.Register.ISR),
            (PIO, 0xC001 + 20, E.Register.MSIX_CONFIG)} <= removed


def test_kicks_reach_a_device_found_again_after_its_eviction():
    """A virtio-mmio device evicted and found again is a new device: kicks of its QueueNotify
    (+0x50) are its own. Kicked after its config interrupt and followed by silence, it is
    suspected of NEEDS_RESET (docs: suspicion)."""
    base = 0xFEB00000
    hint = DeviceHint(MMIO, base + 0x70, transport=Transport.MMIO, config_vector=0x41)
    c = Correlator(cfg(hints=(hint,), max_devices=2, retain_exited_ns=0))
    feed_all(c, [vmmio(base, 1000), E.QueueNotify(1100, 100, 1, base + 0x50),
                 modern(0xFE000000, 2000, pid=200), modern(0xFD000000, 3000, pid=200)])
    assert c.snapshot(3500).evictions["device"] == 1
    feed_all(c, [E.ProcessExit(4000, 200)])
    feed_all(c, [vmmio(base, 5000)])
    assert [v.device for v in c.snapshot(5500).devices] == ["mmio-0xfeb00000"]
    irq = 10 * S
    out = feed_all(c, [E.ApicAccepted(irq, 100, 1, apicid=0, vector=0x41),
                       E.QueueNotify(irq + MS, 100, 1, base + 0x50)])
    out += c.tick(irq + 3 * S)
    assert [(o.device, o.since_ns) for o in out if isinstance(o, NeedsResetSuspected)] == [
        ("mmio-0xfeb00000", irq)]


# -- PCI devices (enumeration seen) ------------------------------------------------------------

def _program(c: Correlator, cap: Capture, fn: Function, pid: int = 100, t0: int = 0,
             config_vector: int | None = 0x41):
    t = [t0]

    def clock():
        t[0] += 1000
        return t[0]
    evs: list = []
    g = Guest(pid, 2, clock, evs.append)
    g.program(fn, config_vector=config_vector, queue_vector=0x42)
    out = feed_all(c, evs, cap)
    return g, out, t[0]


def test_evicted_pci_device_removes_its_plan_and_vector_watches():
    """An enumerated device evicted (max_devices=1): capture stops watching its registers and
    its config vector; what remains watched is the new device's registers only."""
    c = Correlator(cfg(max_devices=1))
    cap = Capture()
    fn = Function(0x18, type="rng", bar4=0xFE000000)
    _, out, t = _program(c, cap, fn)
    assert [v.device for v in c.snapshot(t).devices] == ["pci-0000:00:03.0"]
    assert cap.irqs_of(100) == {("vector", 0x41)}
    watched = cap.regs_of(100)
    assert watched[(MMIO, 0xFE000014)] == E.Register.STATUS
    assert (MMIO, 0xFE001000) in watched        # ISR capability
    out = feed_all(c, [modern(0xFD000000, t + 1000)], cap)
    removed = {(o.space, o.addr): o.register for o in out
               if isinstance(o, WatchRegister) and not o.add}
    assert removed == watched
    assert WatchInterrupt(100, vector=0x41, add=False) in out
    assert cap.irqs_of(100) == set()
    assert cap.regs_of(100) == {(MMIO, 0xFD000014): E.Register.STATUS,
                                (MMIO, 0xFD000015): E.Register.CONFIG_GENERATION,
                                (MMIO, 0xFD000010): E.Register.MSIX_CONFIG}
    # its config interrupt is not attributed any more: progress only
    feed_all(c, [E.ApicAccepted(t + 2000, 100, 1, apicid=0, vector=0x41)], cap)
    assert all(v.config_interrupts_total == 0 for v in c.snapshot(t + 3000).devices)


def test_pci_vm_exit_removes_every_watch():
    c = Correlator(cfg())
    cap = Capture()
    _, _, t = _program(c, cap, Function(0x18, type="rng", bar4=0xFE000000))
    assert cap.regs_of(100) and cap.irqs_of(100)
    feed_all(c, [E.ProcessExit(t + 1000, 100)], cap)
    assert cap.regs == {} and cap.irqs == set()


def test_two_functions_at_the_same_address_exit_cleanly():
    """A firmware conflict: two functions with the same BAR. Both are devices; the VM's exit
    removes every watch without error."""
    c = Correlator(cfg())
    cap = Capture()
    _, _, t = _program(c, cap, Function(0x18, type="rng", bar4=0xFE000000))
    _, _, t = _program(c, cap, Function(0x20, type="net", bar4=0xFE000000), t0=t)
    assert sorted(v.device for v in c.snapshot(t).devices) == ["pci-0000:00:03.0",
                                                              "pci-0000:00:04.0"]
    out = feed_all(c, [E.ProcessExit(t + 1000, 100)])
    assert any(isinstance(o, WatchRegister) and not o.add for o in out)
    assert c.identities() == []


def test_pci_device_whose_bar_was_unassigned_can_still_be_evicted():
    """A guest unassigning the BAR holding the structures (writing base 0): the registers are
    unwatched at once; the device remains until evicted, which then goes without error."""
    c = Correlator(cfg(max_devices=1))
    cap = Capture()
    fn = Function(0x18, type="rng", bar4=0xFE000000)
    g, _, t = _program(c, cap, fn)
    evs: list = []
    g.emit = evs.append
    fn._w(0x20, 4, 0x4)
    g.cfg_write(fn, 0x20, 0x4)
    feed_all(c, evs, cap)
    assert (MMIO, 0xFE000014) not in cap.regs_of(100)
    out = feed_all(c, [modern(0xFD000000, 10 * S)], cap)
    snap = c.snapshot(11 * S)
    assert [v.device for v in snap.devices] == ["mmio-0xfd000000"]
    assert snap.evictions["device"] == 1
    assert not any(isinstance(o, WatchRegister) and not o.add and o.addr >= 0xFE000000
                   for o in out)


def test_vm_eviction_after_its_model_was_dropped():
    """Device models are bounded (2 * max_vms, LRU). A VM whose model was dropped can still be
    evicted: its devices go, the new VM comes."""
    c = Correlator(CorrelatorConfig(max_vms=1, reorder_window_ns=50 * MS))
    cap = Capture()
    _, _, t = _program(c, cap, Function(0x18, type="rng", bar4=0xFE000000), pid=1)
    g2 = Guest(2, 2, lambda: t + 1000, lambda ev: c.feed(ev))
    g3 = Guest(3, 2, lambda: t + 1000, lambda ev: c.feed(ev))
    g2.probe_empty(0x18)
    g3.probe_empty(0x18)
    c.flush()
    snap = c.snapshot(t + 2000)
    assert snap.evictions["vm"] == 2
    assert snap.devices == [] and [i.pid for i in c.identities()] == [3]


def test_msix_reprogramming_after_eviction_is_followed_when_the_device_comes_back():
    """The device model is per VM and bounded on its own (256 functions); "Reprogramming (irq
    affinity, masking) is followed". A device evicted by max_devices comes back with the next
    configuration access of its function, with the config vector the guest programmed
    meanwhile (capture still forwards writes in the VM's virtio BARs)."""
    c = Correlator(cfg(max_devices=1))
    cap = Capture()
    fn = Function(0x18, type="rng", bar4=0xFE000000)
    g, _, t = _program(c, cap, fn)
    feed_all(c, [modern(0xFD000000, t + 1000)], cap)          # evicts it
    evs: list = []
    g.emit = evs.append
    g.clock = lambda: t + 2000
    g.msix_entry(fn, 0, 0x51)                                 # irq affinity: a new vector
    g.cfg_read(fn, 0x00)                                      # the function's config read
    feed_all(c, evs, cap)
    assert [v.device for v in c.snapshot(t + 3000).devices] == ["pci-0000:00:03.0"]
    assert cap.irqs_of(100) == {("vector", 0x51)}
    feed_all(c, [E.ApicAccepted(t + 4000, 100, 1, apicid=0, vector=0x51)], cap)
    assert c.snapshot(t + 5000).devices[0].config_interrupts_total == 1



def test_without_retention_an_exited_identity_starts_again_from_zero():
    """retain_exited_ns=0: an exited VM is not kept, its violation counts go at its end. Here
    pid reuse twice within one reordering window brings the first identity back: it is a new
    VM ("state is never shared") and starts with no violations."""
    c = Correlator(CorrelatorConfig(retain_exited_ns=0, reorder_window_ns=50 * MS))
    feed_all(c, [E.VmStarted(500, 100, start_time=5, name="vm-a")])
    violation(c, 0xFE000000, 1000)
    assert sum(c.snapshot(2000).violations.values()) == 1
    for ev in (E.VmStarted(2000, 100, start_time=9, name="vm-b"),
               E.VmStarted(3000, 100, start_time=5, name="vm-a")):
        c.feed(ev)
    c.flush()
    snap = c.snapshot(4000)
    assert snap.violations == {} and snap.devices == []
    assert [i.name for i in c.identities()] == ["vm-a"]


def test_violation_of_a_vm_that_exits_in_the_same_window_is_not_kept_without_retention():
    """"Violation counts of a VM that is gone are dropped (so their label set stays
    bounded)"; with retain_exited_ns=0 nothing of an exited VM is kept."""
    c = Correlator(CorrelatorConfig(retain_exited_ns=0, reorder_window_ns=50 * MS))
    out = []
    for i, v in enumerate((0, 1, 3, 7, RUNNING, 7)):
        out += c.feed(modern(0xFE000000, 1000 + i, v, op=W))
    out += c.feed(E.ProcessExit(2000, 100))
    out += c.flush()
    assert [o.rule for o in out if isinstance(o, Violation)] == [Rule.BIT_CLEARED_WITHOUT_RESET]
    c.tick(10 * S)
    assert c.snapshot(10 * S).violations == {}


def test_violation_of_a_vm_evicted_in_the_same_window_is_not_kept():
    """The same rule for a VM evicted by max_vms: its counts go with it, even when its
    violation and the event that evicts it are released by one drain."""
    c = Correlator(CorrelatorConfig(max_vms=1, reorder_window_ns=50 * MS))
    out = []
    for i, v in enumerate((0, 1, 3, 7, RUNNING, 7)):
        out += c.feed(modern(0xFE000000, 1000 + i, v, op=W, pid=1))
    out += c.feed(modern(0xFD000000, 2000, pid=2))
    out += c.flush()
    assert [o.rule for o in out if isinstance(o, Violation)] == [Rule.BIT_CLEARED_WITHOUT_RESET]
    snap = c.snapshot(3000)
    assert snap.evictions["vm"] == 1 and [i.pid for i in c.identities()] == [2]
    assert snap.violations == {}
