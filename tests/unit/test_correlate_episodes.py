"""Discovery, the state machine and NEEDS_RESET episodes on scripted streams."""
from __future__ import annotations

import pytest

from agent import events as E
from agent.correlate import Correlator, CorrelatorConfig, DeviceHint
from agent.model import (
    EpisodeEnded, EpisodeStuck, Evidence, Outcome, Rule, Transport, Violation, WatchInterrupt,
    WatchRegister,
)
from test_correlate_guestscript import Script, run

MS = 1_000_000


def ended(out):
    return [o.episode for o in out if isinstance(o, EpisodeEnded)]


def violations(out):
    return [(o.device, o.rule) for o in out if isinstance(o, Violation)]


def check_against_truth(episode, truth):
    for name in ("start_ns", "guest_saw_ns", "reset_written_ns", "reset_done_ns", "driver_ok_ns"):
        assert getattr(episode, name) == getattr(truth, name), name
    assert episode.evidence == truth.evidence
    assert episode.outcome == truth.outcome
    assert episode.device == truth.device


@pytest.mark.parametrize("transport,base,watched", [
    (Transport.PCI_MODERN, 0xFEBF1000, {0x14: E.Register.STATUS, 0x15: E.Register.CONFIG_GENERATION,
                                         0x10: E.Register.MSIX_CONFIG}),
    (Transport.MMIO, 0xFEB00200, {0x70: E.Register.STATUS, 0xFC: E.Register.CONFIG_GENERATION,
                                   0x60: E.Register.ISR, 0x64: E.Register.INTERRUPT_ACK}),
    (Transport.PCI_LEGACY, 0xC040, {18: E.Register.STATUS, 19: E.Register.ISR,
                                     20: E.Register.MSIX_CONFIG}),
])
def test_discovery_from_the_init_sequence_watches_the_layout(transport, base, watched):
    s = Script()
    dev = s.vm(50, "guest1").device(transport, base)
    dev.init()
    c, out = run(s.events)
    regs = {(o.addr - base): o.register for o in out if isinstance(o, WatchRegister)}
    assert regs == watched
    assert all(o.pid == 50 and o.space == dev.space and o.add for o in out
               if isinstance(o, WatchRegister))
    snap = c.snapshot(s.t)
    [view] = snap.devices
    assert (view.device, view.transport, view.status) == (dev.id, transport, dev.init_values[-1])
    assert view.resets_total == 1 and view.vm.name == "guest1"


def test_random_traffic_is_not_a_device():
    s = Script()
    dev = s.vm(50).device(Transport.PCI_MODERN, 0xFEBF1000)
    for v in (0, 1, 0, 5, 3, 0x55, 0xFF, 2, 0):    # never 0,1,3 in a row, never a running status
        dev.access(E.Op.WRITE, v)
    dev.access(E.Op.READ, 0x0F, size=2)             # 2-byte: no transport has a 2-byte status
    c, out = run(s.events)
    assert c.snapshot(s.t).devices == [] and out == []


def test_recovery_with_config_interrupt_measures_every_phase_exactly():
    s = Script()
    dev = s.vm(7, "vm-a").device(Transport.PCI_MODERN, vector=0x41)
    dev.init()
    truth = dev.needs_reset()
    s.step(5 * MS)
    dev.recover()
    c, out = run(s.events, CorrelatorConfig(hints=(dev.hint(),)))
    [ep] = ended(out)
    check_against_truth(ep, truth)
    assert ep.evidence == Evidence.CONFIG_INTERRUPT
    assert ep.recovery_seconds == (truth.driver_ok_ns - truth.start_ns) / 1e9
    assert set(ep.phase_seconds()) == {"notify", "react", "reset", "reinit"}
    assert ep.reinit_values == [1, 3, 11, 15]
    [view] = c.snapshot(s.t).devices
    assert (view.needs_reset_total, view.recoveries_total, view.resets_total,
            view.config_interrupts_total) == (1, 1, 2, 1)
    assert c.snapshot(s.t).episodes_ended == {Outcome.RECOVERED: 1}
    assert violations(out) == []


def test_config_vector_is_learned_from_the_interrupt_right_before_the_first_0x40_read():
    s = Script()
    dev = s.vm(7, "vm-a").device(Transport.PCI_MODERN, vector=0x42)
    dev.init()
    truth = dev.needs_reset()
    dev.recover()
    c, out = run(s.events)          # no hint: the vector is unknown up front
    assert WatchInterrupt(7, vector=0x42) in out
    [ep] = ended(out)
    check_against_truth(ep, truth)
    # the second episode is attributed through the now known vector
    first = len(s.events)
    truth2 = dev.needs_reset()
    dev.recover()
    out2 = []
    for ev in s.events[first:]:
        out2.extend(c.feed(ev))
    out2.extend(c.flush())
    [ep2] = ended(out2)
    check_against_truth(ep2, truth2)


def test_interrupt_of_an_other_known_device_is_not_taken_as_config_interrupt():
    s = Script()
    vm = s.vm(7, "vm-a")
    a = vm.device(Transport.PCI_MODERN, 0xFE000000, vector=0x41)
    b = vm.device(Transport.PCI_MODERN, 0xFE004000, vector=None)
    a.init()
    b.init()
    a.config_interrupt()          # a's interrupt (a known vector), then b is found broken
    truth = b.needs_reset()
    b.recover()
    c, out = run(s.events, CorrelatorConfig(hints=(a.hint(),)))
    [ep] = ended(out)
    assert ep.device == b.id and ep.evidence == Evidence.STATUS_READ
    check_against_truth(ep, truth)


def test_intx_legacy_config_interrupt_found_through_isr_and_gsi_learned():
    s = Script()
    dev = s.vm(9, "old").device(Transport.PCI_LEGACY, 0xC040, gsi=11)
    dev.init()
    truth = dev.needs_reset()
    dev.recover()
    c, out = run(s.events)
    assert WatchInterrupt(9, gsi=11) in out
    [ep] = ended(out)
    check_against_truth(ep, truth)
    assert ep.transport == Transport.PCI_LEGACY and ep.reinit_values == [1, 3, 7]


def test_mmio_device_type_from_device_id_and_magic():
    s = Script()
    dev = s.vm(9, "micro").device(Transport.MMIO, 0xFEB00400, gsi=5)
    dev.access(E.Op.READ, 0x74726976, addr=dev.base, size=4)      # MagicValue
    dev.access(E.Op.READ, 2, addr=dev.base + 0x08, size=4)        # DeviceID: block
    dev.init()
    truth = dev.needs_reset()
    dev.recover()
    c, out = run(s.events)
    [ep] = ended(out)
    check_against_truth(ep, truth)
    assert (ep.type, ep.transport, ep.device) == ("blk", Transport.MMIO, "mmio-0xfeb00400")


def test_polling_guest_without_interrupts_starts_at_the_read():
    s = Script()
    dev = s.vm(3).device(Transport.PCI_MODERN)
    dev.init()
    truth = dev.needs_reset(notify=False)
    dev.recover()
    c, out = run(s.events)
    [ep] = ended(out)
    check_against_truth(ep, truth)
    assert ep.vm.name == "pid-3" and ep.evidence == Evidence.STATUS_READ
    assert violations(out) == []     # no known config vector: nothing to expect


def test_device_running_before_the_agent_is_picked_up_by_its_next_status_read():
    s = Script()
    dev = s.vm(3, "late").device(Transport.PCI_MODERN, 0xFEBF3000)
    dev.status = 0x0F            # initialised before the recording
    truth = dev.needs_reset(notify=False)
    dev.recover()
    c, out = run(s.events)
    [ep] = ended(out)
    check_against_truth(ep, truth)
    assert c.snapshot(s.t).devices[0].resets_total == 1


def test_ordinary_resets_failed_and_violations_are_counted_without_episodes():
    s = Script()
    dev = s.vm(3, "x").device(Transport.PCI_MODERN)
    dev.init()
    dev.init()                    # ordinary reset + re-init
    dev.reinit_without_reset()    # writes 1 over 15: bit cleared
    dev.fail()
    dev.reinit_without_reset()    # after FAILED, no reset
    c, out = run(s.events)
    assert ended(out) == []
    assert violations(out) == [(dev.id, r) for (_, _, r) in s.violations]
    [view] = c.snapshot(s.t).devices
    assert (view.resets_total, view.failed_total, view.needs_reset_total) == (2, 1, 0)
    snap = c.snapshot(s.t)
    assert sum(snap.violations.values()) == 2


def test_needs_reset_without_notification_when_the_vector_is_known():
    s = Script()
    dev = s.vm(3, "x").device(Transport.PCI_MODERN, vector=0x50)
    dev.init()
    dev.needs_reset(notify=False)
    s.step(300 * MS)
    dev.recover()
    c, out = run(s.events, CorrelatorConfig(hints=(dev.hint(),), notify_window_ns=100 * MS))
    assert violations(out) == [(dev.id, Rule.NEEDS_RESET_WITHOUT_NOTIFY)]


def test_late_notification_within_the_window_is_no_violation():
    s = Script()
    dev = s.vm(3, "x").device(Transport.PCI_MODERN, vector=0x50)
    dev.init()
    dev.status |= 0x40
    read_ts = dev.read()          # the guest polls before the MSI arrives
    dev.config_interrupt(gap=1 * MS)
    s.step(300 * MS)
    dev.recover()
    c, out = run(s.events, CorrelatorConfig(hints=(dev.hint(),), notify_window_ns=100 * MS))
    [ep] = ended(out)
    assert violations(out) == [] and ep.start_ns == read_ts
    assert ep.evidence == Evidence.STATUS_READ


def test_config_interrupt_before_driver_ok_is_a_violation():
    s = Script()
    dev = s.vm(3, "x").device(Transport.PCI_MODERN, vector=0x50)
    dev.write(0)
    dev.write(1)
    dev.write(3)
    dev.config_interrupt()
    c, out = run(s.events, CorrelatorConfig(hints=(dev.hint(),)))
    assert violations(out) == [(dev.id, Rule.NOTIFY_BEFORE_DRIVER_OK)]


def test_stuck_once_then_abandoned_on_exit():
    s = Script()
    vm = s.vm(3, "x")
    dev = vm.device(Transport.PCI_MODERN)
    dev.init()
    truth = dev.needs_reset(notify=False)
    c, out = run(s.events, CorrelatorConfig(stuck_after_ns=10 * MS))
    assert out[-1:] == [] or not any(isinstance(o, EpisodeStuck) for o in out)
    stuck = [o for o in c.tick(truth.start_ns + 20 * MS) if isinstance(o, EpisodeStuck)]
    assert len(stuck) == 1 and stuck[0].episode.stuck
    assert not any(isinstance(o, EpisodeStuck) for o in c.tick(truth.start_ns + 40 * MS))
    view = c.snapshot(truth.start_ns + 40 * MS).devices[0]
    assert view.open_episode.stuck and view.open_episode.outcome == Outcome.OPEN
    out = c.feed(E.ProcessExit(truth.start_ns + 50 * MS, 3)) + c.flush()
    [ep] = ended(out)
    assert ep.outcome == Outcome.ABANDONED and ep.end_ns == truth.start_ns + 50 * MS
    # the exited VM's device is only kept (retention), marked exited, with no open episode
    views = c.snapshot(truth.start_ns + 60 * MS).devices
    assert ep.stuck and all(v.exited and v.open_episode is None for v in views)
    assert any(isinstance(o, WatchRegister) and not o.add for o in out)


def test_pid_reuse_abandons_the_old_vm_and_never_mixes_devices():
    s = Script()
    old = s.vm(42, "old", start_time=100)
    d1 = old.device(Transport.PCI_MODERN)
    d1.init()
    d1.needs_reset(notify=False)
    new = s.vm(42, "new", start_time=900)      # same pid, new process, no exit seen
    d2 = new.device(Transport.PCI_MODERN)
    d2.status = 0x0F
    d2.needs_reset(notify=False)
    d2.recover()
    c, out = run(s.events)
    eps = ended(out)
    assert [(e.vm.name, e.vm.start_time, e.outcome) for e in eps] == [
        ("old", 100, Outcome.ABANDONED), ("new", 900, Outcome.RECOVERED)]
    [view] = [v for v in c.snapshot(s.t).devices if not v.exited]
    assert view.vm.name == "new" and view.needs_reset_total == 1


def test_identity_arriving_after_the_first_events_renames_the_fallback():
    s = Script()
    dev = s.vm(42).device(Transport.PCI_MODERN)
    dev.init()
    s.emit(E.VmStarted(s.step(), 42, 555, "late-name", namespace="ns"))
    truth = dev.needs_reset(notify=False)
    dev.recover()
    c, out = run(s.events)
    [ep] = ended(out)
    assert (ep.vm.name, ep.vm.namespace, ep.vm.start_time) == ("late-name", "ns", 555)
    check_against_truth(ep, truth)


def test_vhost_status_episode():
    s = Script()
    t = s.step()
    evs = [E.VhostStatus(t, 5, 6, E.Op.WRITE, 17, 0), E.VhostStatus(t + 1, 5, 6, E.Op.WRITE, 17, 15),
           E.VhostStatus(t + 10, 5, 6, E.Op.READ, 17, 0x4F),
           E.VhostStatus(t + 20, 5, 6, E.Op.WRITE, 17, 0),
           E.VhostStatus(t + 21, 5, 6, E.Op.READ, 17, 0)]
    evs += [E.VhostStatus(t + 30 + i, 5, 6, E.Op.WRITE, 17, v) for i, v in enumerate((1, 3, 11, 15))]
    c, out = run(evs)
    [ep] = ended(out)
    assert (ep.evidence, ep.transport, ep.device) == (Evidence.VHOST, Transport.VHOST, "vhost-fd17")
    assert ep.start_ns == t + 10 and ep.driver_ok_ns == t + 33 and ep.reset_done_ns == t + 21


def test_bounds_evict_oldest_idle_vm_and_device_and_count_them():
    s = Script()
    devs = []
    for pid in range(1, 6):
        d = s.vm(pid, f"vm{pid}").device(Transport.PCI_MODERN)
        d.init()
        devs.append(d)
    c, out = run(s.events, CorrelatorConfig(max_vms=3))
    snap = c.snapshot(s.t)
    assert snap.vms == 3 and snap.evictions["vm"] == 2
    assert sorted(v.vm.name for v in snap.devices) == ["vm3", "vm4", "vm5"]

    s2 = Script()
    vm = s2.vm(1, "many")
    for i in range(5):
        vm.device(Transport.PCI_MODERN, 0xFE000000 + i * 0x4000).init()
    c, out = run(s2.events, CorrelatorConfig(max_devices=2))
    snap = c.snapshot(s2.t)
    assert len(snap.devices) == 2 and snap.evictions["device"] == 3
    removed = {o.addr for o in out if isinstance(o, WatchRegister) and not o.add}
    assert 0xFE000000 + 0x14 in removed


def test_an_evicted_vm_that_comes_back_keeps_its_identity_unless_its_pid_was_reused():
    s = Script()
    devs = {}
    for pid in (1, 2, 3):
        devs[pid] = s.vm(pid, f"vm{pid}").device(Transport.PCI_MODERN)
        devs[pid].init()
    devs[1].init()                       # vm1 was evicted by vm3; it comes back (no VmStarted)
    c, out = run(s.events, CorrelatorConfig(max_vms=2))
    snap = c.snapshot(s.t)
    assert snap.evictions["vm"] == 2
    assert sorted(d.vm.name for d in snap.devices) == ["vm1", "vm3"]

    # the evicted VM's process exits; a new process reuses the pid: no old name for it
    c.feed(E.ProcessExit(s.t + 1, 2))
    c.feed(E.RegisterAccess(s.t + 2, 2, 2, E.Space.MMIO, E.Op.READ, devs[2].status_addr, 1,
                            0x0F))    # a running device, found by its status read
    c.flush()
    names = {d.vm.pid: d.vm.name for d in c.snapshot(s.t + 3).devices}
    assert names[2] == "pid-2"


def test_candidates_per_vm_are_bounded():
    s = Script()
    dev = s.vm(1).device(Transport.PCI_MODERN)
    for i in range(500):
        dev.access(E.Op.WRITE, 0, addr=0xF0000000 + 4 * i)
    c, _ = run(s.events, CorrelatorConfig(max_candidates_per_vm=16))
    assert c.stats()["candidates_evicted"] == 500 - 16


def test_lost_reset_write_is_inferred_from_the_read_of_zero():
    s = Script()
    dev = s.vm(1, "lossy").device(Transport.PCI_MODERN)
    dev.init()
    truth = dev.needs_reset(notify=False)
    dev.recover()
    lost = [e for e in s.events if e.ts_ns == truth.reset_written_ns]
    events = [e for e in s.events if e.ts_ns != truth.reset_written_ns]
    assert len(lost) == 1
    c, out = run(events)
    [ep] = ended(out)
    assert ep.reset_written_ns is None and ep.reset_done_ns == truth.reset_done_ns
    assert ep.driver_ok_ns == truth.driver_ok_ns and violations(out) == []
    assert c.stats()["events_access"] == len(events) - 1   # all but VmStarted


def test_config_validation():
    with pytest.raises(ValueError, match="max_vms"):
        CorrelatorConfig(max_vms=0)
    with pytest.raises(ValueError, match="space"):
        DeviceHint("io", 0x10)
    Correlator(CorrelatorConfig(reorder_window_ns=0))


def test_config_interrupt_before_driver_ok_on_the_programmed_vector_is_a_violation():
    """The vector is the one the guest programmed (MSI-X entry msix_config): exact from the
    first interrupt on, so the notification rules apply at once (virtio 1.x 2.1.2: no config
    notification before DRIVER_OK)."""
    s = Script()
    dev = s.vm(3, "x").device(Transport.PCI_MODERN, vector=0x50)
    dev.init()
    dev.needs_reset()
    dev.recover()
    dev.write(0)                  # reset, then a config interrupt before DRIVER_OK
    dev.config_interrupt()
    dev.init()
    dev.needs_reset()
    dev.recover()
    dev.write(0)
    dev.config_interrupt()
    c, out = run(s.events)
    assert violations(out) == [(dev.id, Rule.NOTIFY_BEFORE_DRIVER_OK)] * 2
    assert [e.evidence for e in ended(out)] == [Evidence.CONFIG_INTERRUPT] * 2


def test_pickup_of_a_modern_device_needs_features_ok():
    s = Script()
    dev = s.vm(3).device(Transport.PCI_MODERN)
    dev.access(E.Op.READ, 0x47)     # ACK|DRIVER|DRIVER_OK|NEEDS_RESET but no FEATURES_OK
    c, out = run(s.events)
    assert c.snapshot(s.t).devices == []
    leg = s.vm(4).device(Transport.PCI_LEGACY, 0xC000)
    leg.access(E.Op.READ, 0x47)     # legacy drivers have no FEATURES_OK
    c, out = run(s.events)
    [view] = c.snapshot(s.t).devices
    assert view.device == "pio-0xc000" and view.needs_reset_total == 1


def test_timer_queues_stay_bounded_with_many_short_episodes():
    s = Script()
    dev = s.vm(3, "x").device(Transport.PCI_MODERN, vector=0x50)
    dev.init()
    for _ in range(300):
        dev.needs_reset(notify=False)
        dev.recover()
    c, out = run(s.events, CorrelatorConfig(max_devices=4, hints=(dev.hint(),)))
    assert len(ended(out)) == 300
    assert len(c._stuck_due) <= 2 * 4 + 64 + 1 and len(c._notify_due) <= 2 * 4 + 64 + 1


def test_folded_isr_reads_still_count_config_interrupts():
    s = Script()
    dev = s.vm(9, "old").device(Transport.PCI_LEGACY, 0xC040, gsi=11)
    dev.init()
    dev.config_interrupt()
    ts = s.step()
    s.emit(E.RegisterAccess(ts, 9, 10, E.Space.PIO, E.Op.READ, dev.isr_addr, 1, 0x1, repeats=2))
    c, _ = run(s.events)
    assert c.snapshot(s.t).devices[0].config_interrupts_total == 3


def test_named_hint_watches_from_the_start_even_after_a_rename():
    s = Script()
    s.emit(E.QueueNotify(s.step(), 8, 9, 0xFE003000))       # first sight: no identity yet
    s.emit(E.VmStarted(s.step(), 8, 12, "hinted"))
    hint = DeviceHint(E.Space.MMIO, 0xFEBF0014, transport=Transport.PCI_MODERN, type="net",
                      vm="hinted", config_vector=0x33)
    c, out = run(s.events, CorrelatorConfig(hints=(hint,)))
    assert WatchRegister(8, E.Space.MMIO, 0xFEBF0014, E.Register.STATUS) in out
    assert WatchInterrupt(8, vector=0x33) in out
    [view] = c.snapshot(s.t).devices
    assert (view.type, view.vm.name) == ("net", "hinted")


def test_annotate_device_sets_the_type_for_later_episodes():
    s = Script()
    dev = s.vm(3, "x").device(Transport.PCI_MODERN, 0xFEBF1000)
    dev.init()
    c, _ = run(s.events)
    assert c.annotate_device(3, E.Space.MMIO, 0xFEBF1014, "net")
    assert not c.annotate_device(3, E.Space.MMIO, 0xDEAD0000, "blk")
    assert not c.annotate_device(4, E.Space.MMIO, 0xFEBF1014, "blk")
    first = len(s.events)
    dev.needs_reset(notify=False)
    dev.recover()
    out = []
    for ev in s.events[first:]:
        out += c.feed(ev)
    out += c.flush()
    [ep] = ended(out)
    assert ep.type == "net" and c.snapshot(s.t).devices[0].type == "net"


def test_annotate_device_with_the_pci_address_names_a_device_found_from_traffic():
    """An agent started after the guest booted (no enumeration seen) asks QEMU's query-pci
    (run --vmm-pci-types on): the device takes its PCI name and type, and keeps its state."""
    s = Script()
    dev = s.vm(3, "x").device(Transport.PCI_MODERN, 0xFEBF1000)
    dev.init()
    c, _ = run(s.events)
    assert c.annotate_device(3, E.Space.MMIO, 0xFEBF1014, "blk", "0000:00:05.0")
    [view] = c.snapshot(s.t).devices
    assert (view.device, view.type, view.resets_total) == ("pci-0000:00:05.0", "blk", 1)
    assert c.stats()["devices_renamed"] == 1


def test_a_status_like_byte_off_the_common_cfg_position_is_not_picked_up():
    s = Script()
    dev = s.vm(3).device(Transport.PCI_MODERN, 0xFEBF3000)
    dev.access(E.Op.READ, 0x4F, addr=0xFEBF5004)     # e.g. a MAC byte in device config
    c, out = run(s.events)
    assert c.snapshot(s.t).devices == [] and out == []
    dev.access(E.Op.READ, 0x4F)                      # the real status at common cfg + 0x14
    c, out = run(s.events)
    [view] = c.snapshot(s.t).devices
    assert view.device == "mmio-0xfebf3000" and view.needs_reset_total == 1


def test_an_msi_never_delivered_is_not_taken_for_the_config_interrupt():
    """Split-irqchip QEMU injects an MSI when a microvm guest programs its IOAPIC; it is never
    delivered (no ApicAccepted). A virtio-mmio device's first 0x40 read soon after must not
    make it the device's config vector or the episode's start."""
    s = Script()
    vm = s.vm(9, "vm")
    dev = vm.device(Transport.MMIO, 0xFEB00200)
    dev.init()
    spurious = E.MsiInjected(s.step(), 9, 7, 0xFEE00000, 0x40)
    s.emit(spurious)
    truth = dev.needs_reset()
    dev.recover()
    c, out = run(s.events)
    (ep,) = ended(out)
    assert (ep.evidence, ep.start_ns) == (Evidence.STATUS_READ, truth.guest_saw_ns)
    assert not [o for o in out if isinstance(o, WatchInterrupt)]


def test_config_vector_learnt_from_the_delivery_before_the_first_0x40_read():
    """The first config interrupt of a device arrives as MSI + delivery (capture forwards the
    delivery that follows a discovered MSI); it is the config vector, watched from then on."""
    s = Script()
    dev = s.vm(9, "vm").device(Transport.PCI_MODERN, vector=0x41)
    dev.init()
    truths = [dev.needs_reset()]
    dev.recover()
    truths.append(dev.needs_reset())
    dev.recover()
    c, out = run(s.events)
    eps = ended(out)
    assert [e.evidence for e in eps] == [Evidence.CONFIG_INTERRUPT] * 2
    assert [e.start_ns for e in eps] == [t.start_ns for t in truths]
    assert WatchInterrupt(9, vector=0x41) in out
    (view,) = c.snapshot(s.t).devices
    assert view.config_interrupts_total == 2
    assert not violations(out)


def test_mmio_config_interrupts_counted_by_interrupt_ack_writes_not_folded_reads():
    """virtio-mmio: capture folds identical InterruptStatus reads (forwarding one per interval,
    the rest as `repeats`); InterruptACK writes 200 ms apart are each forwarded: one config
    interrupt per ACK."""
    s = Script()
    dev = s.vm(9, "vm").device(Transport.MMIO, 0xFEB00200, gsi=5)
    hint = dev.hint()       # the operator tells the line: its rises time the interrupts
    dev.init()
    truths = []
    for _ in range(3):
        truths.append(dev.needs_reset())
        dev.recover()
    isr_reads = [e for e in s.events if isinstance(e, E.RegisterAccess)
                 and e.addr == dev.isr_addr and e.op == E.Op.READ]
    assert len(isr_reads) == 3
    folded = set(map(id, isr_reads[1:]))
    events = [e for e in s.events if id(e) not in folded]
    c, out = run(events, CorrelatorConfig(hints=(hint,)))
    eps = ended(out)
    assert [e.evidence for e in eps] == [Evidence.CONFIG_INTERRUPT] * 3
    assert [e.start_ns for e in eps] == [t.start_ns for t in truths]
    (view,) = c.snapshot(s.t).devices
    assert view.config_interrupts_total == 3
    assert not violations(out)


def test_mmio_config_acks_folded_by_capture_are_counted_from_repeats():
    """capture folds identical InterruptACK writes too (one forwarded per interval): the
    `repeats` of a config-change ACK are config interrupts, those of a queue ACK are not."""
    import dataclasses

    s = Script()
    dev = s.vm(9, "vm").device(Transport.MMIO, 0xFEB00200, gsi=5)
    dev.init()
    ack = dev.base + 0x64
    dev.access(E.Op.WRITE, 0x3, addr=ack)            # a config interrupt's ACK
    dev.access(E.Op.WRITE, 0x1, addr=ack)            # then queue ACKs, after 2 more config ones
    dev.access(E.Op.WRITE, 0x1, addr=ack)
    events = list(s.events)
    events[-2] = dataclasses.replace(events[-2], repeats=2)
    events[-1] = dataclasses.replace(events[-1], repeats=40)   # 40 folded queue ACKs
    c, out = run(events, CorrelatorConfig(hints=(dev.hint(),)))
    (view,) = c.snapshot(s.t).devices
    assert view.config_interrupts_total == 3
    assert not violations(out)


def test_split_irqchip_mmio_interrupt_is_counted_by_the_ack_and_never_timed_by_a_delivery():
    """microvm (split irqchip): a virtio-mmio line reaches the CPU as an MSI on the IOAPIC pin's
    vector, which no register of the device tells. That delivery is not attributed (it could be
    any device's); the driver's ACK with the config bit counts the interrupt once; the episode
    starts at the guest's status read, with no notify phase."""
    s = Script()
    dev = s.vm(9, "vm").device(Transport.MMIO, 0xFEB00200, vector=0x40)
    dev.init()
    truths = []
    for _ in range(2):
        truths.append(dev.needs_reset())
        dev.access(E.Op.READ, 0x3, addr=dev.isr_addr)
        dev.access(E.Op.WRITE, 0x3, addr=dev.base + 0x64)
        dev.recover()
    c, out = run(s.events)
    eps = ended(out)
    assert [(e.evidence, e.start_ns) for e in eps] == [
        (Evidence.STATUS_READ, t.guest_saw_ns) for t in truths]
    assert all("notify" not in e.phase_seconds() for e in eps)
    (view,) = c.snapshot(s.t).devices
    assert view.config_interrupts_total == 2
    assert not violations(out)
