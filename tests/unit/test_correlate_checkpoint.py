"""agent.correlate.checkpoint: the correlator's state carried over an agent restart.

A "restart" here is what agent.run does: the old correlator is flushed and dumped, the dump
goes through JSON (the state file), a fresh correlator restores it; events of the gap (while
no agent ran) are dropped."""
from __future__ import annotations

import json

import pytest
from hypothesis import given, strategies as st

from agent import events as E
from agent.correlate import Correlator, CorrelatorConfig
from agent.correlate.checkpoint import VERSION, StateError, dump, restore
from agent.model import (
    EpisodeEnded, EpisodeStuck, Evidence, Outcome, Rule, Transport, Violation, WatchInterrupt,
    WatchRegister,
)
from test_correlate_guestscript import Script
from test_correlate_properties import PROFILE, build, config, feed_all, key

MS = 1_000_000


def restart(c: Correlator, alive=lambda identity: True, now: int | None = None,
            cfg: CorrelatorConfig | None = None):
    """(new correlator, outputs of the old one's flush, outputs of the restore)."""
    flushed = c.flush()
    state = json.loads(json.dumps(dump(c)))
    new = Correlator(cfg or c.config)
    now = now if now is not None else (c._buffer.released_ns or 0)
    return new, flushed, restore(new, state, alive, now)


def feed(c: Correlator, events) -> list:
    out = []
    for ev in events:
        out.extend(c.feed(ev))
    return out + c.flush()


def ended(out):
    return [o.episode for o in out if isinstance(o, EpisodeEnded)]


def script_with_episode(transport=Transport.PCI_MODERN, vector=0x31):
    s = Script()
    dev = s.vm(7, "web").device(transport, vector=vector)
    dev.init()
    return s, dev


def test_an_episode_open_at_the_restart_keeps_its_start_and_is_reported_once():
    s, dev = script_with_episode()
    truth = dev.needs_reset()
    split = len(s.events)
    dev.recover()
    old = Correlator(CorrelatorConfig(hints=(dev.hint(),)))
    out_old = feed(old, s.events[:split])
    new, flushed, restored = restart(old)
    out_new = feed(new, s.events[split:])
    assert ended(out_old + flushed) == []
    (ep,) = ended(out_new)
    assert ep.outcome == Outcome.RECOVERED and ep.resumed
    assert (ep.start_ns, ep.evidence) == (truth.start_ns, Evidence.CONFIG_INTERRUPT)
    assert (ep.guest_saw_ns, ep.reset_written_ns, ep.reset_done_ns, ep.driver_ok_ns) == (
        truth.guest_saw_ns, truth.reset_written_ns, truth.reset_done_ns, truth.driver_ok_ns)
    assert ep.vm.name == "web"
    # capture is asked at once to watch the device's registers and its config vector again
    watched = {(o.space, o.addr) for o in restored if isinstance(o, WatchRegister) and o.add}
    assert (dev.space, dev.status_addr) in watched
    assert WatchInterrupt(7, vector=0x31) in restored
    assert not [o for o in out_new if isinstance(o, Violation)]
    assert new.snapshot(s.t).episodes_started == {Evidence.CONFIG_INTERRUPT: 1}


def test_a_stuck_episode_is_not_reported_stuck_again_and_keeps_its_age():
    s, dev = script_with_episode()
    truth = dev.needs_reset()
    cfg = CorrelatorConfig(hints=(dev.hint(),), stuck_after_ns=5 * MS)
    old = Correlator(cfg)
    out = feed(old, s.events) + old.tick(s.t + 10 * MS)
    assert [type(o) for o in out if isinstance(o, EpisodeStuck)] == [EpisodeStuck]
    new, _, _ = restart(old, now=s.t + 20 * MS)
    assert not [o for o in new.tick(s.t + 30 * MS) if isinstance(o, EpisodeStuck)]
    (view,) = new.snapshot(s.t + 30 * MS).devices
    assert view.open_episode.start_ns == truth.start_ns and view.open_episode.stuck


def test_the_gap_hid_the_whole_recovery_recovered_with_unknown_time():
    s, dev = script_with_episode()
    truth = dev.needs_reset()
    split = len(s.events)
    dev.recover()
    gap_end = len(s.events)
    dev.read()                               # the guest reads 0x0f after the restart
    old = Correlator(CorrelatorConfig(hints=(dev.hint(),)))
    feed(old, s.events[:split])
    new, _, _ = restart(old)
    out = feed(new, s.events[gap_end:])
    (ep,) = ended(out)
    assert ep.outcome == Outcome.RECOVERED and ep.resumed
    assert ep.start_ns == truth.start_ns and ep.end_ns == s.events[-1].ts_ns
    assert ep.driver_ok_ns is None and ep.recovery_seconds is None
    assert not [o for o in out if isinstance(o, Violation)]


def test_the_gap_hid_the_reset_the_reinit_after_it_is_measured_without_violation():
    s, dev = script_with_episode()
    truth = dev.needs_reset()
    split = len(s.events)
    dev.write(0)
    dev.read(0)
    dev.write(1)
    dev.write(3)
    gap_end = len(s.events)
    dev.write(11)
    ok = dev.write(15)
    old = Correlator(CorrelatorConfig(hints=(dev.hint(),)))
    feed(old, s.events[:split])
    new, _, _ = restart(old)
    out = feed(new, s.events[gap_end:])
    (ep,) = ended(out)
    assert ep.outcome == Outcome.RECOVERED and ep.driver_ok_ns == ok
    assert ep.recovery_seconds == (ok - truth.start_ns) / 1e9
    assert ep.reset_written_ns is None and ep.reinit_values == [11, 15]
    assert not [o for o in out if isinstance(o, Violation)]


def test_a_guest_still_in_needs_reset_after_the_gap_goes_on_as_before():
    s, dev = script_with_episode(Transport.MMIO, vector=None)
    truth = dev.needs_reset()
    dev.read()                               # 0x4f again, after the restart
    split = len(s.events) - 1
    old = Correlator(CorrelatorConfig())
    feed(old, s.events[:split])
    new, _, _ = restart(old)
    out = feed(new, s.events[split:]) + new.tick(s.t + MS)
    assert ended(out) == []
    (view,) = new.snapshot(s.t).devices
    assert view.open_episode.start_ns == truth.start_ns
    assert view.transport == Transport.MMIO and view.needs_reset_total == 1


def test_a_failed_write_after_the_gap_is_not_taken_for_a_reset():
    s, dev = script_with_episode()
    dev.needs_reset()
    split = len(s.events)
    dev.fail()
    old = Correlator(CorrelatorConfig(hints=(dev.hint(),)))
    feed(old, s.events[:split])
    new, _, _ = restart(old)
    feed(new, s.events[split:])
    vm = new._vms[7]
    d = vm.devices[dev.id]
    assert d.failed and not d.reset_unseen and d.open_episode is not None


@pytest.mark.parametrize("why", ["exited", "pid reused"])
def test_episodes_of_a_vm_gone_during_the_gap_end_abandoned_at_the_restore(why):
    s, dev = script_with_episode()
    truth = dev.needs_reset()
    old = Correlator(CorrelatorConfig(hints=(dev.hint(),)))
    feed(old, s.events)
    now = s.t + 5 * MS

    def alive(identity):
        return False if why == "exited" else identity.start_time != 100   # 100: the script's

    new, _, restored = restart(old, alive=alive, now=now)
    (ep,) = ended(restored)
    assert ep.outcome == Outcome.ABANDONED and ep.start_ns == truth.start_ns
    assert ep.end_ns == now and ep.resumed
    snap = new.snapshot(now)
    assert snap.devices == [] and snap.vms == 0
    assert snap.episodes_ended == {Outcome.ABANDONED: 1}
    assert not [o for o in restored if isinstance(o, WatchRegister)]


def test_devices_without_an_episode_are_watched_again_and_relearn_their_status():
    s, dev = script_with_episode(Transport.PCI_LEGACY, vector=None)
    old = Correlator(CorrelatorConfig())
    feed(old, s.events)
    new, _, restored = restart(old)
    assert any(isinstance(o, WatchRegister) and o.addr == dev.status_addr for o in restored)
    # a bit cleared right after the restart is judged from the next baseline, not the old one
    dev.write(1)
    dev.write(3)
    dev.write(1)
    out = feed(new, s.events[-3:])
    assert [o.rule for o in out if isinstance(o, Violation)] == [Rule.BIT_CLEARED_WITHOUT_RESET]


def test_bad_states_are_refused_with_a_reason():
    c = Correlator()
    with pytest.raises(StateError, match="version"):
        restore(c, {"version": 99, "vms": []}, lambda i: True, 0)
    with pytest.raises(StateError, match="malformed"):
        restore(c, {"version": VERSION, "vms": [{"identity": {"pid": 1}}]}, lambda i: True, 0)
    s, dev = script_with_episode()
    old = Correlator()
    feed(old, s.events)
    state = json.loads(json.dumps(dump(old)))
    saved = state["vms"][0]["devices"][0]
    if saved["pci_bdf"] is not None:
        saved["pci_bdf"] += 8       # the name of another PCI function
    else:
        saved["layout"][2] += 0x1000
    with pytest.raises(StateError, match="layout"):
        restore(Correlator(), state, lambda i: True, 0)
    busy = Correlator()
    feed(busy, s.events)
    with pytest.raises(StateError, match="no VM yet"):
        restore(busy, dump(old), lambda i: True, 0)


def test_restore_respects_the_new_bounds():
    s = Script()
    for pid in range(1, 6):
        s.vm(pid, f"vm{pid}").device().init()
    old = Correlator(CorrelatorConfig(max_vms=8))
    feed(old, s.events)
    new, _, _ = restart(old, cfg=CorrelatorConfig(max_vms=2))
    snap = new.snapshot(s.t)
    assert snap.vms == 2 and snap.evictions["vm"] == 3


@PROFILE
@given(st.data())
def test_a_restart_anywhere_loses_no_open_episode_and_reports_none_twice(data):
    """Any stream, restarted (nothing lost) at any event: every episode that was open at the
    restart ends as it does without the restart — same start, marks and outcome — exactly
    once; and no episode is reported twice."""
    events, _, hints = build(data, allow_misbehaviour=data.draw(st.booleans(), label="misbehave"))
    ref_c = Correlator(config(hints))
    ref = [o.episode for o in feed_all(ref_c, events) if isinstance(o, EpisodeEnded)]
    ref += [v.open_episode for v in ref_c.snapshot(events[-1].ts_ns).devices if v.open_episode]
    split = data.draw(st.integers(1, len(events) - 1), label="split")
    old = Correlator(config(hints))
    out = feed(old, events[:split])
    split_ts = events[split - 1].ts_ns
    open_then = {key(v.open_episode) for v in old.snapshot(split_ts).devices if v.open_episode}
    new, flushed, restored = restart(old, now=split_ts)
    out += flushed + restored + feed_all(new, events[split:])
    got = [o.episode for o in out if isinstance(o, EpisodeEnded)]
    got += [v.open_episode for v in new.snapshot(events[-1].ts_ns).devices if v.open_episode]
    keys = [key(e) for e in got]
    assert len(keys) == len(set(keys)), "an episode reported twice"
    by_key = {key(e): e for e in got}
    for want in ref:
        if key(want) not in open_then:
            continue
        ep = by_key[key(want)]
        assert ep.resumed
        assert (ep.outcome, ep.evidence, ep.guest_saw_ns, ep.reset_written_ns,
                ep.reset_done_ns, ep.driver_ok_ns) == (
            want.outcome, want.evidence, want.guest_saw_ns, want.reset_written_ns,
            want.reset_done_ns, want.driver_ok_ns)
