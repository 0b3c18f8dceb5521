"""Per-device state machine: status byte, resets, FAILED, NEEDS_RESET episodes, spec checks.

One DeviceState per discovered device. Its methods take the already-ordered events of that
device and return agent.model outputs; the Correlator decides which device an event belongs to
and when a config interrupt is attributed to it.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

from agent.events import DEVICE_NEEDS_RESET, DRIVER_OK, FAILED
from agent.model import (
    Episode, EpisodeEnded, Outcome, Output, Rule, Violation, VmIdentity,
)
from agent.correlate.layout import Layout

INIT_BITS = 0x0F          # ACKNOWLEDGE | DRIVER | DRIVER_OK | FEATURES_OK
DRIVER_BITS = INIT_BITS | FAILED


MARKS = ("start_ns", "guest_saw_ns", "reset_written_ns", "reset_done_ns", "driver_ok_ns")


def _set_mark(ep: Episode, name: str, ts: int) -> None:
    """Set an episode mark unless a later one is already set. Late events (reordered beyond the
    window) are applied out of order: the marks must stay ordered so no phase is negative."""
    i = MARKS.index(name)
    if any(getattr(ep, later) is not None for later in MARKS[i + 1:]):
        return
    earlier = [getattr(ep, m) for m in MARKS[:i]]
    setattr(ep, name, max([ts] + [m for m in earlier if m is not None]))


def copy_episode(ep: Episode) -> Episode:
    """Outputs and snapshots get copies: the live episode keeps changing."""
    return dataclasses.replace(ep, reinit_values=list(ep.reinit_values))


@dataclass(slots=True)
class DeviceState:
    id: str
    type: str
    transport: str
    layout: Optional[Layout]          # None for vhost devices
    last_ts: int
    status: Optional[int] = None      # last status byte read or written; None = not seen yet
    driver_bits: Optional[int] = None  # status bits the driver has set (what writes built up)
    failed: bool = False              # FAILED written and no reset since
    needs_reset_total: int = 0
    recoveries_total: int = 0
    resets_total: int = 0
    inferred_resets_total: int = 0    # a read of 0 with no reset write seen (lost event, VM reset)
    failed_total: int = 0
    config_interrupts_total: int = 0
    # the config interrupt, exactly as the guest programmed it (MSI-X entry msix_config of a
    # modelled PCI function, or an operator hint); never guessed from timing
    config_vector: Optional[int] = None   # APIC vector
    config_dest: Optional[int] = None     # destination APIC id (None: any, logical mode)
    gsi: Optional[int] = None             # INTx GSI (interrupt line of a modelled function, or hint)
    gsi_shared: bool = False              # another device of the VM has the same line
    pci_bdf: Optional[int] = None         # the PCI function, when its enumeration was seen
    msix_config: Optional[int] = None     # last msix_config / legacy config vector written
    last_config_irq_ns: Optional[int] = None   # when the last config interrupt was raised
    last_config_seen_ns: Optional[int] = None  # when the last one was evidenced (raise time
                                               # known or not: an ISR read with bit 1)
    last_isr: int = 0                     # last ISR / InterruptStatus value read
    last_ack: int = 0                     # last virtio-mmio InterruptACK value written
    last_episode_end_ns: int = -1
    open_episode: Optional[Episode] = None
    notify_deadline_ns: Optional[int] = None  # the last episode waits for a config interrupt until
    notify_episode_start_ns: int = 0
    watched: dict[tuple[str, int], int] = field(default_factory=dict)  # (space, addr) -> Register
    # NEEDS_RESET suspicion from kernel evidence (the guest never reads status): see
    # Correlator._suspicion. suspect_irq_ns: the config interrupt it waits on; suspect_kick_ns:
    # the first kick after it; suspected: NeedsResetSuspected was emitted.
    suspect_irq_ns: Optional[int] = None
    suspect_kick_ns: Optional[int] = None
    suspected: bool = False
    last_kick_ns: Optional[int] = None
    # restored by agent.correlate.checkpoint with an open episode: the next status access shows
    # what happened while no agent watched (after_gap); reset_unseen: a reset happened then
    resumed: bool = False
    reset_unseen: bool = False

    @property
    def config_irq_known(self) -> bool:
        return self.config_vector is not None or self.gsi is not None

    # -- status register -----------------------------------------------------------------

    def status_write(self, vm: VmIdentity, ts: int, value: int, max_reinit: int) -> list[Output]:
        out: list[Output] = []
        self.last_ts = ts
        self.status = value
        ep = self.open_episode
        if value == 0:
            self.resets_total += 1
            self._reset()
            if ep is not None and ep.reset_written_ns is None:
                _set_mark(ep, "reset_written_ns", ts)
            if self.notify_deadline_ns is not None:
                # the reset clears NEEDS_RESET: a later config interrupt cannot be its notification
                self.notify_deadline_ns = None
                out.append(Violation(self.notify_episode_start_ns, vm, self.id,
                                     Rule.NEEDS_RESET_WITHOUT_NOTIFY,
                                     "no config interrupt before the reset"))
            return out
        prev = self.driver_bits
        if value & FAILED and not (prev or 0) & FAILED:
            self.failed_total += 1
        if prev is not None:
            if self.failed and not value & FAILED:
                out.append(Violation(ts, vm, self.id, Rule.REINIT_AFTER_FAILED,
                                     f"wrote 0x{value:02x} after FAILED without a reset"))
            elif prev & INIT_BITS & ~value:
                out.append(Violation(ts, vm, self.id, Rule.BIT_CLEARED_WITHOUT_RESET,
                                     f"0x{prev:02x} -> 0x{value:02x} without writing 0"))
        self.failed = bool(value & FAILED)
        self.driver_bits = value & DRIVER_BITS
        if ep is not None and (ep.reset_written_ns is not None or ep.reset_done_ns is not None
                               or self.reset_unseen):
            if len(ep.reinit_values) < max_reinit:
                ep.reinit_values.append(value)
            if value & DRIVER_OK and not value & FAILED:
                _set_mark(ep, "driver_ok_ns", ts)
                out.append(self._end(ep.driver_ok_ns, Outcome.RECOVERED))
        return out

    def status_read(self, ts: int, value: int) -> bool:
        """Apply a read; True when it shows NEEDS_RESET and no episode is open (caller starts one)."""
        self.last_ts = ts
        self.status = value
        ep = self.open_episode
        if value & DEVICE_NEEDS_RESET:
            if ep is None:
                return True
            if ep.guest_saw_ns is None:
                _set_mark(ep, "guest_saw_ns", ts)
        elif value == 0:
            if self.driver_bits:
                # the device is reset but we saw no 0 written: lost event or a VM reset
                self.inferred_resets_total += 1
                self._reset()
            if ep is not None and ep.reset_done_ns is None:
                _set_mark(ep, "reset_done_ns", ts)
        if self.driver_bits is None:
            self.driver_bits = value & DRIVER_BITS
            self.failed = bool(value & FAILED)
        return False

    def after_gap(self, ts: int, value: int, write: bool) -> list[Output]:
        """The first status access after a restore: did the guest reset the device while no
        agent watched? A driver write (not 0, not FAILED) during NEEDS_RESET with no reset seen
        only follows a reset; a read without NEEDS_RESET means the reset happened; a read
        with DRIVER_OK means the re-initialisation is done too (when: unknown)."""
        self.resumed = False
        ep = self.open_episode
        if ep is None or value == 0 or value & FAILED:
            return []
        reset_seen = ep.reset_written_ns is not None or ep.reset_done_ns is not None
        if write:
            if not reset_seen:
                self._reset()
                self.reset_unseen = True
            return []
        if value & DEVICE_NEEDS_RESET:
            return []
        self.reset_unseen = True
        self.driver_bits = value & DRIVER_BITS
        if value & DRIVER_OK:
            return [self._end(ts, Outcome.RECOVERED)]
        return []

    def clear_suspicion(self) -> None:
        self.suspect_irq_ns = None
        self.suspect_kick_ns = None
        self.suspected = False

    def _reset(self) -> None:
        self.driver_bits = 0
        self.failed = False
        self.reset_unseen = False

    # -- episodes ------------------------------------------------------------------------

    def start_episode(self, vm: VmIdentity, start_ns: int, evidence: str,
                      guest_saw_ns: Optional[int]) -> Episode:
        ep = Episode(vm=vm, device=self.id, type=self.type, transport=self.transport,
                     evidence=evidence, start_ns=start_ns, guest_saw_ns=guest_saw_ns)
        self.open_episode = ep
        self.clear_suspicion()
        self.needs_reset_total += 1
        return ep

    def _end(self, ts: int, outcome: str) -> EpisodeEnded:
        ep = self.open_episode
        assert ep is not None
        ep.end_ns = ts
        ep.outcome = outcome
        if outcome == Outcome.RECOVERED:
            self.recoveries_total += 1
        self.open_episode = None
        self.reset_unseen = False
        self.last_episode_end_ns = ts
        return EpisodeEnded(copy_episode(ep))

    def abandon(self, ts: int) -> list[Output]:
        if self.open_episode is None:
            return []
        return [self._end(max(ts, self.open_episode.start_ns), Outcome.ABANDONED)]

    # -- interrupts ----------------------------------------------------------------------

    def config_interrupt(self, vm: VmIdentity, ts: int, timed: bool = True) -> list[Output]:
        """A configuration-change interrupt of this device: raised at ts (timed), or evidenced at
        ts by an ISR read when when it was raised is not known exactly."""
        out: list[Output] = []
        self.config_interrupts_total += 1
        self.last_config_seen_ns = ts
        if timed:
            self.last_config_irq_ns = ts
        if self.config_irq_known and self.status is not None and not self.status & DRIVER_OK:
            out.append(Violation(ts, vm, self.id, Rule.NOTIFY_BEFORE_DRIVER_OK,
                                 f"config interrupt with status 0x{self.status:02x}"))
        if self.notify_deadline_ns is not None:
            self.notify_deadline_ns = None    # the notification came
        return out

    def notified_since(self, ts: int, window_ns: int) -> bool:
        """Was a config interrupt (timed or not) evidenced within the window up to ts?"""
        t = self.last_config_seen_ns
        return t is not None and ts - window_ns <= t <= ts and t > self.last_episode_end_ns

    def recent_config_irq(self, ts: int, window_ns: int) -> Optional[int]:
        """The config interrupt that can explain a NEEDS_RESET seen at ts, if any."""
        t = self.last_config_irq_ns
        if t is not None and ts - window_ns <= t <= ts and t > self.last_episode_end_ns:
            return t
        return None
