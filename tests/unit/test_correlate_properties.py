"""Property tests: arbitrary interleavings of VMs and devices, reordering within the window,
lost events, pid reuse. The builder (test_correlate_guestscript) knows the truth."""
from __future__ import annotations

import random
from collections import Counter

from hypothesis import HealthCheck, given, settings, strategies as st

from agent import events as E
from agent.correlate import Correlator, CorrelatorConfig
from agent.model import (
    EpisodeEnded, EpisodeStuck, Outcome, Transport, Violation, WatchEcam, WatchInterrupt,
    WatchRegister,
)
from test_correlate_guestscript import Script, merge

MS = 1_000_000
UNIT = 64                      # scripts step in multiples of this, offset by their index
WINDOW = 2 * MS
TRANSPORTS = (Transport.PCI_MODERN, Transport.PCI_LEGACY, Transport.MMIO)
ACTIONS = ("reset", "episode", "episode_silent", "episode_open", "fail", "reinit_no_reset",
           "wait", "fail_twice")


def build(data, allow_misbehaviour: bool = True):
    """Draw VMs and devices with scripted lives; return (events, truth scripts, hints)."""
    scripts: list[Script] = []
    hints = []
    preamble = Script(t0=10 * UNIT, gap=1, unit=UNIT)
    n_vms = data.draw(st.integers(1, 3), label="vms")
    # ties: the devices' scripts start together, so events of different devices (and VMs) can
    # share a timestamp, as two vCPUs' exits can
    ties = data.draw(st.booleans(), label="ties")
    pids = data.draw(st.lists(st.integers(100, 104), min_size=n_vms, max_size=n_vms), label="pids")
    idx = 1
    seen_pids: Counter = Counter()
    for v, pid in enumerate(pids):
        seen_pids[pid] += 1
        if seen_pids[pid] > 1:
            continue                      # pid reuse is its own test below
        named = data.draw(st.booleans(), label="named")
        name = f"vm{v}" if named else None
        vm_for_preamble = preamble.vm(pid, name, start_time=1000 + v)
        n_devs = data.draw(st.integers(1, 3), label="devices")
        for d in range(n_devs):
            s = Script(t0=1_000 * MS + (0 if ties else idx), gap=10 * US_STEPS, unit=UNIT)
            idx += 1
            transport = data.draw(st.sampled_from(TRANSPORTS), label="transport")
            irq = data.draw(st.sampled_from(("vector", "gsi", "none")), label="irq")
            if irq == "gsi" and transport == Transport.PCI_MODERN:
                irq = "vector"
            vm = s.vm(pid, vm_for_preamble.name, start_time=1000 + v, announce=False)
            vm.next_slot = 3 + d        # one script per device: PCI slots of a VM differ
            # a PCI device's interrupt is known exactly from the guest's programming, or
            # (enumeration unseen) from an operator hint
            enumerated = transport != Transport.MMIO and irq != "none" and data.draw(
                st.booleans(), label="enumerated")
            base = (0xC000 + 0x40 * d) if transport == Transport.PCI_LEGACY else \
                0xFE000000 + d * 0x10000
            dev = vm.device(transport, base, vector=0x40 + 8 * v + d if irq == "vector" else None,
                            gsi=5 + 3 * v + d if irq == "gsi" else None, enumerated=enumerated)
            if irq != "none" and not enumerated:
                hints.append(dev.hint(named=True))
            dev.init()
            actions = data.draw(st.lists(st.sampled_from(ACTIONS if allow_misbehaviour else
                                                         ACTIONS[:2] + ("wait",)),
                                         max_size=6), label="actions")
            for a in actions:
                s.step(data.draw(st.integers(1, 50), label="gap") * 100)
                if a == "reset":
                    dev.init()
                elif a == "episode":
                    dev.needs_reset()
                    dev.recover()
                elif a == "episode_silent":
                    dev.needs_reset(notify=False)
                    dev.recover()
                elif a == "episode_open":
                    dev.needs_reset()
                    break
                elif a == "fail":
                    dev.fail()
                    dev.init()
                elif a == "fail_twice":
                    dev.fail()
                    dev.fail()
                    dev.init()
                elif a == "reinit_no_reset":
                    dev.reinit_without_reset()
                else:
                    s.step(data.draw(st.integers(1, 10), label="wait") * MS // UNIT)
            scripts.append(s)
        if data.draw(st.booleans(), label="exit"):
            end = max(s.t for s in scripts if s.events and s.events[0].pid == pid) + 2 * MS
            ex = Script(t0=end - end % UNIT + idx, unit=UNIT)
            idx += 1
            ex.vm(pid, announce=False).exit()
            for s in scripts:
                for ep in s.episodes:
                    if ep.vm == vm_for_preamble.name and ep.outcome == "open":
                        ep.outcome = "abandoned"
            scripts.append(ex)
    return merge(preamble, *scripts), scripts, tuple(hints)


US_STEPS = 1_000 // UNIT + 1


def config(hints, **kw) -> CorrelatorConfig:
    kw.setdefault("stuck_after_ns", 10**15)
    return CorrelatorConfig(hints=hints, reorder_window_ns=WINDOW, notify_window_ns=1 * MS,
                            max_vms=8, max_devices=32, **kw)


def feed_all(c: Correlator, events) -> list:
    out = []
    for ev in events:
        out.extend(c.feed(ev))
    out.extend(c.flush())
    # let pending notify windows expire (no event can come any more)
    out.extend(c.tick(max(e.ts_ns for e in events) + 2 * MS + WINDOW))
    return out


def key(ep):
    return (ep.vm.name if hasattr(ep.vm, "name") else ep.vm, ep.device, ep.start_ns)


def check_sane(c: Correlator, out: list, now: int, unique_starts: bool = True,
               per_device: bool = True) -> None:
    """What must hold whatever was lost or reordered. (Events later than the window are
    applied at the last processed time, so two episodes may then share a start.)"""
    ended = [o.episode for o in out if isinstance(o, EpisodeEnded)]
    if unique_starts:
        keys = [key(e) for e in ended]
        assert len(keys) == len(set(keys)), "an episode ended twice"
    for ep in ended:
        marks = [m for m in (ep.guest_saw_ns, ep.reset_written_ns, ep.reset_done_ns,
                             ep.driver_ok_ns) if m is not None]
        assert all(ep.start_ns <= m <= ep.end_ns for m in marks)
        assert all(d >= 0 for d in ep.phase_seconds().values())
        assert ep.outcome in (Outcome.RECOVERED, Outcome.ABANDONED)
        assert (ep.driver_ok_ns is not None) == (ep.outcome == Outcome.RECOVERED)
    snap = c.snapshot(now)
    for view in snap.devices if per_device else ():
        ended_here = sum(1 for e in ended if e.vm == view.vm and e.device == view.device)
        assert view.needs_reset_total == ended_here + (view.open_episode is not None)
        assert view.recoveries_total <= view.needs_reset_total
    assert sum(snap.episodes_ended.values()) == len(ended)


PROFILE = settings(max_examples=200, deadline=None,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@PROFILE
@given(st.data())
def test_episodes_and_violations_match_the_script_exactly(data):
    events, scripts, hints = build(data)
    c = Correlator(config(hints))
    out = feed_all(c, events)
    truths = {(ep.vm, ep.device, ep.start_ns): ep for s in scripts for ep in s.episodes}
    ended = [o.episode for o in out if isinstance(o, EpisodeEnded)]
    open_views = [v.open_episode for v in c.snapshot(events[-1].ts_ns).devices if v.open_episode]
    assert len(ended) + len(open_views) == len(truths)
    for ep in ended + open_views:
        t = truths[key(ep)]
        assert (ep.guest_saw_ns, ep.reset_written_ns, ep.reset_done_ns, ep.driver_ok_ns) == (
            t.guest_saw_ns, t.reset_written_ns, t.reset_done_ns, t.driver_ok_ns)
        assert (ep.outcome, ep.evidence) == (t.outcome, t.evidence)
        if t.driver_ok_ns is not None:
            assert ep.recovery_seconds == (t.driver_ok_ns - t.start_ns) / 1e9
    got = Counter((o.vm.name, o.device, o.rule) for o in out if isinstance(o, Violation))
    want = Counter(v for s in scripts for v in s.violations)
    assert got == want
    failures = sum((s.failures for s in scripts), Counter())
    views = c.snapshot(events[-1].ts_ns).devices
    assert {(v.vm.name, v.device): v.failed_total for v in views if v.failed_total} == \
        dict(failures)
    assert not any(isinstance(o, EpisodeStuck) for o in out)
    check_sane(c, out, events[-1].ts_ns)


@PROFILE
@given(st.data())
def test_reordering_within_the_window_changes_nothing(data):
    events, _, hints = build(data)
    in_order = feed_all(Correlator(config(hints)), events)
    rnd = random.Random(data.draw(st.integers(0, 2**32), label="seed"))
    # delivery order: each event may arrive up to the window late (never later); a guest's
    # device programming stays in its own order (it is serialised in the guest, and capture
    # delivers it in order): the device model applies it on arrival
    delivered = sorted(events, key=lambda e: e.ts_ns + (0 if programming(e)
                                                        else rnd.randrange(WINDOW)))
    c = Correlator(config(hints))
    out = feed_all(c, delivered)
    got, want = [o for o in out if not watch(o)], [o for o in in_order if not watch(o)]
    if len({e.ts_ns for e in events}) == len(events):
        assert got == want
    else:
        # events at the same timestamp arrive in either order: devices are then found in
        # another order, and what one event ends for several devices (a VM exit) comes out in
        # that order. The outputs are the same; only their order within such a group may differ
        assert sorted(map(repr, got)) == sorted(map(repr, want))
    assert watched(out) == watched(in_order)
    assert c.stats()["late_events"] == 0


def programming(ev) -> bool:
    return isinstance(ev, E.RegisterAccess) and (
        ev.space == E.Space.PCICFG or ev.register in (
            E.Register.MSIX_TABLE, E.Register.MSIX_CONFIG, E.Register.QUEUE_SELECT,
            E.Register.QUEUE_MSIX_VECTOR))


def watch(o) -> bool:
    return isinstance(o, (WatchRegister, WatchInterrupt, WatchEcam))


def watched(out) -> set:
    """What capture is left watching after applying the outputs in order."""
    state = set()
    for o in out:
        if watch(o):
            k = (type(o).__name__,) + tuple(v for n, v in sorted(vars_of(o).items()) if n != "add")
            (state.add if o.add else state.discard)(k)
    return state


def vars_of(o) -> dict:
    return {n: getattr(o, n) for n in o.__slots__}


@PROFILE
@given(st.data())
def test_lost_and_late_events_degrade_without_breaking_invariants(data):
    events, _, hints = build(data)
    rnd = random.Random(data.draw(st.integers(0, 2**32), label="seed"))
    loss = data.draw(st.sampled_from((0.0, 0.05, 0.3)), label="loss")
    kept = [e for e in events if isinstance(e, (E.VmStarted, E.ProcessExit)) or rnd.random() >= loss]
    delivered = sorted(kept, key=lambda e: e.ts_ns + rnd.randrange(5 * WINDOW))
    c = Correlator(config(hints, stuck_after_ns=50 * MS))
    out = []
    for ev in delivered:
        out.extend(c.feed(ev))
        if rnd.random() < 0.1:
            out.extend(c.tick(ev.ts_ns))
    out.extend(c.flush())
    # a device found from its traffic before its (late) enumeration is renamed: its episodes
    # ended under the old name
    check_sane(c, out, max(e.ts_ns for e in events), unique_starts=False,
               per_device=not c.stats().get("devices_renamed"))
    # every episode is reported stuck at most once
    stuck = Counter((o.episode.vm, o.episode.device) for o in out if isinstance(o, EpisodeStuck))
    started = Counter()
    for o in out:
        if isinstance(o, EpisodeEnded):
            started[(o.episode.vm, o.episode.device)] += 1
    for view in c.snapshot(max(e.ts_ns for e in events)).devices:
        started[(view.vm, view.device)] += view.open_episode is not None
    assert all(n <= started[k] for k, n in stuck.items())


@PROFILE
@given(st.integers(2, 5), st.booleans(), st.booleans())
def test_pid_reuse_never_mixes_vms(generations, with_exit, leave_open):
    s = Script(unit=1)
    for g in range(generations):
        vm = s.vm(77, f"gen{g}", start_time=1000 * (g + 1))
        dev = vm.device(Transport.PCI_MODERN)
        dev.init()
        dev.needs_reset(notify=False)
        if not (leave_open and g % 2 == 0):
            dev.recover()
        if with_exit:
            vm.exit()
    c = Correlator(CorrelatorConfig())
    out = feed_all(c, s.events)
    ended = [o.episode for o in out if isinstance(o, EpisodeEnded)]
    by_gen = Counter(e.vm.name for e in ended)
    last_open = leave_open and (generations - 1) % 2 == 0 and not with_exit
    assert len(ended) == generations - last_open
    assert all(n == 1 for n in by_gen.values())
    for ep in ended:
        assert ep.vm.start_time == 1000 * (int(ep.vm.name[3:]) + 1)
        want = Outcome.ABANDONED if leave_open and int(ep.vm.name[3:]) % 2 == 0 else Outcome.RECOVERED
        assert ep.outcome == want
    snap = c.snapshot(s.t)
    assert snap.vms == (0 if with_exit else 1)


@PROFILE
@given(st.data(), st.integers(1, 3), st.integers(1, 4))
def test_bounds_hold_on_any_stream(data, max_vms, max_devices):
    events, _, hints = build(data)
    c = Correlator(CorrelatorConfig(hints=hints, reorder_window_ns=WINDOW,
                                    notify_window_ns=1 * MS, max_vms=max_vms,
                                    max_devices=max_devices, max_candidates_per_vm=4))
    out = []
    for ev in events:
        out.extend(c.feed(ev))
        snap = c.snapshot(ev.ts_ns)
        live = [v for v in snap.devices if not v.exited]
        assert snap.vms <= max_vms and len(live) <= max_devices
        assert len(snap.devices) - len(live) <= max_devices    # exited VMs kept a while
    out.extend(c.flush())
    # (an evicted device found again starts its counters afresh: no per-device totals check;
    # and a device may learn an evicted device's vector, so starts may coincide)
    check_sane(c, out, events[-1].ts_ns, unique_starts=False, per_device=False)
    # every watch added for an evicted or exited device was taken back
    from agent.model import WatchRegister
    live = Counter()
    for o in out:
        if isinstance(o, WatchRegister):
            live[(o.pid, o.space, o.addr)] += 1 if o.add else -1
    assert all(n in (0, 1) for n in live.values())
    regs_now = sum(n for n in live.values())
    snap = c.snapshot(events[-1].ts_ns)
    from agent.correlate.pciwatch import needs_watch
    assert regs_now == sum(1 for vm in c._vms.values() for d in vm.devices.values()
                           for reg in d.watched.values() if needs_watch(reg))
    assert regs_now <= max_devices * 64
