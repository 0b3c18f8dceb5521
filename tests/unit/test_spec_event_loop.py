"""The correlator's event loop and VM bookkeeping against its contract (docs/correlation.md).

Not a virtio rule but correlation's own promises, each test names the one it checks:

- "VMs": a VM is (pid, start_time); a VmStarted renames a made-up identity or one with the same
  start_time, a different start_time is pid reuse (the old VM ends, nothing is shared);
  ProcessExit ends the VM; events of that pid older than its exit arriving afterwards are
  dropped and counted (`events_after_exit`) so they cannot resurrect it; at most `max_vms` VMs,
  a new one evicts the VM with the oldest last event preferring VMs with no open episode,
  counted in `evictions["vm"]`; the identities of the last `4 * max_vms` evicted VMs are
  remembered, until their pid exits or gets a new VmStarted.
- "Ordering, late and lost events": events are held until the newest timestamp seen (or
  `tick(now)`) is the window past them; `flush()` processes everything.
- Stuck: an open episode `stuck_after_ns` old is reported once (`EpisodeStuck`).
- The notification rule: no config interrupt within `notify_window_ns` of the 0x40 read (an
  interrupt exactly at the window's end is within it), judged once the window has passed in
  event time.
- Retention: an exited VM's devices (and violation counts) stay `retain_exited_ns`.
- Device bounds: at most `max_devices`; the least recently active device, preferring ones with
  no open episode, is evicted (its episode ends `abandoned`), counted in `evictions["device"]`.
- `MsiInjected` is never delivery evidence but is progress (a queue completion), except
  split-irqchip's spurious MSIs (address 0 and data 0) and MSIs on a config vector.
- A device made from its PCI enumeration counts among `max_devices` like any other, last
  active at its enumeration; an object that is no `agent.events` Event is refused (TypeError).
- Counters: `Snapshot.violations`, `episodes_ended`, `suspicions`, `stats()` (`events_<kind>`,
  `events_after_exit`, `buffered_events`, `devices_discovered`, `retired_vms`, ...);
  `Correlator.changes` is bumped whenever what checkpoint saves may have changed.
"""
from __future__ import annotations

import pytest

from agent import events as E
from agent.correlate import Correlator, CorrelatorConfig, DeviceHint
from agent.correlate.checkpoint import dump
from agent.model import (
    EpisodeEnded, EpisodeStuck, Evidence, NeedsResetSuspected, Outcome, Rule, Transport,
    Violation, VmIdentity, WatchRegister,
)
from pciguest import Function, Guest as PciGuest
from test_correlate_suspect import CONFIG_VEC, QUEUE_VEC, Guest

MS = 1_000_000
S = 1_000_000_000
PID = 40
BASE = 0xFE000000             # modern common cfg (4 KiB aligned); status at +0x14
T0 = 10 * S


def cfg(**kw) -> CorrelatorConfig:
    kw.setdefault("reorder_window_ns", 0)
    return CorrelatorConfig(**kw)


def status(ts: int, op: str, value: int, pid: int = PID, base: int = BASE) -> E.RegisterAccess:
    return E.RegisterAccess(ts, pid, pid + 1, E.Space.MMIO, op, base + 0x14, 1, value)


def init(ts: int, pid: int = PID, base: int = BASE) -> list[E.Event]:
    """A driver's reset and initialisation (3.1.1): the device is found at the 0, 1, 3 writes."""
    return [status(ts + i, E.Op.WRITE, v, pid, base) for i, v in enumerate((0, 1, 3, 11, 15))]


def fault(ts: int, pid: int = PID, base: int = BASE) -> E.RegisterAccess:
    """The guest reads DEVICE_NEEDS_RESET on a running device."""
    return status(ts, E.Op.READ, 0x4F, pid, base)


def recover(ts: int, pid: int = PID, base: int = BASE) -> list[E.Event]:
    return init(ts, pid, base)


def started(ts: int, pid: int = PID, start_time: int = 100, name: str | None = None):
    return E.VmStarted(ts, pid, start_time, name or f"vm{pid}")


def dev_id(base: int = BASE) -> str:
    return f"mmio-0x{base:x}"


def feed(c: Correlator, events) -> list:
    out = []
    for ev in events:
        out += c.feed(ev)
    return out


def of(out, cls):
    return [o for o in out if isinstance(o, cls)]


def episodes(out):
    return [o.episode for o in out if isinstance(o, EpisodeEnded)]


def names(c: Correlator) -> list[str]:
    return sorted(i.name for i in c.identities())


# -- a fresh correlator --------------------------------------------------------------------

def test_a_fresh_correlator_tracks_nothing_and_exports_both_eviction_counters():
    c = Correlator()
    assert c.config == CorrelatorConfig()
    snap = c.snapshot(0)
    assert snap.devices == [] and snap.vms == 0 and snap.violations == {}
    assert snap.episodes_ended == {} and snap.suspicions == 0
    # documented as Snapshot.evictions["vm"] / ["device"]: present (0) before any eviction
    assert snap.evictions == {"vm": 0, "device": 0}
    assert c.identities() == []
    assert c.stats()["buffered_events"] == 0 and c.stats()["late_events"] == 0
    assert c.tick(T0) == [] and c.flush() == []


def test_every_fed_event_is_counted_by_kind_even_when_dropped():
    c = Correlator(cfg())
    evs = [started(T0), *init(T0 + 1), E.QueueNotify(T0 + 10, PID, 1, BASE + 0x3000),
           E.MsiInjected(T0 + 11, PID, 1, 0xFEE00000, 0x41), E.IrqLine(T0 + 12, PID, 1, 5, 1),
           E.ApicAccepted(T0 + 13, PID, 1, 0, 0x41),
           E.VhostStatus(T0 + 14, PID, 1, E.Op.READ, 3, 0), E.ProcessExit(T0 + 20, PID),
           status(T0 + 15, E.Op.READ, 0x0F)]          # late, older than the exit: dropped
    feed(c, evs)
    s = c.stats()
    assert (s["events_vm"], s["events_access"], s["events_fast_mmio"], s["events_msi"],
            s["events_irq"], s["events_apic"], s["events_vhost_status"], s["events_exit"]) == \
        (1, 6, 1, 1, 1, 1, 1, 1)
    assert s["events_after_exit"] == 1


# -- the reorder window: feed, tick, flush ---------------------------------------------------

def test_tick_releases_what_the_window_has_passed_and_nothing_younger():
    c = Correlator(cfg(reorder_window_ns=50 * MS))
    assert c.feed(started(T0)) == []
    assert c.identities() == [] and c.stats()["buffered_events"] == 1
    c.tick(T0 + 50 * MS - 1)
    assert c.identities() == [] and c.stats()["buffered_events"] == 1
    c.tick(T0 + 50 * MS)
    assert names(c) == [f"vm{PID}"] and c.stats()["buffered_events"] == 0


def test_feed_releases_what_the_newest_event_puts_out_of_the_window():
    c = Correlator(cfg(reorder_window_ns=50 * MS))
    c.feed(started(T0))
    c.feed(E.IrqLine(T0 + 50 * MS - 1, 999, 1, 5, 1))
    assert c.identities() == []
    c.feed(E.IrqLine(T0 + 50 * MS, 999, 1, 5, 1))
    assert names(c) == [f"vm{PID}"] and c.stats()["buffered_events"] == 2
    c.flush()
    assert names(c) == ["pid-999", f"vm{PID}"] and c.stats()["buffered_events"] == 0


def test_identities_are_the_tracked_vms_not_the_exited_ones_kept_for_scrapes():
    c = Correlator(cfg())
    feed(c, [started(T0, 1, 11, "a"), started(T0 + 1, 2, 22, "b"), *init(T0 + 2, pid=2),
             E.ProcessExit(T0 + 10, 2)])
    assert c.identities() == [VmIdentity(pid=1, start_time=11, name="a")]
    assert [v.exited for v in c.snapshot(T0 + 11).devices] == [True]


# -- stuck episodes ------------------------------------------------------------------------

def test_an_episode_is_stuck_exactly_when_it_is_stuck_after_old_and_only_once():
    c = Correlator(cfg(stuck_after_ns=10 * MS, reorder_window_ns=5 * MS))
    feed(c, [started(T0), *init(T0 + 1), fault(T0 + 100)])
    # the tick's own time judges the age, not the reorder horizon (now - window)
    assert of(c.tick(T0 + 100 + 10 * MS - 1), EpisodeStuck) == []
    [stuck] = of(c.tick(T0 + 100 + 10 * MS), EpisodeStuck)
    assert stuck.episode.stuck and stuck.episode.start_ns == T0 + 100
    assert stuck.episode.device == dev_id() and stuck.episode.outcome == Outcome.OPEN
    assert of(c.tick(T0 + 100 + 30 * MS), EpisodeStuck) == []


def test_event_time_alone_makes_an_episode_stuck():
    c = Correlator(cfg(stuck_after_ns=10 * MS))
    out = feed(c, [started(T0), *init(T0 + 1), fault(T0 + 100),
                   E.IrqLine(T0 + 100 + 10 * MS - 1, PID, 1, 5, 1)])
    assert of(out, EpisodeStuck) == []
    [stuck] = of(c.feed(E.IrqLine(T0 + 100 + 10 * MS, PID, 1, 5, 1)), EpisodeStuck)
    assert stuck.episode.start_ns == T0 + 100


def test_flush_judges_stuck_episodes_by_the_last_event_time():
    c = Correlator(cfg(stuck_after_ns=10 * MS, reorder_window_ns=S))
    out = feed(c, [started(T0), *init(T0 + 1), fault(T0 + 100),
                   E.IrqLine(T0 + 100 + 10 * MS, PID, 1, 5, 1)])
    assert out == []
    [stuck] = of(c.flush(), EpisodeStuck)
    assert stuck.episode.start_ns == T0 + 100


def test_an_exit_when_the_episode_turns_stuck_reports_it_stuck_then_abandoned():
    c = Correlator(cfg(stuck_after_ns=10 * MS))
    feed(c, [started(T0), *init(T0 + 1), fault(T0 + 100)])
    out = c.feed(E.ProcessExit(T0 + 100 + 10 * MS, PID))
    assert [type(o) for o in out if isinstance(o, (EpisodeStuck, EpisodeEnded))] == \
        [EpisodeStuck, EpisodeEnded]
    [ep] = episodes(out)
    assert ep.outcome == Outcome.ABANDONED and ep.stuck and ep.end_ns == T0 + 100 + 10 * MS


def test_an_episode_that_ended_or_whose_device_was_evicted_is_never_stuck():
    c = Correlator(cfg(stuck_after_ns=10 * MS, max_devices=1))
    feed(c, [started(T0), *init(T0 + 1), fault(T0 + 100), *recover(T0 + 200)])
    assert of(c.tick(T0 + S), EpisodeStuck) == []
    c2 = Correlator(cfg(stuck_after_ns=10 * MS, max_devices=1))
    out = feed(c2, [started(T0), *init(T0 + 1), fault(T0 + 100),
                    *init(T0 + 200, base=BASE + 0x4000)])
    [ep] = episodes(out)
    assert ep.outcome == Outcome.ABANDONED and ep.device == dev_id()
    assert of(c2.tick(T0 + S), EpisodeStuck) == []


# -- the notification rule's window --------------------------------------------------------

def hinted(**kw) -> CorrelatorConfig:
    return cfg(hints=(DeviceHint(E.Space.MMIO, BASE + 0x14, config_vector=0x41),), **kw)


def test_a_config_interrupt_exactly_at_the_end_of_the_window_is_in_time():
    c = Correlator(hinted(notify_window_ns=10 * MS))
    out = feed(c, [started(T0), *init(T0 + 1), fault(T0 + 100),
                   E.ApicAccepted(T0 + 100 + 10 * MS, PID, 1, 0, 0x41),
                   E.IrqLine(T0 + S, PID, 1, 5, 1)])
    assert of(out, Violation) == []
    assert c.snapshot(T0 + S).devices[0].config_interrupts_total == 1


def test_no_config_interrupt_in_the_window_is_a_violation_once_the_window_passed():
    c = Correlator(hinted(notify_window_ns=10 * MS))
    out = feed(c, [started(T0), *init(T0 + 1), fault(T0 + 100),
                   E.IrqLine(T0 + 100 + 10 * MS, PID, 1, 5, 1)])
    assert of(out, Violation) == []               # an interrupt at the window's end may come
    [v] = of(c.feed(E.IrqLine(T0 + 100 + 10 * MS + 1, PID, 1, 5, 1)), Violation)
    assert (v.rule, v.ts_ns, v.device, v.vm.name) == \
        (Rule.NEEDS_RESET_WITHOUT_NOTIFY, T0 + 100, dev_id(), f"vm{PID}")
    # the detail says why: the window passed (not the guest's reset)
    assert v.detail == "no config interrupt within the notify window"
    assert c.snapshot(T0 + S).violations == {(v.vm, Rule.NEEDS_RESET_WITHOUT_NOTIFY): 1}
    assert of(c.tick(T0 + 2 * S), Violation) == []      # once
    # nor again when the guest then resets the device
    assert of(feed(c, recover(T0 + 3 * S)), Violation) == []
    assert c.snapshot(T0 + 4 * S).violations == {(v.vm, Rule.NEEDS_RESET_WITHOUT_NOTIFY): 1}


def test_tick_judges_the_window_at_the_reorder_horizon():
    c = Correlator(hinted(notify_window_ns=10 * MS, reorder_window_ns=5 * MS))
    feed(c, [started(T0), *init(T0 + 1), fault(T0 + 100)])
    # events up to now - reorder window are in: an interrupt may still arrive before that
    assert of(c.tick(T0 + 100 + 15 * MS), Violation) == []
    [v] = of(c.tick(T0 + 100 + 15 * MS + 1), Violation)
    assert v.rule == Rule.NEEDS_RESET_WITHOUT_NOTIFY


def test_the_window_of_a_vm_that_exited_is_not_judged():
    c = Correlator(hinted(notify_window_ns=10 * MS))
    out = feed(c, [started(T0), *init(T0 + 1), fault(T0 + 100), E.ProcessExit(T0 + 200, PID)])
    out += c.tick(T0 + S)
    assert of(out, Violation) == []


# -- outputs are counted --------------------------------------------------------------------

def test_outcomes_violations_and_suspicions_are_counted_in_snapshots():
    c = Correlator(cfg())
    a, b = BASE, BASE + 0x4000
    out = feed(c, [started(T0), *init(T0 + 1, base=a), *init(T0 + 10, base=b),
                   fault(T0 + 100, base=a), *recover(T0 + 200, base=a),
                   fault(T0 + 250, base=a), *recover(T0 + 260, base=a),
                   fault(T0 + 300, base=b),
                   status(T0 + 400, E.Op.WRITE, 0x0B, base=a),   # DRIVER_OK cleared: violation
                   status(T0 + 401, E.Op.WRITE, 0x03, base=a),   # and again
                   E.ProcessExit(T0 + 500, PID)])
    assert [e.outcome for e in episodes(out)] == [Outcome.RECOVERED, Outcome.RECOVERED,
                                                  Outcome.ABANDONED]
    snap = c.snapshot(T0 + 600)
    assert snap.episodes_ended == {Outcome.RECOVERED: 2, Outcome.ABANDONED: 1}
    vm = VmIdentity(pid=PID, start_time=100, name=f"vm{PID}")
    assert snap.violations == {(vm, Rule.BIT_CLEARED_WITHOUT_RESET): 2}


def test_suspicions_are_counted_as_they_are_emitted():
    guests = [Guest(t0=T0, pid=7), Guest(t0=T0 + 1, pid=8)]
    for g in guests:
        g.init()
        g.msi(CONFIG_VEC, dt=500 * MS)
        g.kicks(20)
    c = Correlator(cfg())
    out = feed(c, sorted(guests[0].events + guests[1].events, key=lambda e: e.ts_ns))
    assert sorted(o.vm.pid for o in of(out, NeedsResetSuspected)) == [7, 8]
    assert c.snapshot(guests[0].t).suspicions == 2


def test_changes_grow_with_every_new_vm_and_every_output():
    c = Correlator(cfg())
    seen = [c.changes]
    for i in range(3):
        c.feed(E.IrqLine(T0 + i, 100 + i, 1, 5, 1))       # a new VM, no output
        seen.append(c.changes)
    assert seen == sorted(set(seen))
    before = c.changes
    assert of(c.feed(E.VmStarted(T0 + 10, 100, 7, "named")), object) == []
    assert c.changes > before
    before = c.changes
    out = feed(c, init(T0 + 20, pid=100))
    assert of(out, WatchRegister) and c.changes > before


# -- ProcessExit -----------------------------------------------------------------------------

def test_events_older_than_the_exit_arriving_after_it_cannot_resurrect_the_vm():
    c = Correlator(cfg())
    feed(c, [started(T0), *init(T0 + 1)])
    exit_ns = T0 + 100
    out = c.feed(E.ProcessExit(exit_ns, PID))
    assert any(isinstance(o, WatchRegister) and not o.add for o in out)
    assert c.feed(fault(exit_ns - 50)) == []
    assert c.feed(fault(exit_ns)) == []        # same time: ordered before the exit
    assert c.feed(status(exit_ns - 1, E.Op.WRITE, 3, base=BASE + 0x4000)) == []
    assert c.stats()["events_after_exit"] == 3 and c.stats()["late_events"] == 0
    assert c.identities() == [] and c.snapshot(exit_ns + 1).vms == 0
    views = c.snapshot(exit_ns + 1).devices
    assert [(v.device, v.exited, v.needs_reset_total) for v in views] == [(dev_id(), True, 0)]


def test_after_the_exit_a_newer_event_of_the_pid_is_a_new_process():
    c = Correlator(cfg())
    feed(c, [started(T0), *init(T0 + 1), E.ProcessExit(T0 + 100, PID)])
    c.feed(E.IrqLine(T0 + 101, PID, 1, 5, 1))
    assert c.identities() == [VmIdentity(pid=PID, start_time=0, name=f"pid-{PID}",
                                         vmm="unknown")]
    assert c.stats().get("events_after_exit", 0) == 0


def test_a_vm_started_after_the_exit_begins_a_fresh_vm():
    c = Correlator(cfg())
    feed(c, [started(T0, start_time=100, name="old"), *init(T0 + 1),
             E.ProcessExit(T0 + 100, PID), started(T0 + 200, start_time=300, name="new")])
    assert c.identities() == [VmIdentity(pid=PID, start_time=300, name="new")]
    out = feed(c, [*init(T0 + 300), fault(T0 + 400), *recover(T0 + 500)])
    [ep] = episodes(out)
    assert (ep.vm.name, ep.outcome) == ("new", Outcome.RECOVERED)
    live = [v for v in c.snapshot(T0 + 600).devices if not v.exited]
    assert [(v.vm.name, v.resets_total) for v in live] == [("new", 2)]


def test_a_guests_pci_programming_is_watched_on_arrival_not_after_the_window():
    g = Guest(t0=T0)
    g.program()
    c = Correlator(cfg(reorder_window_ns=60 * S))
    out = feed(c, g.events)
    assert c.identities() == []                       # nothing released yet
    assert WatchRegister(g.pid, E.Space.MMIO, g.base + 0x14, E.Register.STATUS) in out


def test_a_device_made_from_its_enumeration_was_last_active_then():
    g = Guest(t0=T0)
    g.program()                                # pci-0000:00:03.0, not driven yet
    c = Correlator(cfg(max_devices=2))
    feed(c, g.events)
    [view] = c.snapshot(g.t).devices
    assert view.device == "pci-0000:00:03.0"
    a, b = 0xD0000000, 0xD0004000
    feed(c, [*init(g.at(), g.pid, a), *init(g.at(), g.pid, b)])
    assert sorted(v.device for v in c.snapshot(g.t).devices) == [dev_id(a), dev_id(b)]


def enumerated(pid: int, t0: int, bar4: int) -> list[E.Event]:
    """A firmware enumerating a virtio function and a driver walking its capabilities: the
    device is known (registers placed), its registers not touched yet."""
    events: list[E.Event] = []
    clock = iter(range(t0, t0 + 10**6))
    guest = PciGuest(pid, pid + 1, lambda: next(clock), events.append)
    fn = Function(3 << 3, bar4=bar4, msix_vectors=0)
    guest.enumerate(fn)
    guest.walk_caps(fn)
    return events


def test_an_enumerated_device_is_one_of_max_devices_and_was_last_active_then():
    a, b, p = 0xD0000000, 0xD0004000, 0xFE000000
    c = Correlator(cfg(max_devices=1))
    feed(c, [started(T0), *init(T0 + 1, base=a)])
    out = feed(c, enumerated(PID, T0 + 100, p))
    assert WatchRegister(PID, E.Space.MMIO, a + 0x14, E.Register.STATUS, add=False) in out
    assert [v.device for v in c.snapshot(T0 + S).devices] == ["pci-0000:00:03.0"]
    assert c.snapshot(T0 + S).evictions["device"] == 1
    c = Correlator(cfg(max_devices=2))
    feed(c, [started(T0), *init(T0 + 1, base=a), *enumerated(PID, T0 + 100, p)])
    feed(c, init(T0 + 10**6, base=b))                # a, found first, is the older
    assert sorted(v.device for v in c.snapshot(T0 + S).devices) == [dev_id(b), "pci-0000:00:03.0"]
    feed(c, init(T0 + 2 * 10**6, base=a))            # the enumerated one is now the older
    assert sorted(v.device for v in c.snapshot(T0 + S).devices) == [dev_id(a), dev_id(b)]


def test_something_that_is_no_event_is_refused():
    class Bogus:
        kind = "bogus"
        ts_ns, pid = T0, PID

    c = Correlator(cfg())
    with pytest.raises(TypeError, match="not an event"):
        c.feed(Bogus())


def test_the_exit_drops_the_vms_device_model():
    g = Guest(t0=T0)
    g.program()
    c = Correlator(cfg())
    feed(c, g.events)
    assert c.pci_model(g.pid) is not None
    c.feed(E.ProcessExit(g.at(), g.pid))
    assert c.pci_model(g.pid) is None
    # a new process with that pid: its devices are found anew, none left from the old model
    out = feed(c, [started(g.at(), g.pid, 999, "next"),
                   E.QueueNotify(g.at(), g.pid, 1, g.base + 0x3000)])
    assert c.stats()["kicks_unattributed"] == 1 and c.snapshot(g.t).vms == 1
    assert [v.exited for v in c.snapshot(g.t).devices] == [True]
    assert of(out, WatchRegister) == []


def test_exits_are_remembered_for_4_max_vms_pids():
    c = Correlator(cfg(max_vms=2, retain_exited_ns=0))
    for i in range(9):
        pid = 100 + i
        feed(c, [E.IrqLine(T0 + 10 * i, pid, 1, 5, 1), E.ProcessExit(T0 + 10 * i + 1, pid)])
    # the last 8 exits still stop events older than them; the first one is forgotten
    for i in range(1, 9):
        assert c.feed(E.IrqLine(T0 + 10 * i, 100 + i, 1, 5, 1)) == []
    assert c.identities() == [] and c.stats()["events_after_exit"] == 8
    c.feed(E.IrqLine(T0, 100, 1, 5, 1))
    assert names(c) == ["pid-100"]


def test_a_late_event_of_the_old_process_stays_dropped_after_the_new_ones_vm_started():
    c = Correlator(cfg())
    feed(c, [started(T0, start_time=100, name="old"), *init(T0 + 1),
             E.ProcessExit(T0 + 100, PID), started(T0 + 200, start_time=300, name="new")])
    c.feed(fault(T0 + 50))             # the old process's read, older than its exit
    assert c.stats().get("events_after_exit", 0) == 1
    assert [v.vm.name for v in c.snapshot(T0 + 300).devices if not v.exited] == []


# -- VmStarted: rename or pid reuse ---------------------------------------------------------

def test_a_vm_started_with_the_same_start_time_renames_the_vm_and_keeps_its_episode():
    c = Correlator(cfg())
    feed(c, [started(T0, start_time=100, name="first"), *init(T0 + 1), fault(T0 + 100)])
    out = c.feed(started(T0 + 150, start_time=100, name="second"))
    assert episodes(out) == []
    assert c.identities() == [VmIdentity(pid=PID, start_time=100, name="second")]
    [ep] = episodes(feed(c, recover(T0 + 200)))
    assert (ep.vm.name, ep.outcome, ep.start_ns) == ("second", Outcome.RECOVERED, T0 + 100)


def test_a_vm_started_for_a_made_up_identity_renames_it_and_keeps_its_episode():
    c = Correlator(cfg())
    feed(c, [*init(T0 + 1), fault(T0 + 100)])
    assert names(c) == [f"pid-{PID}"]
    ev = E.VmStarted(T0 + 150, PID, 555, "late", namespace="ns", uuid="u-1", vmm="firecracker")
    assert episodes(c.feed(ev)) == []
    assert c.identities() == [VmIdentity(pid=PID, start_time=555, name="late", namespace="ns",
                                         uuid="u-1", vmm="firecracker")]
    [ep] = episodes(feed(c, recover(T0 + 200)))
    assert (ep.vm.name, ep.vm.start_time, ep.outcome, ep.start_ns) == \
        ("late", 555, Outcome.RECOVERED, T0 + 100)
    assert [v["fallback"] for v in dump(c)["vms"]] == [False]


def test_a_vm_started_with_another_start_time_is_pid_reuse():
    c = Correlator(cfg())
    feed(c, [started(T0, start_time=100, name="old"), *init(T0 + 1), fault(T0 + 100)])
    out = c.feed(started(T0 + 150, start_time=200, name="new"))
    [ep] = episodes(out)
    assert (ep.vm.name, ep.outcome, ep.end_ns) == ("old", Outcome.ABANDONED, T0 + 150)
    assert c.identities() == [VmIdentity(pid=PID, start_time=200, name="new")]
    views = c.snapshot(T0 + 160).devices
    assert [(v.vm.name, v.exited) for v in views] == [("old", True)]
    assert [v["fallback"] for v in dump(c)["vms"]] == [False]
    # the new process is no made-up identity either: yet another start time is reuse again
    feed(c, [*init(T0 + 200), fault(T0 + 300)])
    [ep] = episodes(c.feed(started(T0 + 400, start_time=300, name="newer")))
    assert (ep.vm.name, ep.outcome) == ("new", Outcome.ABANDONED)


def test_the_new_process_of_a_reused_pid_starts_with_its_vm_started():
    named = DeviceHint(E.Space.MMIO, BASE + 0x14, transport=Transport.PCI_MODERN, vm="new")
    c = Correlator(cfg(max_vms=2, hints=(named,)))
    feed(c, [started(T0, 1, 11, "a"), started(T0 + 1, 2, 22, "old")])
    out = c.feed(started(T0 + 2, 2, 33, "new"))          # pid 2 reused
    # its named hints apply at once
    assert WatchRegister(2, E.Space.MMIO, BASE + 0x14, E.Register.STATUS) in out
    # and its last event is that VmStarted: a third VM evicts "a", older
    c.feed(started(T0 + 3, 3, 44, "c"))
    assert names(c) == ["c", "new"]


def test_the_rename_counts_as_the_vms_last_event_for_eviction():
    c = Correlator(cfg(max_vms=2))
    feed(c, [E.IrqLine(T0, 1, 1, 5, 1), E.IrqLine(T0 + 1, 2, 1, 5, 1),
             started(T0 + 2, 1, 11, "one"), E.IrqLine(T0 + 3, 3, 1, 5, 1)])
    assert names(c) == ["one", "pid-3"]


def test_an_evicted_vm_back_with_its_name_is_no_made_up_identity():
    c = Correlator(cfg(max_vms=1))
    feed(c, [started(T0, 1, 100, "one"), E.IrqLine(T0 + 1, 2, 1, 5, 1),
             *init(T0 + 2, pid=1), fault(T0 + 10, pid=1)])     # vm 1 back, by name
    assert names(c) == ["one"]
    # a VmStarted with another start time: a new process, not a late identity of this one
    out = c.feed(started(T0 + 20, 1, 200, "other"))
    [ep] = episodes(out)
    assert (ep.vm.name, ep.outcome) == ("one", Outcome.ABANDONED)
    assert c.identities() == [VmIdentity(pid=1, start_time=200, name="other")]


# -- VM bounds --------------------------------------------------------------------------------

def test_a_new_vm_evicts_the_one_with_the_oldest_last_event():
    c = Correlator(cfg(max_vms=2))
    out = feed(c, [started(T0, 1, 1, "a"), started(T0 + 1, 2, 2, "b"),
                   E.IrqLine(T0 + 2, 1, 1, 5, 1),            # a's last event is now the newer
                   started(T0 + 3, 3, 3, "c")])
    assert names(c) == ["a", "c"]
    snap = c.snapshot(T0 + 4)
    assert snap.evictions == {"vm": 1, "device": 0} and snap.vms == 2
    assert out == []


def test_a_vm_with_an_open_episode_is_evicted_last():
    c = Correlator(cfg(max_vms=2))
    out = feed(c, [started(T0, 1, 1, "busy"), *init(T0 + 1, pid=1), fault(T0 + 10, pid=1),
                   started(T0 + 20, 2, 2, "idle"), started(T0 + 30, 3, 3, "new")])
    assert names(c) == ["busy", "new"] and episodes(out) == []
    # all busy: the oldest goes, its episode abandoned at the new VM's first event
    out = feed(c, [*init(T0 + 40, pid=3), fault(T0 + 50, pid=3), started(T0 + 60, 4, 4, "x")])
    [ep] = episodes(out)
    assert (ep.vm.name, ep.outcome, ep.end_ns) == ("busy", Outcome.ABANDONED, T0 + 60)
    assert names(c) == ["new", "x"] and c.snapshot(T0 + 61).evictions["vm"] == 2
    # an evicted VM is not retained for scrapes
    assert all(not v.exited for v in c.snapshot(T0 + 61).devices)


def test_the_identities_of_the_last_4_max_vms_evicted_vms_are_remembered():
    c = Correlator(cfg(max_vms=2))
    for i in range(11):      # the oldest is evicted by each new VM past 2: 1..9 evicted
        c.feed(started(T0 + i, 1 + i, 50 + i, f"vm{1 + i}"))
    assert c.snapshot(T0 + 11).evictions["vm"] == 9
    c.feed(E.IrqLine(T0 + 20, 2, 1, 5, 1))      # the 8th last evicted: remembered
    assert VmIdentity(pid=2, start_time=51, name="vm2") in c.identities()
    c.feed(E.IrqLine(T0 + 21, 1, 1, 5, 1))      # the 9th last: forgotten
    assert names(c) == ["pid-1", "vm2"]
    assert [v["fallback"] for v in sorted(dump(c)["vms"], key=lambda v: v["identity"]["pid"])] \
        == [True, False]


def test_an_identity_superseded_by_a_vm_started_no_longer_takes_room_among_the_evicted():
    # docs: remembered "until its pid exits or gets a new VmStarted"; the 4 * max_vms kept are
    # the evicted VMs still gone
    c = Correlator(cfg(max_vms=1))
    for i in range(5):                        # 1..4 evicted
        c.feed(started(T0 + i, 1 + i, 50 + i, f"vm{1 + i}"))
    c.feed(started(T0 + 10, 4, 99, "four-again"))    # evicts vm5: 1, 2, 3, 5 are evicted
    c.feed(E.IrqLine(T0 + 11, 1, 1, 5, 1))
    assert names(c) == ["vm1"]


def test_an_evicted_vm_that_exits_or_restarts_loses_its_old_name():
    c = Correlator(cfg(max_vms=1))
    feed(c, [started(T0, 1, 11, "one"), started(T0 + 1, 2, 22, "two"),
             E.ProcessExit(T0 + 2, 1), E.IrqLine(T0 + 3, 1, 1, 5, 1)])
    assert names(c) == ["pid-1"]
    c2 = Correlator(cfg(max_vms=1))
    feed(c2, [started(T0, 1, 11, "one"), started(T0 + 1, 2, 22, "two"),
              started(T0 + 2, 1, 33, "uno"), E.IrqLine(T0 + 3, 2, 1, 5, 1),
              E.IrqLine(T0 + 4, 1, 1, 5, 1)])
    assert names(c2) == ["uno"]


def test_violation_counts_of_an_evicted_vm_are_dropped():
    c = Correlator(cfg(max_vms=1))
    feed(c, [started(T0, 1, 11, "one"), *init(T0 + 1, pid=1),
             status(T0 + 10, E.Op.WRITE, 0x0B, pid=1)])
    assert list(c.snapshot(T0 + 11).violations.values()) == [1]
    c.feed(started(T0 + 20, 2, 22, "two"))
    assert c.snapshot(T0 + 21).violations == {}


# -- named hints -------------------------------------------------------------------------

def test_a_hint_naming_a_vm_with_a_transport_is_a_device_from_the_vms_start():
    named = DeviceHint(E.Space.MMIO, BASE + 0x14, transport=Transport.PCI_MODERN, vm="web",
                       type="net")
    other = DeviceHint(E.Space.MMIO, BASE + 0x4014, transport=Transport.PCI_MODERN, vm="db")
    untyped = DeviceHint(E.Space.MMIO, BASE + 0x8014, vm="web")        # no transport
    anyvm = DeviceHint(E.Space.MMIO, BASE + 0xC014, transport=Transport.PCI_MODERN)
    c = Correlator(cfg(hints=(named, other, untyped, anyvm)))
    out = c.feed(started(T0, name="web"))
    assert {o.addr for o in of(out, WatchRegister) if o.register == E.Register.STATUS} == \
        {BASE + 0x14}
    [view] = c.snapshot(T0).devices
    assert (view.device, view.type, view.transport, view.vm.name) == \
        (dev_id(), "net", Transport.PCI_MODERN, "web")
    assert c.stats()["devices_discovered"] == 1


def test_a_hinted_device_made_at_the_vms_start_was_last_active_then():
    named = DeviceHint(E.Space.MMIO, BASE + 0x14, transport=Transport.PCI_MODERN, vm="web")
    a, b = BASE + 0x4000, BASE + 0x8000
    for first in ([started(T0, name="web")],
                  [E.IrqLine(T0 - 5, PID, 1, 5, 1), started(T0, name="web")]):   # at the rename
        c = Correlator(cfg(max_devices=2, hints=(named,)))
        out = feed(c, [*first, *init(T0 + 10, base=a), *init(T0 + 20, base=b)])
        assert sorted(v.device for v in c.snapshot(T0 + 30).devices) == [dev_id(a), dev_id(b)]
        assert WatchRegister(PID, E.Space.MMIO, BASE + 0x14, E.Register.STATUS, add=False) in out


def test_a_vm_coming_back_from_eviction_gets_its_named_hints_again():
    named = DeviceHint(E.Space.MMIO, BASE + 0x14, transport=Transport.PCI_MODERN, vm="web")
    c = Correlator(cfg(max_vms=1, max_devices=2, hints=(named,)))
    feed(c, [started(T0, 1, 11, "web"), E.IrqLine(T0 + 1, 2, 1, 5, 1)])
    assert c.snapshot(T0 + 2).devices == []
    out = c.feed(E.IrqLine(T0 + 3, 1, 1, 5, 1))
    assert WatchRegister(1, E.Space.MMIO, BASE + 0x14, E.Register.STATUS) in out
    assert [(v.vm.name, v.device) for v in c.snapshot(T0 + 4).devices] == [("web", dev_id())]
    # made at the return: the least recently active device when two more come
    feed(c, [*init(T0 + 10, pid=1, base=BASE + 0x4000), *init(T0 + 20, pid=1, base=BASE + 0x8000)])
    assert sorted(v.device for v in c.snapshot(T0 + 30).devices) == \
        [dev_id(BASE + 0x4000), dev_id(BASE + 0x8000)]


def test_a_hint_naming_a_made_up_identity_applies_at_the_first_event():
    named = DeviceHint(E.Space.MMIO, BASE + 0x14, transport=Transport.PCI_MODERN,
                       vm=f"pid-{PID}")
    c = Correlator(cfg(max_devices=2, hints=(named,)))
    out = c.feed(E.IrqLine(T0, PID, 1, 5, 1))
    assert WatchRegister(PID, E.Space.MMIO, BASE + 0x14, E.Register.STATUS) in out
    feed(c, [*init(T0 + 10, base=BASE + 0x4000), *init(T0 + 20, base=BASE + 0x8000)])
    assert sorted(v.device for v in c.snapshot(T0 + 30).devices) == \
        [dev_id(BASE + 0x4000), dev_id(BASE + 0x8000)]


# -- device bounds ---------------------------------------------------------------------------

def test_max_devices_is_the_number_of_devices_tracked():
    c = Correlator(cfg(max_devices=2))
    feed(c, [started(T0), *init(T0 + 1), *init(T0 + 10, base=BASE + 0x4000)])
    assert c.snapshot(T0 + 20).evictions["device"] == 0
    out = feed(c, init(T0 + 20, base=BASE + 0x8000))
    snap = c.snapshot(T0 + 30)
    assert snap.evictions == {"vm": 0, "device": 1} and len(snap.devices) == 2
    assert sorted(v.device for v in snap.devices) == [dev_id(BASE + 0x4000), dev_id(BASE + 0x8000)]
    gone = {o.addr for o in out if isinstance(o, WatchRegister) and not o.add}
    assert BASE + 0x14 in gone
    assert c.stats()["devices_discovered"] == 3


def test_an_idle_device_is_evicted_before_one_with_an_open_episode():
    c = Correlator(cfg(max_devices=2))
    a, b, n = BASE, BASE + 0x4000, BASE + 0x8000
    out = feed(c, [started(T0), *init(T0 + 1, base=a), fault(T0 + 10, base=a),
                   *init(T0 + 20, base=b), *init(T0 + 30, base=n)])
    assert episodes(out) == []
    assert sorted(v.device for v in c.snapshot(T0 + 40).devices) == [dev_id(a), dev_id(n)]
    # every one busy: the least recently active goes, its episode abandoned when the new one
    # is found
    feed(c, [fault(T0 + 40, base=n)])
    out = feed(c, init(T0 + 50, base=b))
    [ep] = episodes(out)
    assert (ep.device, ep.outcome, ep.end_ns) == (dev_id(a), Outcome.ABANDONED, T0 + 52)


def test_the_least_recently_active_idle_device_is_evicted():
    c = Correlator(cfg(max_devices=2))
    a, b, n = BASE, BASE + 0x4000, BASE + 0x8000
    feed(c, [started(T0), *init(T0 + 1, base=a), *init(T0 + 10, base=b),
             status(T0 + 20, E.Op.READ, 0x0F, base=a), *init(T0 + 30, base=n)])
    assert sorted(v.device for v in c.snapshot(T0 + 40).devices) == [dev_id(a), dev_id(n)]


def test_every_device_eviction_is_counted():
    c = Correlator(cfg(max_devices=1))
    feed(c, [started(T0)] + [ev for i in range(4) for ev in init(T0 + 10 * i, base=BASE + i * 0x4000)])
    snap = c.snapshot(T0 + 100)
    assert snap.evictions == {"vm": 0, "device": 3} and len(snap.devices) == 1
    assert c.stats()["devices_discovered"] == 4


def test_device_eviction_reaches_across_vms():
    c = Correlator(cfg(max_devices=1))
    out = feed(c, [started(T0, 1, 1, "a"), *init(T0 + 1, pid=1), fault(T0 + 10, pid=1),
                   started(T0 + 20, 2, 2, "b"), *init(T0 + 21, pid=2)])
    [ep] = episodes(out)
    assert (ep.vm.name, ep.outcome, ep.end_ns) == ("a", Outcome.ABANDONED, T0 + 23)
    assert [(v.vm.name, v.device) for v in c.snapshot(T0 + 30).devices] == [("b", dev_id())]


# -- interrupts in the loop: INTx rises, MSIs as progress -----------------------------------

def test_a_config_interrupt_is_timed_by_the_lines_rise_not_its_fall():
    hint = DeviceHint(E.Space.PIO, 0xC040 + 18, gsi=11)
    c = Correlator(cfg(hints=(hint,)))

    def pio(ts, op, addr, value):
        return E.RegisterAccess(ts, PID, PID + 1, E.Space.PIO, op, addr, 1, value)

    evs = [started(T0)] + [pio(T0 + 1 + i, E.Op.WRITE, 0xC040 + 18, v)
                           for i, v in enumerate((0, 1, 3, 7))]
    evs += [E.IrqLine(T0 + 100, PID, 1, 11, 1), E.IrqLine(T0 + 110, PID, 1, 11, 0),
            pio(T0 + 120, E.Op.READ, 0xC040 + 19, 0x2), pio(T0 + 130, E.Op.READ, 0xC040 + 18, 0x47)]
    evs += [pio(T0 + 200 + i, E.Op.WRITE, 0xC040 + 18, v) for i, v in enumerate((0, 1, 3, 7))]
    [ep] = episodes(feed(c, evs))
    assert (ep.evidence, ep.start_ns, ep.guest_saw_ns) == \
        (Evidence.CONFIG_INTERRUPT, T0 + 100, T0 + 130)


def suspected_after(msi: E.MsiInjected | None) -> tuple[int, dict]:
    """Linux after NEEDS_RESET (config MSI, then kicks with no completion); `msi` comes after
    the first kicks. Returns the suspicions and the stats."""
    g = Guest(t0=T0)
    g.init()
    g.msi(CONFIG_VEC, dt=500 * MS)
    g.kicks(2)
    if msi is not None:
        g.events.append(E.MsiInjected(g.at(10_000), g.pid, g.pid, msi.address, msi.data))
    g.kicks(15)
    c = Correlator(cfg())
    out = feed(c, g.events)
    return len(of(out, NeedsResetSuspected)), c.stats()


def msi(address: int, data: int) -> E.MsiInjected:
    return E.MsiInjected(0, PID, PID, address, data)


def test_without_completions_the_kicked_device_is_suspected():
    n, stats = suspected_after(None)
    assert n == 1 and stats.get("suspicions_cleared_by_progress", 0) == 0


def test_a_queue_msi_is_progress_evidence():
    n, stats = suspected_after(msi(0xFEE00000, QUEUE_VEC))
    assert n == 0 and stats["suspicions_cleared_by_progress"] == 1


def test_an_msi_with_address_0_but_a_vector_is_progress():
    # QEMU with the userspace LAPIC passes address 0 (agent.events.MsiInjected)
    n, stats = suspected_after(msi(0, QUEUE_VEC))
    assert n == 0 and stats["suspicions_cleared_by_progress"] == 1


def test_an_msi_with_data_0_to_a_real_address_is_progress():
    n, stats = suspected_after(msi(0xFEE00000, 0))
    assert n == 0 and stats["suspicions_cleared_by_progress"] == 1


def test_split_irqchips_address_0_data_0_msi_is_not_progress():
    n, stats = suspected_after(msi(0, 0))
    assert n == 1 and stats.get("suspicions_cleared_by_progress", 0) == 0


def test_an_msi_on_the_config_vector_is_not_progress_whatever_its_trigger_bits():
    # MSI data: vector in bits 7:0, level / trigger mode in bits 14 / 15 (x86 MSI format)
    for data in (CONFIG_VEC, 0x4000 | CONFIG_VEC, 0xC000 | CONFIG_VEC):
        n, stats = suspected_after(msi(0xFEE00000, data))
        assert n == 1 and stats.get("suspicions_cleared_by_progress", 0) == 0, hex(data)


def test_a_queue_msi_with_trigger_bits_is_progress():
    n, stats = suspected_after(msi(0xFEE00000, 0xC000 | QUEUE_VEC))
    assert n == 0 and stats["suspicions_cleared_by_progress"] == 1


# -- retention of exited VMs ----------------------------------------------------------------

def test_an_exited_vm_is_freed_exactly_at_the_end_of_its_retention():
    c = Correlator(cfg(retain_exited_ns=10 * S, reorder_window_ns=5 * MS))
    feed(c, [started(T0), *init(T0 + 1), status(T0 + 10, E.Op.WRITE, 0x0B),
             E.ProcessExit(T0 + 100, PID)])
    c.tick(T0 + 100 + 5 * MS)
    assert c.stats()["retired_vms"] == 1
    assert list(c.snapshot(T0 + 200).violations.values()) == [1]
    # the tick's own time frees it, not the reorder horizon
    c.tick(T0 + 100 + 10 * S - 1)
    assert c.stats()["retired_vms"] == 1
    c.tick(T0 + 100 + 10 * S)
    assert c.stats()["retired_vms"] == 0 and c.snapshot(T0 + 100 + 10 * S).violations == {}


def test_event_time_frees_exited_vms_too():
    c = Correlator(cfg(retain_exited_ns=10 * S))
    feed(c, [started(T0), *init(T0 + 1), E.ProcessExit(T0 + 100, PID),
             started(T0 + 200, 2, 2, "b")])
    assert c.stats()["retired_vms"] == 1
    c.feed(E.IrqLine(T0 + 100 + 10 * S - 1, 2, 1, 5, 1))
    assert c.stats()["retired_vms"] == 1
    c.feed(E.IrqLine(T0 + 100 + 10 * S, 2, 1, 5, 1))
    assert c.stats()["retired_vms"] == 0


def test_flush_frees_exited_vms_by_the_last_event_time():
    c = Correlator(cfg(retain_exited_ns=10 * S, reorder_window_ns=60 * S))
    feed(c, [started(T0), *init(T0 + 1), E.ProcessExit(T0 + 100, PID),
             E.IrqLine(T0 + 100 + 10 * S, 2, 1, 5, 1)])
    assert c.stats()["retired_vms"] == 0 and c.stats()["buffered_events"] == 8
    c.flush()
    assert c.stats()["retired_vms"] == 0 and names(c) == ["pid-2"]
    c2 = Correlator(cfg(retain_exited_ns=10 * S, reorder_window_ns=60 * S))
    feed(c2, [started(T0), *init(T0 + 1), E.ProcessExit(T0 + 100, PID),
              E.IrqLine(T0 + 100 + 10 * S - 1, 2, 1, 5, 1)])
    c2.flush()
    assert c2.stats()["retired_vms"] == 1


def test_exited_vms_keep_up_to_max_devices_devices():
    c = Correlator(cfg(max_devices=2))
    feed(c, [started(T0, 1, 1, "a"), *init(T0 + 1, pid=1), E.ProcessExit(T0 + 10, 1),
             started(T0 + 20, 2, 2, "b"), *init(T0 + 21, pid=2), E.ProcessExit(T0 + 30, 2)])
    assert sorted(v.vm.name for v in c.snapshot(T0 + 40).devices) == ["a", "b"]
    assert c.stats()["retired_vms"] == 2
    feed(c, [started(T0 + 40, 3, 3, "c"), *init(T0 + 41, pid=3), E.ProcessExit(T0 + 50, 3)])
    assert sorted(v.vm.name for v in c.snapshot(T0 + 60).devices) == ["b", "c"]


def test_retired_vms_are_freed_oldest_first():
    c = Correlator(cfg(retain_exited_ns=10 * S))
    feed(c, [started(T0, 1, 1, "a"), *init(T0 + 1, pid=1), E.ProcessExit(T0 + 10, 1),
             started(T0 + 20, 2, 2, "b"), *init(T0 + 21, pid=2), E.ProcessExit(T0 + 30, 2),
             started(T0 + 40, 3, 3, "c")])
    assert c.stats()["retired_vms"] == 2
    c.feed(E.IrqLine(T0 + 10 + 10 * S, 3, 1, 5, 1))
    assert c.stats()["retired_vms"] == 1
    assert [v.vm.name for v in c.snapshot(T0 + 10 + 10 * S).devices] == ["b"]
    c.feed(E.IrqLine(T0 + 30 + 10 * S, 3, 1, 5, 1))
    assert c.stats()["retired_vms"] == 0


# -- checkpoint: what the loop leaves for a restart ---------------------------------------------

def test_the_checkpoint_carries_tracked_vms_only_with_their_fallback_flag():
    c = Correlator(cfg())
    feed(c, [E.IrqLine(T0, 1, 1, 5, 1), started(T0 + 1, 2, 22, "two"), *init(T0 + 2, pid=2),
             started(T0 + 10, 3, 33, "three"), E.ProcessExit(T0 + 20, 3)])
    state = dump(c)
    got = sorted((v["identity"]["pid"], v["identity"]["name"], v["fallback"],
                  [d["id"] for d in v["devices"]]) for v in state["vms"])
    assert got == [(1, "pid-1", True, []), (2, "two", False, [dev_id()])]
