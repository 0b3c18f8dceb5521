"""The per-device state machine against the virtio spec's rules for the status field.

Each test states the rule it checks (virtio 1.x, 2.1 "Device Status Field" and 3.1 "Device
Initialization") and drives agent.correlate.device.DeviceState directly with the status accesses
a driver following (or breaking) that rule makes. Expected values come from the rule, not from
the code.
"""
from __future__ import annotations

import pytest

from agent.correlate.device import DeviceState, _set_mark
from agent.correlate.layout import Layout
from agent.events import ACKNOWLEDGE, DEVICE_NEEDS_RESET, DRIVER, DRIVER_OK, FAILED, FEATURES_OK
from agent.model import (
    Episode, EpisodeEnded, Evidence, Outcome, Rule, Transport, Violation, VmIdentity,
)

VM = VmIdentity(pid=4242, start_time=7, name="spec-vm")
# 3.1.1: reset, ACKNOWLEDGE, DRIVER, FEATURES_OK, DRIVER_OK; each write keeps the earlier bits
MODERN_INIT = (ACKNOWLEDGE, ACKNOWLEDGE | DRIVER, ACKNOWLEDGE | DRIVER | FEATURES_OK,
               ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK)
RUNNING = ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK      # 0x0F
MAX_REINIT = 8


def new_device(transport: str = Transport.PCI_MODERN) -> DeviceState:
    return DeviceState(id="pci-0000:00:03.0", type="rng", transport=transport,
                       layout=Layout(transport, "mmio", 0xFE000000), last_ts=0)


def write(dev: DeviceState, ts: int, value: int, max_reinit: int = MAX_REINIT) -> list:
    return dev.status_write(VM, ts, value, max_reinit)


def rules(out: list) -> list[str]:
    return [o.rule for o in out if isinstance(o, Violation)]


def ended(out: list) -> list[Episode]:
    return [o.episode for o in out if isinstance(o, EpisodeEnded)]


def initialised(ts: int = 100) -> DeviceState:
    """A device a driver reset and brought to DRIVER_OK by the book (3.1.1), one write per ts."""
    dev = new_device()
    assert write(dev, ts, 0) == []
    for i, v in enumerate(MODERN_INIT, 1):
        assert write(dev, ts + i, v) == []
    return dev


def faulted(ts: int = 1000) -> tuple[DeviceState, Episode]:
    """A running device whose driver read DEVICE_NEEDS_RESET at ts: an episode is open."""
    dev = initialised()
    assert dev.status_read(ts, RUNNING | DEVICE_NEEDS_RESET) is True
    ep = dev.start_episode(VM, ts, Evidence.STATUS_READ, guest_saw_ns=ts)
    return dev, ep


# -- 2.1.1: "The driver MUST NOT clear a device status bit" ------------------------------

def test_the_init_sequence_of_3_1_1_is_no_violation_and_counts_one_reset():
    dev = initialised()
    assert dev.resets_total == 1
    assert dev.driver_bits == RUNNING
    assert dev.status == RUNNING
    assert dev.failed_total == 0 and not dev.failed


@pytest.mark.parametrize("cleared", [DRIVER_OK, FEATURES_OK, DRIVER, ACKNOWLEDGE])
def test_clearing_any_init_bit_without_a_reset_is_a_violation(cleared):
    dev = initialised()
    out = write(dev, 200, RUNNING & ~cleared)
    assert rules(out) == [Rule.BIT_CLEARED_WITHOUT_RESET]
    v = out[0]
    assert (v.ts_ns, v.vm, v.device) == (200, VM, dev.id)
    assert "0x0f" in v.detail and f"0x{RUNNING & ~cleared:02x}" in v.detail


def test_clearing_features_ok_during_init_is_a_violation():
    dev = new_device()
    write(dev, 1, 0)
    write(dev, 2, ACKNOWLEDGE)
    write(dev, 3, ACKNOWLEDGE | DRIVER)
    write(dev, 4, ACKNOWLEDGE | DRIVER | FEATURES_OK)
    assert rules(write(dev, 5, ACKNOWLEDGE | DRIVER)) == [Rule.BIT_CLEARED_WITHOUT_RESET]


def test_rewriting_the_same_status_or_adding_bits_clears_nothing():
    dev = initialised()
    assert write(dev, 200, RUNNING) == []
    dev2 = new_device()
    write(dev2, 1, 0)
    # skipping a step adds bits: no bit is cleared (not this rule's business)
    assert write(dev2, 2, ACKNOWLEDGE | DRIVER | FEATURES_OK) == []


def test_a_reset_between_clears_makes_them_legal():
    dev = initialised()
    assert write(dev, 200, 0) == []
    assert write(dev, 201, ACKNOWLEDGE) == []
    assert dev.resets_total == 2


def test_the_first_write_seen_is_judged_by_nothing_before_it():
    # the agent started after the driver: whatever it first sees is the baseline
    dev = new_device()
    assert write(dev, 1, ACKNOWLEDGE | DRIVER) == []
    assert rules(write(dev, 2, ACKNOWLEDGE)) == [Rule.BIT_CLEARED_WITHOUT_RESET]


# -- 2.1.1: "If the driver sets the FAILED bit, the driver MUST later reset the device before
#    attempting to re-initialize it" -----------------------------------------------------

def test_reinitialising_after_failed_without_a_reset_is_a_violation():
    dev = initialised()
    assert write(dev, 200, RUNNING | FAILED) == []
    assert dev.failed and dev.failed_total == 1
    out = write(dev, 201, ACKNOWLEDGE)
    assert rules(out) == [Rule.REINIT_AFTER_FAILED]
    assert (out[0].ts_ns, out[0].vm, out[0].device) == (201, VM, dev.id)
    assert "0x01" in out[0].detail
    assert not dev.failed


def test_failed_then_reset_then_init_is_legal():
    dev = initialised()
    write(dev, 200, RUNNING | FAILED)
    assert write(dev, 201, 0) == []
    assert not dev.failed
    for i, v in enumerate(MODERN_INIT):
        assert write(dev, 202 + i, v) == []


def test_failed_written_twice_is_one_failure():
    dev = initialised()
    write(dev, 200, RUNNING | FAILED)
    assert write(dev, 201, RUNNING | FAILED) == []
    assert dev.failed_total == 1
    # after a reset a new FAILED is a new failure
    write(dev, 202, 0)
    write(dev, 203, ACKNOWLEDGE | FAILED)
    assert dev.failed_total == 2


def test_failed_as_the_very_first_write_counts():
    dev = new_device()
    write(dev, 1, FAILED)
    assert dev.failed_total == 1 and dev.failed


def test_a_failed_driver_keeping_failed_set_adds_no_violation():
    # bits written with FAILED still set are not a re-initialisation
    dev = new_device()
    write(dev, 1, 0)
    write(dev, 2, ACKNOWLEDGE | FAILED)
    assert write(dev, 3, ACKNOWLEDGE | DRIVER | FAILED) == []


def test_a_status_first_read_with_failed_set_binds_the_driver_to_reset():
    # an agent started after the driver failed the device learns it from the first read
    dev = new_device()
    assert dev.status_read(1, ACKNOWLEDGE | DRIVER | FAILED) is False
    assert dev.failed
    assert rules(write(dev, 2, ACKNOWLEDGE)) == [Rule.REINIT_AFTER_FAILED]


def test_a_status_first_read_sets_the_bits_a_later_write_must_keep():
    dev = new_device()
    dev.status_read(1, RUNNING)
    assert dev.driver_bits == RUNNING
    assert rules(write(dev, 2, ACKNOWLEDGE | DRIVER | DRIVER_OK)) == \
        [Rule.BIT_CLEARED_WITHOUT_RESET]


def test_later_reads_do_not_overwrite_what_the_driver_wrote():
    # the device may show bits the driver did not write (DEVICE_NEEDS_RESET): reads after the
    # first never become the driver's bits
    dev = initialised()
    dev.status_read(300, ACKNOWLEDGE)
    assert dev.driver_bits == RUNNING


# -- 2.1.2: "The device MUST initialize device status to 0 upon reset" ---------------------

def test_reading_0_after_the_driver_set_bits_is_an_unseen_reset():
    dev = initialised()
    assert dev.status_read(300, 0) is False
    assert dev.inferred_resets_total == 1
    assert dev.driver_bits == 0
    # so re-initialising from there clears nothing
    assert write(dev, 301, ACKNOWLEDGE) == []


def test_reading_0_after_a_seen_reset_infers_nothing():
    dev = new_device()
    write(dev, 1, 0)
    dev.status_read(2, 0)
    assert dev.inferred_resets_total == 0
    dev2 = new_device()
    dev2.status_read(1, 0)                # nothing known yet
    assert dev2.inferred_resets_total == 0


def test_an_unseen_reset_clears_failed():
    dev = initialised()
    write(dev, 200, RUNNING | FAILED)
    dev.status_read(201, 0)
    assert not dev.failed
    assert write(dev, 202, ACKNOWLEDGE) == []


# -- 3.1.1 step 6: "Re-read device status to ensure the FEATURES_OK bit is still set" ------

def test_re_reading_status_after_features_ok_changes_nothing():
    dev = new_device()
    write(dev, 1, 0)
    write(dev, 2, ACKNOWLEDGE)
    write(dev, 3, ACKNOWLEDGE | DRIVER)
    write(dev, 4, ACKNOWLEDGE | DRIVER | FEATURES_OK)
    assert dev.status_read(5, ACKNOWLEDGE | DRIVER | FEATURES_OK) is False
    assert dev.inferred_resets_total == 0
    assert write(dev, 6, RUNNING) == []
    assert dev.resets_total == 1


# -- 2.1: DEVICE_NEEDS_RESET and the recovery (reset + 3.1.1 again) ------------------------

def test_a_read_showing_needs_reset_asks_for_an_episode_once():
    dev, ep = faulted(1000)
    assert dev.needs_reset_total == 1
    assert dev.open_episode is ep
    # further reads of 0x40 while it is open: no second episode, the first read's time kept
    assert dev.status_read(1010, RUNNING | DEVICE_NEEDS_RESET) is False
    assert ep.guest_saw_ns == 1000


def test_guest_saw_is_the_first_read_of_needs_reset_when_the_episode_started_earlier():
    dev = initialised()
    ep = dev.start_episode(VM, 900, Evidence.CONFIG_INTERRUPT, guest_saw_ns=None)
    dev.status_read(950, RUNNING | DEVICE_NEEDS_RESET)
    dev.status_read(960, RUNNING | DEVICE_NEEDS_RESET)
    assert ep.guest_saw_ns == 950


def test_reset_then_init_to_driver_ok_recovers_with_every_mark():
    dev, ep = faulted(1000)
    assert write(dev, 1010, 0) == []
    assert ep.reset_written_ns == 1010
    dev.status_read(1020, 0)
    dev.status_read(1025, 0)
    assert ep.reset_done_ns == 1020
    assert dev.inferred_resets_total == 0        # the reset was written, not inferred
    out = []
    for i, v in enumerate(MODERN_INIT):
        out += write(dev, 1030 + i, v)
    [e] = ended(out)
    assert rules(out) == []
    assert e.outcome == Outcome.RECOVERED
    assert (e.start_ns, e.guest_saw_ns, e.reset_written_ns, e.reset_done_ns, e.driver_ok_ns,
            e.end_ns) == (1000, 1000, 1010, 1020, 1033, 1033)
    assert e.reinit_values == list(MODERN_INIT)
    assert dev.open_episode is None and dev.recoveries_total == 1
    assert dev.last_episode_end_ns == 1033
    assert e is not ep                           # the output is a copy, not the live episode


def test_a_second_reset_write_keeps_the_first_reset_time():
    dev, ep = faulted(1000)
    write(dev, 1010, 0)
    write(dev, 1011, ACKNOWLEDGE)
    write(dev, 1012, 0)
    assert ep.reset_written_ns == 1010


def test_driver_ok_without_a_reset_is_not_a_recovery():
    # 2.1: the device needs a reset; DRIVER_OK written again without one recovers nothing
    dev, ep = faulted(1000)
    assert ended(write(dev, 1010, RUNNING)) == []
    assert dev.open_episode is ep and ep.reinit_values == []


def test_driver_ok_written_with_failed_is_not_a_recovery():
    dev, ep = faulted(1000)
    write(dev, 1010, 0)
    out = write(dev, 1011, RUNNING | FAILED)
    assert ended(out) == [] and dev.open_episode is ep
    assert ep.driver_ok_ns is None


def test_a_read_of_0_counts_as_the_reset_done_and_lets_init_end_the_episode():
    # the guest's reset write was lost, but its read of 0 shows the device was reset
    dev, ep = faulted(1000)
    dev.status_read(1020, 0)
    assert ep.reset_done_ns == 1020 and dev.inferred_resets_total == 1
    out = []
    for i, v in enumerate(MODERN_INIT):
        out += write(dev, 1030 + i, v)
    [e] = ended(out)
    assert e.outcome == Outcome.RECOVERED and e.reset_written_ns is None


def test_reinit_values_are_bounded():
    dev, ep = faulted(1000)
    write(dev, 1010, 0)
    for i in range(10):
        write(dev, 1011 + i, ACKNOWLEDGE, max_reinit=3)
    assert ep.reinit_values == [ACKNOWLEDGE] * 3
    write(dev, 1100, ACKNOWLEDGE | DRIVER, max_reinit=4)
    assert ep.reinit_values == [ACKNOWLEDGE] * 3 + [ACKNOWLEDGE | DRIVER]


def test_a_reset_while_the_notification_is_awaited_is_a_needs_reset_without_notify():
    # 2.1.2: after setting DEVICE_NEEDS_RESET with DRIVER_OK set, the device MUST send a
    # configuration change notification; the reset clears the bit, so none can come after it
    dev, ep = faulted(1000)
    dev.notify_deadline_ns = 5000
    dev.notify_episode_start_ns = 1000
    out = write(dev, 1100, 0)
    [v] = [o for o in out if isinstance(o, Violation)]
    assert (v.rule, v.ts_ns, v.device, v.vm) == (Rule.NEEDS_RESET_WITHOUT_NOTIFY, 1000, dev.id, VM)
    assert v.detail == "no config interrupt before the reset"   # the episode log's text
    assert dev.notify_deadline_ns is None
    assert write(dev, 1101, 0) == []             # reported once


def test_abandon_ends_the_open_episode_never_before_it_started():
    dev, ep = faulted(1000)
    [e] = ended(dev.abandon(900))
    assert e.outcome == Outcome.ABANDONED and e.end_ns == 1000
    assert dev.recoveries_total == 0 and dev.open_episode is None
    assert dev.abandon(2000) == []
    dev2, _ = faulted(1000)
    [e2] = ended(dev2.abandon(3000))
    assert e2.end_ns == 3000 and dev2.last_episode_end_ns == 3000


def test_an_episode_start_clears_any_kernel_side_suspicion():
    dev = initialised()
    dev.suspect_irq_ns, dev.suspect_kick_ns, dev.suspected = 10, 20, True
    dev.start_episode(VM, 1000, Evidence.VMM, guest_saw_ns=None)
    assert (dev.suspect_irq_ns, dev.suspect_kick_ns, dev.suspected) == (None, None, False)


# -- after an agent restart (the episode was restored, what happened meanwhile is unseen) ---

def restored(reset_seen: bool = False) -> tuple[DeviceState, Episode]:
    dev, ep = faulted(1000)
    if reset_seen:
        write(dev, 1010, 0)
    dev.resumed = True
    return dev, ep


def test_after_a_restart_a_read_still_showing_needs_reset_changes_nothing():
    dev, ep = restored()
    assert dev.after_gap(2000, RUNNING | DEVICE_NEEDS_RESET, write=False) == []
    assert not dev.resumed and not dev.reset_unseen and dev.open_episode is ep


def test_after_a_restart_a_mid_init_read_proves_the_reset_but_not_the_recovery():
    # 3.1.1: a status without DRIVER_OK is an initialisation still under way
    dev, ep = restored()
    assert dev.after_gap(2000, ACKNOWLEDGE | DRIVER | FEATURES_OK, write=False) == []
    assert dev.open_episode is ep and dev.reset_unseen
    assert dev.driver_bits == ACKNOWLEDGE | DRIVER | FEATURES_OK
    # the driver goes on: its DRIVER_OK ends the episode as recovered
    [e] = ended(write(dev, 2010, RUNNING))
    assert e.outcome == Outcome.RECOVERED and e.driver_ok_ns == 2010


def test_after_a_restart_a_read_showing_driver_ok_ends_the_episode_recovered():
    dev, ep = restored()
    [e] = ended(dev.after_gap(2000, RUNNING, write=False))
    assert e.outcome == Outcome.RECOVERED and e.end_ns == 2000
    assert dev.recoveries_total == 1 and not dev.reset_unseen


def test_after_a_restart_a_driver_write_without_needs_reset_follows_an_unseen_reset():
    dev, ep = restored()
    assert dev.after_gap(2000, ACKNOWLEDGE | DRIVER, write=True) == []
    assert dev.reset_unseen and dev.driver_bits == 0
    # the write itself and the rest of the sequence: no bit cleared, DRIVER_OK recovers
    out = write(dev, 2000, ACKNOWLEDGE | DRIVER)
    out += write(dev, 2001, ACKNOWLEDGE | DRIVER | FEATURES_OK)
    out += write(dev, 2002, RUNNING)
    assert rules(out) == []
    [e] = ended(out)
    assert e.reinit_values == [ACKNOWLEDGE | DRIVER, ACKNOWLEDGE | DRIVER | FEATURES_OK, RUNNING]


def test_after_a_restart_a_write_with_the_reset_already_seen_changes_nothing():
    dev, ep = restored(reset_seen=True)
    assert dev.after_gap(2000, ACKNOWLEDGE, write=True) == []
    assert not dev.reset_unseen


@pytest.mark.parametrize("value", [0, FAILED, RUNNING | FAILED])
def test_after_a_restart_a_reset_or_failed_value_says_nothing_about_the_gap(value):
    for as_write in (False, True):
        dev, ep = restored()
        assert dev.after_gap(2000, value, write=as_write) == []
        assert not dev.reset_unseen and dev.open_episode is ep and not dev.resumed


def test_after_a_restart_without_an_open_episode_nothing_happens():
    dev = initialised()
    dev.resumed = True
    assert dev.after_gap(2000, RUNNING, write=False) == []
    assert not dev.resumed and dev.recoveries_total == 0


# -- configuration change notifications ---------------------------------------------------

def test_a_config_interrupt_before_driver_ok_is_a_violation_when_the_irq_is_known():
    dev = new_device()
    dev.config_vector = 0x31
    write(dev, 1, 0)
    write(dev, 2, ACKNOWLEDGE | DRIVER)
    out = dev.config_interrupt(VM, 3)
    assert rules(out) == [Rule.NOTIFY_BEFORE_DRIVER_OK]
    assert out[0].ts_ns == 3 and "0x03" in out[0].detail


def test_a_config_interrupt_after_driver_ok_is_fine_and_recorded():
    dev = initialised()
    dev.gsi = 11
    assert dev.config_interrupt(VM, 500) == []
    assert dev.config_interrupts_total == 1
    assert dev.last_config_irq_ns == 500 and dev.last_config_seen_ns == 500


def test_an_untimed_config_interrupt_is_seen_but_not_timed():
    dev = initialised()
    dev.config_interrupt(VM, 500, timed=False)
    assert dev.last_config_seen_ns == 500 and dev.last_config_irq_ns is None


@pytest.mark.parametrize("known, status", [(False, ACKNOWLEDGE), (True, None)])
def test_no_notify_violation_without_knowing_the_irq_or_the_status(known, status):
    dev = new_device()
    if known:
        dev.config_vector = 0x31
    dev.status = status
    assert dev.config_interrupt(VM, 3) == []


def test_a_config_interrupt_ends_the_wait_for_the_notification():
    dev, _ = faulted(1000)
    dev.notify_deadline_ns = 5000
    dev.config_interrupt(VM, 1001)
    assert dev.notify_deadline_ns is None
    assert rules(write(dev, 1100, 0)) == []


def test_a_config_interrupt_explains_needs_reset_within_the_window_only():
    dev = initialised()
    dev.config_interrupt(VM, 1000)
    assert dev.recent_config_irq(1000, 50) == 1000        # window ends included
    assert dev.recent_config_irq(1050, 50) == 1000
    assert dev.recent_config_irq(1051, 50) is None
    assert dev.recent_config_irq(999, 50) is None         # not from the future
    assert dev.notified_since(1050, 50) and not dev.notified_since(1051, 50)
    assert not dev.notified_since(999, 50)


def test_a_config_interrupt_before_the_last_episode_ended_explains_nothing_new():
    dev, _ = faulted(1000)
    dev.config_interrupt(VM, 1005)
    dev.abandon(1005)
    assert dev.recent_config_irq(1010, 100) is None
    assert not dev.notified_since(1010, 100)
    dev.config_interrupt(VM, 1006, timed=False)
    assert dev.recent_config_irq(1010, 100) is None       # untimed: no raise time
    assert dev.notified_since(1010, 100)


def test_no_config_interrupt_means_nothing_recent():
    dev = initialised()
    assert dev.recent_config_irq(1000, 10**9) is None
    assert not dev.notified_since(1000, 10**9)


def test_config_irq_known_means_a_vector_or_a_line():
    dev = new_device()
    assert not dev.config_irq_known
    dev.gsi = 0
    assert dev.config_irq_known
    dev2 = new_device()
    dev2.config_vector = 0
    assert dev2.config_irq_known


# -- episode marks stay ordered (phases are never negative) ---------------------------------

def test_a_mark_is_never_earlier_than_the_marks_before_it():
    ep = Episode(vm=VM, device="d", type="rng", transport=Transport.MMIO,
                 evidence=Evidence.STATUS_READ, start_ns=100, guest_saw_ns=150)
    _set_mark(ep, "reset_written_ns", 120)
    assert ep.reset_written_ns == 150
    _set_mark(ep, "driver_ok_ns", 300)
    # a late mark before an already set later one is dropped, not applied out of order
    _set_mark(ep, "reset_done_ns", 200)
    assert ep.reset_done_ns is None
    assert ep.driver_ok_ns == 300


def test_a_mark_after_the_earlier_ones_is_kept_as_is():
    ep = Episode(vm=VM, device="d", type="rng", transport=Transport.MMIO,
                 evidence=Evidence.STATUS_READ, start_ns=100)
    _set_mark(ep, "reset_done_ns", 180)
    assert ep.reset_done_ns == 180
    _set_mark(ep, "guest_saw_ns", 90)      # later marks set: guest_saw stays unknown
    assert ep.guest_saw_ns is None


# -- counters and state the exporter and the state file read -------------------------------

def test_every_episode_reset_recovery_and_inferred_reset_is_counted():
    dev = initialised()
    for n in range(3):
        base = 1000 * (n + 2)
        assert dev.status_read(base, RUNNING | DEVICE_NEEDS_RESET) is True
        dev.start_episode(VM, base, Evidence.STATUS_READ, guest_saw_ns=base)
        dev.status_read(base + 1, 0)                          # reset not seen: inferred
        for i, v in enumerate(MODERN_INIT):
            write(dev, base + 2 + i, v)
    assert (dev.needs_reset_total, dev.recoveries_total, dev.inferred_resets_total) == (3, 3, 3)
    assert dev.resets_total == 1                              # only the first init wrote 0


def test_every_status_access_records_its_time_and_value():
    dev = initialised()
    dev.status_read(500, RUNNING | DEVICE_NEEDS_RESET)
    assert (dev.last_ts, dev.status) == (500, RUNNING | DEVICE_NEEDS_RESET)
    write(dev, 510, 0)
    assert (dev.last_ts, dev.status) == (510, 0)


def test_a_status_read_before_driver_ok_makes_a_config_interrupt_premature():
    # the agent learns the device's status from a read as well as from a write
    dev = new_device()
    dev.config_vector = 0x31
    dev.status_read(1, ACKNOWLEDGE | DRIVER)
    [v] = dev.config_interrupt(VM, 2)
    assert (v.rule, v.vm, v.device) == (Rule.NOTIFY_BEFORE_DRIVER_OK, VM, dev.id)


def test_flags_stay_booleans_after_resets():
    # `failed` of a device with an open episode goes to the state file, whose loader accepts
    # only a JSON boolean there
    dev, _ = faulted(1000)
    write(dev, 1001, RUNNING | FAILED)
    dev.status_read(1002, 0)
    assert dev.failed is False
    write(dev, 1003, ACKNOWLEDGE | FAILED)
    write(dev, 1004, 0)
    assert dev.failed is False


def test_a_config_interrupt_at_the_very_time_of_the_read_counts_as_notified():
    dev = initialised()
    dev.config_interrupt(VM, 1000)
    assert dev.notified_since(1000, 50)
    assert dev.recent_config_irq(1000, 0) == 1000


def test_an_ended_episode_is_a_copy_that_later_changes_do_not_reach():
    from agent.correlate.device import copy_episode
    dev, ep = faulted(1000)
    write(dev, 1001, 0)
    write(dev, 1002, ACKNOWLEDGE)
    snap = copy_episode(ep)
    write(dev, 1003, ACKNOWLEDGE | DRIVER)
    assert snap.reinit_values == [ACKNOWLEDGE]
    assert ep.reinit_values == [ACKNOWLEDGE, ACKNOWLEDGE | DRIVER]
    assert snap == copy_episode(snap) and snap.start_ns == ep.start_ns
