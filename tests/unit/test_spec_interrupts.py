"""Config interrupts, the start of episodes, the NEEDS_RESET suspicion, the VMM's answer and
vhost-vdpa devices, against the rules they come from.

Rules (virtio 1.x and docs/correlation.md, the correlation core's contract):

- virtio 1.x 2.1.2: a device that sets DEVICE_NEEDS_RESET must send a configuration change
  notification. 4.1.4.5: bit 1 of the ISR status is "configuration change"; 4.2.2: virtio-mmio's
  InterruptStatus / InterruptACK carry the same bit, the driver acknowledges by writing it to
  InterruptACK.
- "Config interrupts": an INTx config interrupt was raised at the last rise of the device's own
  line within `notify_window_ns` before the ISR read / ACK that showed the config bit (both ends
  of the window included, as for the attribution of an interrupt to a 0x40 read), if that line
  is the device's and nobody else's; otherwise it is counted but times nothing. The interrupts
  remembered per VM are the last `max_recent_interrupts`.
- "State machine and episodes": an episode starts at the config interrupt attributed within
  `notify_window_ns` before its first 0x40 read, and after the previous episode; otherwise at
  the read. A guest that reads status before its ISR gets the same episode "as if seen first"
  (the order of the two reads does not change the episode). `episodes_started` counts episodes
  per evidence.
- "Conformance checks": `needs_reset_without_config_interrupt` is dated at the episode start;
  `config_interrupt_before_driver_ok` at the interrupt; violations carry the VM.
- "NEEDS_RESET the guest never reads (suspicion)": a device kicked within `suspect_window_ns`
  before its config interrupt (both ends included), or kicked after it, is suspected once
  `suspect_window_ns` has passed (at exactly that time) since the interrupt or the first kick
  after it with no progress after that; progress is a completion *after* it; an idle device's
  wait is dropped *after* `suspect_idle_ns`; a suspicion waits on the interrupt it started from
  (a second config interrupt does not move it); the counters `pending_suspicions`,
  `suspicions_cleared_by_progress`, `suspicions_cleared_by_vmm` count what they say.
- `Correlator.vmm_status`: the VMM's answer. NEEDS_RESET set: an episode (evidence `vmm`) opens
  at the config interrupt the suspicion started from (at the answer when there was none); not
  set: the suspicion is dropped. A type the VMM names (not "unknown") is the device's. Unknown
  VMs and devices are ignored. Its stuck and suspicion checks only judge events already
  processed (the reordering window's buffered events are not yet known).
- vhost-vdpa: `vhost-fd<fd>` devices, type `unknown`, transport `vhost`, same state machine and
  bounds (a new device evicts the oldest when `max_devices` is reached: its episode ends
  `abandoned` then), restored episodes judged against the gap (docs/run.md "Restarts": a read
  without 0x40 and with DRIVER_OK: recovered in the gap, `driver_ok_ns` null; a driver write with
  no reset seen: the reset happened in the gap, the re-initialisation is measured).
- `Correlator.changes` is bumped (grows) whenever what `checkpoint.dump` saves may have changed.
"""
from __future__ import annotations

import pytest

from agent import events as E
from agent.correlate import Correlator, CorrelatorConfig
from agent.correlate import checkpoint
from agent.correlate.config import DeviceHint
from agent.correlate.layout import Layout
from agent.model import (
    EpisodeEnded, EpisodeStuck, Evidence, NeedsResetSuspected, Outcome, Rule, Transport,
    Violation, VmIdentity,
)
from pciguest import Function, Guest as PciGuest

US = 1_000
MS = 1_000_000
S = 1_000_000_000
PID, TID = 4321, 4322
VMNAME = "irq-vm"
VM = VmIdentity(pid=PID, start_time=100, name=VMNAME, vmm="qemu")
T0 = 1 * S

# virtio-mmio device on INTx (GSI hinted): status +0x70, InterruptACK +0x64, QueueNotify +0x50
MMIO_BASE = 0xFEB00000
MMIO_STATUS, MMIO_ACK = MMIO_BASE + 0x70, MMIO_BASE + 0x64
MMIO_ID = Layout(Transport.MMIO, E.Space.MMIO, MMIO_BASE).device_id
GSI, OTHER_GSI = 5, 9
# modern virtio-pci device with its config vector hinted; QEMU's layout: notify at +0x3000
MOD_BASE = 0xC0004000
MOD_STATUS, MOD_NOTIFY = MOD_BASE + 0x14, MOD_BASE + 0x3000
MOD_ID = Layout(Transport.PCI_MODERN, E.Space.MMIO, MOD_BASE).device_id
CONFIG_VEC, QUEUE_VEC = 0x40, 0x41

RUNNING = 0x0F           # ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK (3.1.1)
BROKEN = RUNNING | E.DEVICE_NEEDS_RESET
ISR_CONFIG = 0x2
W_NOTIFY = 200 * MS      # default notify_window_ns
W_SUSPECT = 1 * S        # default suspect_window_ns


def mmio_hint(gsi: int | None = GSI) -> DeviceHint:
    return DeviceHint(E.Space.MMIO, MMIO_STATUS, transport=Transport.MMIO, type="net",
                      vm=VMNAME, gsi=gsi)


def mod_hint() -> DeviceHint:
    return DeviceHint(E.Space.MMIO, MOD_STATUS, transport=Transport.PCI_MODERN, type="blk",
                      vm=VMNAME, config_vector=CONFIG_VEC)


def of(out, cls):
    return [o for o in out if isinstance(o, cls)]


class Guest:
    """One VM (hinted devices exist from its start) fed event by event; reorder window 0 unless
    told, so each event is processed when fed."""

    def __init__(self, hints=None, **cfg) -> None:
        cfg.setdefault("reorder_window_ns", 0)
        self.c = Correlator(CorrelatorConfig(
            hints=tuple(hints) if hints is not None else (mmio_hint(), mod_hint()), **cfg))
        self.out: list = []
        self.feed(E.VmStarted(T0, PID, 100, VMNAME))

    def feed(self, *events) -> list:
        got = []
        for ev in events:
            got += self.c.feed(ev)
        self.out += got
        return got

    def tick(self, now: int) -> list:
        got = self.c.tick(now)
        self.out += got
        return got

    # -- virtio-mmio (4.2.2): 32-bit accesses
    def mmio(self, ts: int, op: str, value: int) -> list:
        return self.feed(E.RegisterAccess(ts, PID, TID, E.Space.MMIO, op, MMIO_STATUS, 4, value))

    def ack(self, ts: int, value: int = ISR_CONFIG) -> list:
        return self.feed(E.RegisterAccess(ts, PID, TID, E.Space.MMIO, E.Op.WRITE, MMIO_ACK, 4,
                                          value))

    def rise(self, ts: int, gsi: int = GSI) -> list:
        return self.feed(E.IrqLine(ts, PID, TID, gsi, 1))

    def mmio_init(self, ts: int, values=(0, 1, 3, 11, RUNNING)) -> int:
        for i, v in enumerate(values):
            self.mmio(ts + i * US, E.Op.WRITE, v)
        return ts + (len(values) - 1) * US

    def mmio_recover(self, ts: int) -> int:
        """The driver resets and re-initialises (3.1.1): DRIVER_OK at the returned time."""
        self.mmio(ts, E.Op.WRITE, 0)
        self.mmio(ts + US, E.Op.READ, 0)
        return self.mmio_init(ts + 2 * US, (1, 3, 11, RUNNING))

    # -- modern virtio-pci with MSI-X
    def mod(self, ts: int, op: str, value: int) -> list:
        return self.feed(E.RegisterAccess(ts, PID, TID, E.Space.MMIO, op, MOD_STATUS, 1, value))

    def mod_init(self, ts: int) -> None:
        for i, v in enumerate((0, 1, 3, 11, RUNNING)):
            self.mod(ts + i * US, E.Op.WRITE, v)

    def kick(self, ts: int) -> list:
        return self.feed(E.QueueNotify(ts, PID, TID, MOD_NOTIFY))

    def config_msi(self, ts: int) -> list:
        """The config MSI, accepted by an APIC (the delivery evidence)."""
        return self.feed(E.ApicAccepted(ts, PID, TID, 0, CONFIG_VEC))

    def completion(self, ts: int) -> list:
        """A queue interrupt (progress): an MSI on a vector that is no config vector."""
        return self.feed(E.MsiInjected(ts, PID, TID, 0xFEE00000, QUEUE_VEC))

    def view(self, device: str, now: int | None = None):
        snap = self.c.snapshot(now if now is not None else T0 + 100 * S)
        [v] = [d for d in snap.devices if d.device == device]
        return v

    def episode(self, device: str = MMIO_ID):
        return self.view(device).open_episode


def suspected_guest(**cfg) -> tuple[Guest, int]:
    """The modern device kicked, then its config MSI, then silence: suspected (docs item 4)."""
    g = Guest(**cfg)
    g.mod_init(T0 + 1 * MS)
    g.kick(T0 + 10 * MS)
    irq = T0 + 20 * MS
    g.config_msi(irq)
    g.tick(irq + W_SUSPECT + 10 * MS)
    assert [s.since_ns for s in of(g.out, NeedsResetSuspected)] == [irq]
    return g, irq


# ---------------------------------------------------------------------------------------------
# INTx config interrupts (4.1.4.5, 4.2.2): when was it raised?

def test_a_rise_at_the_ack_s_own_time_is_the_interrupt_that_was_acknowledged():
    g = Guest()
    g.mmio_init(T0 + 1 * MS)
    t = T0 + 50 * MS
    g.rise(t)
    g.ack(t)                      # same timestamp, after the rise
    g.mmio(t + 10 * US, E.Op.READ, BROKEN)
    ep = g.episode()
    assert (ep.evidence, ep.start_ns, ep.guest_saw_ns) == (Evidence.CONFIG_INTERRUPT, t, t + 10 * US)


def test_a_rise_exactly_one_window_before_the_ack_is_still_within_it():
    g = Guest()
    g.mmio_init(T0 + 1 * MS)
    t = T0 + 500 * MS
    g.rise(t - W_NOTIFY)
    g.ack(t)
    g.mmio(t, E.Op.READ, BROKEN)
    ep = g.episode()
    assert (ep.evidence, ep.start_ns) == (Evidence.CONFIG_INTERRUPT, t - W_NOTIFY)


def test_a_rise_older_than_the_window_times_nothing_but_the_interrupt_is_counted():
    g = Guest()
    g.mmio_init(T0 + 1 * MS)
    t = T0 + 500 * MS
    g.rise(t - W_NOTIFY - 1)
    g.ack(t)
    assert g.view(MMIO_ID).config_interrupts_total == 1
    g.mmio(t + 10 * US, E.Op.READ, BROKEN)
    ep = g.episode()
    assert (ep.evidence, ep.start_ns) == (Evidence.STATUS_READ, t + 10 * US)


def test_another_line_s_later_rise_is_not_the_device_s_interrupt():
    g = Guest()
    g.mmio_init(T0 + 1 * MS)
    t = T0 + 500 * MS
    g.rise(t - 50 * MS)                 # the device's own line
    g.rise(t - 10 * MS, OTHER_GSI)      # someone else's, later
    g.ack(t)
    g.mmio(t, E.Op.READ, BROKEN)
    ep = g.episode()
    assert (ep.evidence, ep.start_ns) == (Evidence.CONFIG_INTERRUPT, t - 50 * MS)


def test_the_last_max_recent_interrupts_rises_are_remembered():
    g = Guest(max_recent_interrupts=1)
    g.mmio_init(T0 + 1 * MS)
    t = T0 + 500 * MS
    g.rise(t - 5 * MS)          # the only one remembered: the bound is 1
    g.ack(t)
    g.mmio(t, E.Op.READ, BROKEN)
    ep = g.episode()
    assert (ep.evidence, ep.start_ns) == (Evidence.CONFIG_INTERRUPT, t - 5 * MS)


def test_a_config_interrupt_before_driver_ok_is_a_violation_of_this_vm():
    g = Guest()
    g.mmio_init(T0 + 1 * MS, values=(0, 1, 3))     # no DRIVER_OK yet
    t = T0 + 50 * MS
    g.rise(t)
    out = g.ack(t + 5 * US)
    [v] = of(out, Violation)
    assert (v.rule, v.vm, v.device, v.ts_ns) == (Rule.NOTIFY_BEFORE_DRIVER_OK, VM, MMIO_ID, t)
    assert g.c.snapshot(t + S).violations == {(VM, Rule.NOTIFY_BEFORE_DRIVER_OK): 1}


# ---------------------------------------------------------------------------------------------
# The episode does not depend on whether the guest reads ISR or status first ("as if seen
# first"): window ends included, the previous episode's end excluded.

def _two_orders(prepare, rise_at, read_at, ack_at_status_first):
    """The same interrupt and 0x40 read, the ISR acknowledged before or after the status read.
    Returns (evidence, start, guest_saw) of both."""
    got = []
    for isr_first in (True, False):
        g = Guest()
        prepare(g)
        g.rise(rise_at)
        if isr_first:
            g.ack(read_at)
            g.mmio(read_at, E.Op.READ, BROKEN)
        else:
            g.mmio(read_at, E.Op.READ, BROKEN)
            g.ack(ack_at_status_first)
        ep = g.episode()
        got.append((ep.evidence, ep.start_ns, ep.guest_saw_ns))
    return got


def test_order_rise_at_the_read_s_own_time():
    t = T0 + 100 * MS
    got = _two_orders(lambda g: g.mmio_init(T0 + 1 * MS), t, t, t + 10 * US)
    assert got == [(Evidence.CONFIG_INTERRUPT, t, t)] * 2


def test_order_rise_exactly_one_window_before_the_read():
    t = T0 + 500 * MS
    got = _two_orders(lambda g: g.mmio_init(T0 + 1 * MS), t - W_NOTIFY, t, t)
    assert got == [(Evidence.CONFIG_INTERRUPT, t - W_NOTIFY, t)] * 2


def test_order_rise_at_the_previous_episode_s_end_is_not_after_it():
    end = T0 + 300 * MS

    def prepare(g: Guest) -> None:
        g.mmio_init(T0 + 1 * MS)
        g.mmio(T0 + 200 * MS, E.Op.READ, BROKEN)      # a first episode...
        assert g.mmio_recover(end - 5 * US) == end    # ...recovered at `end`
        [done] = of(g.out, EpisodeEnded)
        assert done.episode.driver_ok_ns == end

    t = end + 20 * US
    got = _two_orders(prepare, end, t, t)
    assert got == [(Evidence.STATUS_READ, t, t)] * 2


def test_status_read_first_then_isr_counts_one_config_interrupt_episode_each_time():
    g = Guest()
    g.mmio_init(T0 + 1 * MS)
    starts = []
    for t in (T0 + 100 * MS, T0 + 400 * MS):
        g.rise(t - 30 * US)
        g.mmio(t, E.Op.READ, BROKEN)
        g.ack(t + 10 * US)
        starts.append(g.episode().start_ns)
        g.mmio_recover(t + 1 * MS)
    assert starts == [T0 + 100 * MS - 30 * US, T0 + 400 * MS - 30 * US]
    assert g.c.snapshot(T0 + S).episodes_started == {Evidence.CONFIG_INTERRUPT: 2}


def test_a_notified_episode_is_no_notification_violation_at_its_reset():
    """2.1.2: the device sent the notification (raised before the read, acknowledged after)."""
    g = Guest()
    g.mmio_init(T0 + 1 * MS)
    t = T0 + 100 * MS
    g.rise(t - 30 * US)
    g.mmio(t, E.Op.READ, BROKEN)
    g.ack(t + 10 * US)
    g.mmio_recover(t + 1 * MS)
    g.tick(t + 2 * W_NOTIFY)
    assert [v for v in of(g.out, Violation) if v.rule == Rule.NEEDS_RESET_WITHOUT_NOTIFY] == []
    [done] = of(g.out, EpisodeEnded)
    assert done.episode.evidence == Evidence.CONFIG_INTERRUPT


def test_the_late_attribution_is_saved_state_so_changes_grows():
    g = Guest()
    g.mmio_init(T0 + 1 * MS)
    t = T0 + 100 * MS
    g.rise(t - 30 * US)
    g.mmio(t, E.Op.READ, BROKEN)
    before, dump = g.c.changes, checkpoint.dump(g.c)
    g.ack(t + 10 * US)
    assert checkpoint.dump(g.c) != dump
    assert g.c.changes > before


# ---------------------------------------------------------------------------------------------
# 2.1.2 and the notification rule

def test_the_notification_violation_is_dated_at_the_episode_start():
    g = Guest()
    g.mmio_init(T0 + 1 * MS)
    t = T0 + 100 * MS
    g.mmio(t, E.Op.READ, BROKEN)        # no config interrupt at all
    g.tick(t + W_NOTIFY + 1)
    [v] = of(g.out, Violation)
    assert (v.rule, v.ts_ns, v.vm, v.device) == (Rule.NEEDS_RESET_WITHOUT_NOTIFY, t, VM, MMIO_ID)


def test_an_episode_from_a_read_is_saved_state_so_changes_grows():
    g = Guest(hints=(mmio_hint(gsi=None),))
    g.mmio_init(T0 + 1 * MS)
    g.mmio(T0 + 10 * MS, E.Op.READ, BROKEN)        # an earlier episode: changes is well past 1
    g.mmio_recover(T0 + 20 * MS)
    before, dump = g.c.changes, checkpoint.dump(g.c)
    assert before > 3
    g.mmio(T0 + 100 * MS, E.Op.READ, BROKEN)
    assert checkpoint.dump(g.c) != dump
    assert g.c.changes > before


def test_episodes_started_counts_every_episode():
    g = Guest(hints=(mmio_hint(gsi=None),))
    g.mmio_init(T0 + 1 * MS)
    for t in (T0 + 100 * MS, T0 + 200 * MS, T0 + 300 * MS):
        g.mmio(t, E.Op.READ, BROKEN)
        g.mmio_recover(t + 1 * MS)
    assert g.c.snapshot(T0 + S).episodes_started == {Evidence.STATUS_READ: 3}


@pytest.mark.parametrize("short", [66, 70])
def test_an_episode_after_many_short_ones_is_still_reported_stuck(short):
    """Bounds (max_devices=1) must not lose a live episode: quick episodes, then one that stays
    open."""
    g = Guest(hints=(mmio_hint(gsi=None),), max_devices=1, stuck_after_ns=10 * S)
    g.mmio_init(T0 + 1 * MS)
    t = T0 + 10 * MS
    for _ in range(short):
        g.mmio(t, E.Op.READ, BROKEN)
        g.mmio_recover(t + 10 * US)
        t += 1 * MS
    g.mmio(t, E.Op.READ, BROKEN)
    g.tick(t + 10 * S)
    [stuck] = of(g.out, EpisodeStuck)
    assert stuck.episode.start_ns == t
    assert len(of(g.out, EpisodeEnded)) == short


@pytest.mark.parametrize("short", [66, 70])
def test_a_notify_window_after_many_short_episodes_is_still_judged(short):
    g = Guest(hints=(mmio_hint(),), max_devices=1, notify_window_ns=10 * S)
    g.mmio_init(T0 + 1 * MS)
    t = T0 + 10 * MS
    starts = []
    for _ in range(short):
        starts.append(t)
        g.mmio(t, E.Op.READ, BROKEN)
        g.mmio_recover(t + 10 * US)     # reset before any notification: judged then
        t += 1 * MS
    starts.append(t)
    g.mmio(t, E.Op.READ, BROKEN)
    g.tick(t + 10 * S + 1)
    vs = of(g.out, Violation)
    assert [v.rule for v in vs] == [Rule.NEEDS_RESET_WITHOUT_NOTIFY] * (short + 1)
    assert [v.ts_ns for v in vs] == starts


# ---------------------------------------------------------------------------------------------
# Suspicion (docs item 4, 5)

def test_a_kick_at_the_interrupt_s_own_time_is_a_kick_before_it():
    g = Guest()
    g.mod_init(T0 + 1 * MS)
    irq = T0 + 20 * MS
    g.kick(irq)
    g.config_msi(irq)
    g.tick(irq + W_SUSPECT)
    [s] = of(g.out, NeedsResetSuspected)
    assert (s.since_ns, s.ts_ns, s.device, s.vm) == (irq, irq + W_SUSPECT, MOD_ID, VM)


def test_a_kick_exactly_one_window_before_the_interrupt_is_within_it():
    g = Guest()
    g.mod_init(T0 + 1 * MS)
    irq = T0 + 2 * S
    g.kick(irq - W_SUSPECT)
    g.config_msi(irq)
    g.tick(irq + W_SUSPECT)
    [s] = of(g.out, NeedsResetSuspected)
    assert s.since_ns == irq


def test_a_kick_older_than_the_window_leaves_the_device_idle():
    g = Guest()
    g.mod_init(T0 + 1 * MS)
    irq = T0 + 2 * S
    g.kick(irq - W_SUSPECT - 1)
    g.config_msi(irq)
    g.tick(irq + 5 * W_SUSPECT)
    assert of(g.out, NeedsResetSuspected) == []


def test_suspected_exactly_one_window_after_the_first_kick():
    g = Guest()
    g.mod_init(T0 + 1 * MS)
    irq = T0 + 20 * MS
    g.config_msi(irq)
    kick = irq + 100 * MS
    g.kick(kick)
    g.kick(kick + 200 * MS)
    g.tick(kick + W_SUSPECT - 1)
    assert of(g.out, NeedsResetSuspected) == []
    g.tick(kick + W_SUSPECT)
    [s] = of(g.out, NeedsResetSuspected)
    assert (s.ts_ns, s.since_ns) == (kick + W_SUSPECT, irq)


def test_a_completion_at_the_kick_s_own_time_is_not_progress_after_it():
    g = Guest()
    g.mod_init(T0 + 1 * MS)
    irq = T0 + 20 * MS
    g.config_msi(irq)
    kick = irq + 100 * MS
    g.kick(kick)
    g.completion(kick)
    g.tick(kick + W_SUSPECT)
    [s] = of(g.out, NeedsResetSuspected)
    assert s.since_ns == irq
    assert g.c.stats().get("suspicions_cleared_by_progress", 0) == 0


def test_progress_clears_the_suspicion_and_is_counted():
    g = Guest()
    g.mod_init(T0 + 1 * MS)
    for irq in (T0 + 20 * MS, T0 + 2 * S):
        g.config_msi(irq)
        g.kick(irq + 100 * MS)
        assert g.c.stats()["pending_suspicions"] == 1
        g.completion(irq + 150 * MS)
        assert g.c.stats()["pending_suspicions"] == 0
    g.tick(T0 + 10 * S)
    assert of(g.out, NeedsResetSuspected) == []
    assert g.c.stats()["suspicions_cleared_by_progress"] == 2


def test_an_idle_device_s_wait_lasts_suspect_idle_ns_inclusive():
    g = Guest(suspect_idle_ns=2 * S)
    g.mod_init(T0 + 1 * MS)
    irq = T0 + 20 * MS
    g.config_msi(irq)                        # never kicked before
    g.tick(irq + 2 * S)
    assert g.c.stats()["pending_suspicions"] == 1
    g.kick(irq + 2 * S)                      # still waiting: this kick counts
    g.tick(irq + 2 * S + W_SUSPECT)
    [s] = of(g.out, NeedsResetSuspected)
    assert s.since_ns == irq


def test_an_idle_device_s_wait_is_dropped_after_suspect_idle_ns():
    g = Guest(suspect_idle_ns=2 * S)
    g.mod_init(T0 + 1 * MS)
    irq = T0 + 20 * MS
    g.config_msi(irq)
    g.tick(irq + 2 * S + 1)
    assert g.c.stats()["pending_suspicions"] == 0
    g.kick(irq + 2 * S + 2)
    g.tick(irq + 5 * S)
    assert of(g.out, NeedsResetSuspected) == []


def test_a_second_config_interrupt_does_not_move_the_suspicion():
    g, irq = suspected_guest()
    irq2 = irq + 2 * S
    g.kick(irq2 - 10 * MS)
    g.config_msi(irq2)
    g.tick(irq2 + 2 * W_SUSPECT)
    assert len(of(g.out, NeedsResetSuspected)) == 1
    assert g.view(MOD_ID, irq2 + 2 * W_SUSPECT).suspected_since_ns == irq
    g.c.vmm_status(PID, MOD_ID, irq2 + 3 * S, True)
    ep = g.episode(MOD_ID)
    assert (ep.evidence, ep.start_ns, ep.guest_saw_ns) == (Evidence.VMM, irq, None)


# ---------------------------------------------------------------------------------------------
# The VMM's answer

def test_the_vmm_s_answer_about_an_unknown_vm_or_device_is_ignored():
    g = Guest()
    before = g.c.changes
    assert g.c.vmm_status(PID + 1, MMIO_ID, T0 + S, True) == []
    assert g.c.vmm_status(PID, "mmio-0x1234", T0 + S, True) == []
    assert g.c.changes == before


def test_vmm_confirmation_without_a_suspicion_starts_at_the_answer():
    g = Guest()
    g.mmio_init(T0 + 1 * MS)
    g.mmio(T0 + 10 * MS, E.Op.READ, BROKEN)        # an earlier episode: changes is well past 2
    g.mmio_recover(T0 + 20 * MS)
    before, dump = g.c.changes, checkpoint.dump(g.c)
    assert before > 3
    g.c.vmm_status(PID, MMIO_ID, T0 + 5 * S, True)
    ep = g.episode()
    assert (ep.evidence, ep.start_ns, ep.guest_saw_ns, ep.vm) == (Evidence.VMM, T0 + 5 * S, None, VM)
    assert checkpoint.dump(g.c) != dump
    assert g.c.changes > before
    assert g.c.snapshot(T0 + 6 * S).episodes_started == {Evidence.STATUS_READ: 1, Evidence.VMM: 1}


def test_vmm_confirmation_of_a_suspicion_starts_at_its_interrupt():
    g, irq = suspected_guest()
    g.c.vmm_status(PID, MOD_ID, irq + 2 * S, True)
    ep = g.episode(MOD_ID)
    assert (ep.evidence, ep.start_ns, ep.vm) == (Evidence.VMM, irq, VM)
    assert g.c.stats()["pending_suspicions"] == 0
    assert g.view(MOD_ID).suspected_since_ns is None


def test_a_late_vmm_confirmation_is_stuck_at_once_and_only_once():
    g, irq = suspected_guest(stuck_after_ns=5 * S)
    out = g.c.vmm_status(PID, MOD_ID, irq + 6 * S, True)
    [stuck] = of(out, EpisodeStuck)
    assert (stuck.episode.start_ns, stuck.episode.evidence) == (irq, Evidence.VMM)
    assert of(g.c.tick(irq + 20 * S), EpisodeStuck) == []


def test_vmm_type_is_taken_unless_unknown():
    g = Guest()
    g.c.vmm_status(PID, MMIO_ID, T0 + S, False, type="unknown")
    assert g.view(MMIO_ID).type == "net"           # the hint's
    g.c.vmm_status(PID, MMIO_ID, T0 + S, False)
    assert g.view(MMIO_ID).type == "net"
    before, dump = g.c.changes, checkpoint.dump(g.c)
    g.c.vmm_status(PID, MMIO_ID, T0 + 2 * S, False, type="console")
    assert g.view(MMIO_ID).type == "console"
    assert checkpoint.dump(g.c) != dump
    assert g.c.changes > before


def test_vmm_clear_drops_the_suspicion_and_is_counted():
    g, irq = suspected_guest()
    assert g.c.stats()["pending_suspicions"] == 1
    g.c.vmm_status(PID, MOD_ID, irq + 2 * S, False)
    assert g.c.stats()["pending_suspicions"] == 0
    assert g.view(MOD_ID).suspected_since_ns is None
    irq2 = irq + 3 * S
    g.kick(irq2 - 10 * MS)
    g.config_msi(irq2)
    g.tick(irq2 + 2 * W_SUSPECT)
    assert [s.since_ns for s in of(g.out, NeedsResetSuspected)] == [irq, irq2]
    g.c.vmm_status(PID, MOD_ID, irq2 + 3 * S, False)
    assert g.c.stats()["suspicions_cleared_by_vmm"] == 2
    assert g.c.stats()["pending_suspicions"] == 0
    assert g.view(MOD_ID).open_episode is None


def test_vmm_answer_leaves_another_device_s_wait_alone():
    g = Guest()
    g.mmio_init(T0 + 1 * MS)
    g.mod_init(T0 + 2 * MS)
    g.config_msi(T0 + 20 * MS)          # the modern device: idle, waiting
    assert g.c.stats()["pending_suspicions"] == 1
    out = g.c.vmm_status(PID, MMIO_ID, T0 + 30 * MS, True)
    assert of(out, NeedsResetSuspected) == []
    assert g.c.stats()["pending_suspicions"] == 1
    assert g.episode(MMIO_ID).evidence == Evidence.VMM


def test_vmm_answer_judges_only_events_already_processed():
    """A completion still in the reordering window when the VMM answers is progress all the
    same: the other device is not suspected from the answer's time."""
    g = Guest(reorder_window_ns=50 * MS)
    g.mod_init(T0 + 1 * MS)
    g.mmio_init(T0 + 2 * MS)
    g.kick(T0 + 1 * S)
    irq = T0 + 1 * S + 10 * MS
    g.config_msi(irq)
    g.completion(irq + W_SUSPECT - 10 * MS)    # buffered: newer events not seen yet
    out = g.c.vmm_status(PID, MMIO_ID, irq + 3 * S, True)
    assert of(out, NeedsResetSuspected) == []
    g.out += out
    g.out += g.c.flush()
    g.tick(irq + 10 * S)
    assert of(g.out, NeedsResetSuspected) == []
    assert g.c.stats()["suspicions_cleared_by_progress"] == 1


# ---------------------------------------------------------------------------------------------
# vhost-vdpa

FD = 17
VHOST_ID = f"vhost-fd{FD}"


def vhost(g: Guest, ts: int, op: str, value: int) -> list:
    return g.feed(E.VhostStatus(ts, PID, TID, op, FD, value))


def vhost_broken(stuck_after_ns: int = 60 * S) -> tuple[Guest, int]:
    g = Guest(hints=(), stuck_after_ns=stuck_after_ns)
    for i, v in enumerate((0, 1, 3, 11, RUNNING)):
        vhost(g, T0 + i * US, E.Op.WRITE, v)
    t = T0 + 10 * MS
    vhost(g, t, E.Op.READ, BROKEN)
    return g, t


def test_a_vhost_device_is_unknown_typed_and_its_episode_is_of_this_vm():
    g, t = vhost_broken()
    v = g.view(VHOST_ID)
    assert (v.type, v.transport) == ("unknown", Transport.VHOST)
    ep = v.open_episode
    assert (ep.evidence, ep.start_ns, ep.guest_saw_ns, ep.vm) == (Evidence.VHOST, t, None, VM)


def test_a_vhost_episode_becomes_stuck_once():
    g, t = vhost_broken(stuck_after_ns=5 * S)
    g.tick(t + 6 * S)
    g.tick(t + 20 * S)
    [stuck] = of(g.out, EpisodeStuck)
    assert (stuck.episode.device, stuck.episode.vm) == (VHOST_ID, VM)


def test_a_vhost_reset_during_an_episode_is_saved_state_so_changes_grows():
    g, t = vhost_broken()
    before, dump = g.c.changes, checkpoint.dump(g.c)
    vhost(g, t + 1 * MS, E.Op.WRITE, 0)
    assert checkpoint.dump(g.c) != dump
    assert g.c.changes > before
    assert g.episode(VHOST_ID).reset_written_ns == t + 1 * MS


def test_a_vhost_status_bit_cleared_is_a_violation_of_this_vm():
    g = Guest(hints=())
    for i, v in enumerate((0, 1, 3, 11, RUNNING, 0x07)):      # FEATURES_OK cleared
        vhost(g, T0 + i * US, E.Op.WRITE, v)
    [v] = of(g.out, Violation)
    assert (v.rule, v.vm, v.device) == (Rule.BIT_CLEARED_WITHOUT_RESET, VM, VHOST_ID)
    assert g.c.snapshot(T0 + S).violations == {(VM, Rule.BIT_CLEARED_WITHOUT_RESET): 1}


def test_a_new_vhost_device_evicts_the_oldest_and_abandons_its_episode_then():
    g = Guest(hints=(mmio_hint(),), max_devices=1)
    g.mmio_init(T0 + 1 * MS)
    g.mmio(T0 + 10 * MS, E.Op.READ, BROKEN)
    t = T0 + 50 * MS
    out = vhost(g, t, E.Op.READ, RUNNING)
    [ended] = of(out, EpisodeEnded)
    assert (ended.episode.device, ended.episode.outcome, ended.episode.end_ns) == (
        MMIO_ID, Outcome.ABANDONED, t)
    assert [d.device for d in g.c.snapshot(t).devices] == [VHOST_ID]
    assert g.c.snapshot(t).evictions["device"] == 1


def _restored_vhost() -> tuple[Guest, int]:
    g, t = vhost_broken()
    state = checkpoint.dump(g.c)
    g2 = Guest.__new__(Guest)
    g2.c = Correlator(CorrelatorConfig(reorder_window_ns=0))
    g2.out = checkpoint.restore(g2.c, state, lambda identity: True, t + 1 * S)
    return g2, t


def test_restored_vhost_episode_read_running_recovered_in_the_gap():
    g, start = _restored_vhost()
    t = start + 2 * S
    out = vhost(g, t, E.Op.READ, RUNNING)
    [ended] = of(out, EpisodeEnded)
    ep = ended.episode
    assert (ep.outcome, ep.end_ns, ep.driver_ok_ns, ep.resumed) == (Outcome.RECOVERED, t, None, True)
    assert ep.recovery_seconds is None


def test_restored_vhost_episode_first_write_is_measured_reinit():
    g, start = _restored_vhost()
    t = start + 2 * S
    out = vhost(g, t, E.Op.WRITE, RUNNING)     # 0, 1, 3, 11 happened in the gap
    [ended] = of(out, EpisodeEnded)
    ep = ended.episode
    assert (ep.outcome, ep.driver_ok_ns, ep.reinit_values) == (Outcome.RECOVERED, t, [RUNNING])
    assert ep.recovery_seconds == (t - start) / 1e9
    assert ep.reset_written_ns is None


def test_restored_vhost_episode_still_broken_stays_open():
    g, start = _restored_vhost()
    out = vhost(g, start + 2 * S, E.Op.READ, BROKEN)
    assert of(out, EpisodeEnded) == []
    ep = g.episode(VHOST_ID)
    assert (ep.start_ns, ep.resumed, ep.evidence) == (start, True, Evidence.VHOST)


# ---------------------------------------------------------------------------------------------
# A device found from its traffic, named by annotate_device (QEMU's query-pci), whose
# enumeration is seen later (a rescan, a reboot) is the same device: "A device found earlier
# from its traffic whose enumeration is seen later takes its PCI name"; its open episode ends
# like any other ("Abandoned: ProcessExit ... end the open episode with outcome abandoned").

def test_an_annotated_device_keeps_its_episode_when_its_enumeration_is_seen():
    c = Correlator(CorrelatorConfig(reorder_window_ns=0))
    clock = [T0]

    def at() -> int:
        clock[0] += 1 * US
        return clock[0]

    out = c.feed(E.VmStarted(at(), PID, 100, VMNAME))
    base = 0xC0004000          # a running modern device (4 KiB-aligned common cfg) seen reading
    out += c.feed(E.RegisterAccess(at(), PID, TID, E.Space.MMIO, E.Op.READ, base + 0x14, 1,
                                   RUNNING))
    assert c.annotate_device(PID, E.Space.MMIO, base + 0x14, "rng", bdf="0000:00:03.0")
    out += c.feed(E.RegisterAccess(at(), PID, TID, E.Space.MMIO, E.Op.READ, base + 0x14, 1,
                                   BROKEN))
    [view] = c.snapshot(clock[0]).devices
    assert view.device == "pci-0000:00:03.0" and view.open_episode is not None
    PciGuest(PID, TID, at, lambda ev: out.extend(c.feed(ev))).program(
        Function(3 << 3, bar4=base), CONFIG_VEC, QUEUE_VEC)
    [view] = c.snapshot(clock[0]).devices
    assert view.open_episode is not None and view.open_episode.start_ns == T0 + 3 * US
    out += c.feed(E.ProcessExit(at(), PID))
    [ended] = of(out, EpisodeEnded)
    assert (ended.episode.device, ended.episode.outcome) == ("pci-0000:00:03.0",
                                                             Outcome.ABANDONED)
