"""Correlation outputs: the contract between correlation and export (metrics, episode log).

Correlation (agent.correlate) turns agent.events into these; export only reads them.
All timestamps are kernel CLOCK_MONOTONIC nanoseconds, as in agent.events.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union


class Transport:
    PCI_MODERN = "pci-modern"
    PCI_LEGACY = "pci-legacy"
    MMIO = "mmio"
    VHOST = "vhost"
    UNKNOWN = "unknown"


class Outcome:
    OPEN = "open"
    RECOVERED = "recovered"
    ABANDONED = "abandoned"     # the VM exited (or the device was evicted) before DRIVER_OK


class Evidence:
    STATUS_READ = "status_read"          # the guest read a status with 0x40 set
    CONFIG_INTERRUPT = "config_interrupt"  # config interrupt, confirmed by a later 0x40 read
    VHOST = "vhost"                      # VHOST_VDPA_GET_STATUS returned 0x40
    VMM = "vmm"                          # the VMM (QEMU x-query-virtio-status) confirmed a
                                         # kernel-side suspicion (the guest never read status)
    ALL = (STATUS_READ, CONFIG_INTERRUPT, VHOST, VMM)


class Rule:
    BIT_CLEARED_WITHOUT_RESET = "status_bit_cleared_without_reset"
    REINIT_AFTER_FAILED = "reinit_after_failed_without_reset"
    NEEDS_RESET_WITHOUT_NOTIFY = "needs_reset_without_config_interrupt"
    NOTIFY_BEFORE_DRIVER_OK = "config_interrupt_before_driver_ok"
    ALL = (BIT_CLEARED_WITHOUT_RESET, REINIT_AFTER_FAILED, NEEDS_RESET_WITHOUT_NOTIFY,
           NOTIFY_BEFORE_DRIVER_OK)


PHASES = ("notify", "react", "reset", "reinit")


@dataclass(frozen=True, slots=True)
class VmIdentity:
    pid: int
    start_time: int          # /proc/PID/stat starttime: (pid, start_time) survives pid reuse
    name: str                # never a raw command line
    namespace: str = ""
    uuid: str = ""
    vmm: str = "qemu"

    @property
    def key(self) -> tuple[int, int]:
        return (self.pid, self.start_time)


@dataclass(slots=True)
class Episode:
    vm: VmIdentity
    device: str              # stable id within the VM, e.g. "pci-0000:00:03.0", "mmio-0xfeb00e00"
    type: str                # "net", "blk", ... or "unknown"
    transport: str           # Transport.*
    evidence: str            # Evidence.*
    start_ns: int
    guest_saw_ns: Optional[int] = None     # first status read by the guest showing 0x40
    reset_written_ns: Optional[int] = None  # first 0 written after start
    reset_done_ns: Optional[int] = None     # first read of 0 after the reset write
    driver_ok_ns: Optional[int] = None      # DRIVER_OK written after the reset
    end_ns: Optional[int] = None
    outcome: str = Outcome.OPEN
    stuck: bool = False
    reinit_values: list[int] = field(default_factory=list)  # status values written after the reset
    resumed: bool = False    # carried over an agent restart: what happened meanwhile is unseen

    @property
    def recovery_seconds(self) -> Optional[float]:
        if self.driver_ok_ns is None:
            return None
        return (self.driver_ok_ns - self.start_ns) / 1e9

    def phase_seconds(self) -> dict[str, float]:
        """Durations of the phases that both ends of are known (subset of PHASES). An episode
        that starts at the guest's status read has no notify phase: when (or whether) the
        device notified is unknown, which is not zero."""
        marks = [self.start_ns, self.guest_saw_ns, self.reset_written_ns, self.reset_done_ns,
                 self.driver_ok_ns]
        out: dict[str, float] = {}
        for name, a, b in zip(PHASES, marks, marks[1:]):
            if name == "notify" and self.evidence == Evidence.STATUS_READ:
                continue
            if a is not None and b is not None:
                out[name] = (b - a) / 1e9
        return out

    def age_seconds(self, now_ns: int) -> float:
        return max(0, (self.end_ns if self.end_ns is not None else now_ns) - self.start_ns) / 1e9


@dataclass(frozen=True, slots=True)
class EpisodeEnded:
    episode: Episode          # outcome RECOVERED or ABANDONED


@dataclass(frozen=True, slots=True)
class EpisodeStuck:
    episode: Episode          # still open, older than the stuck threshold (emitted once)


@dataclass(frozen=True, slots=True)
class Violation:
    ts_ns: int
    vm: VmIdentity
    device: str
    rule: str                 # Rule.*
    detail: str = ""


@dataclass(frozen=True, slots=True)
class WatchRegister:
    """Ask capture to watch (add=True) or forget (add=False) a guest register address."""

    pid: int
    space: str                # events.Space
    addr: int
    register: int             # events.Register
    add: bool = True


@dataclass(frozen=True, slots=True)
class WatchEcam:
    """Ask capture to translate this VM's MMIO accesses in [base, base + size) into PCI
    configuration-space accesses (events.Space.PCICFG, addr = gpa - base): the ECAM window the
    guest's firmware programmed (q35: PCIEXBAR). add=False forgets the VM's window."""

    pid: int
    base: int
    size: int
    add: bool = True


@dataclass(frozen=True, slots=True)
class WatchDeviceBars:
    """Ask capture to forward, with their values, this VM's unwatched 2- and 4-byte MMIO writes
    in [base, base + size): the span of its virtio functions' memory BARs, where a driver
    programs the MSI-X table and msix_config right after reading the capability (before a
    WatchRegister can land). add=False forgets the VM's span."""

    pid: int
    base: int
    size: int
    add: bool = True


@dataclass(frozen=True, slots=True)
class WatchInterrupt:
    """Ask capture to forward interrupts of this VMM on this APIC vector / GSI."""

    pid: int
    vector: Optional[int] = None
    gsi: Optional[int] = None
    add: bool = True


@dataclass(frozen=True, slots=True)
class NeedsResetSuspected:
    """Kernel evidence only: a config interrupt, then kicks with no completion and no status read
    for the suspicion window (how Linux guests, which ignore NEEDS_RESET, look from the host).
    Emitted once per suspicion; the caller may ask the VMM (Correlator.vmm_status)."""

    ts_ns: int
    vm: VmIdentity
    device: str
    since_ns: int             # the config interrupt that started it (no progress since)


Output = Union[EpisodeEnded, EpisodeStuck, Violation, WatchRegister, WatchInterrupt, WatchEcam,
               WatchDeviceBars,
               NeedsResetSuspected]


@dataclass(slots=True)
class DeviceView:
    vm: VmIdentity
    device: str
    type: str
    transport: str
    status: int
    needs_reset_total: int = 0
    recoveries_total: int = 0
    resets_total: int = 0
    failed_total: int = 0
    config_interrupts_total: int = 0
    open_episode: Optional[Episode] = None
    suspected_since_ns: Optional[int] = None   # NEEDS_RESET suspected (kernel evidence), not
                                               # confirmed: no progress since this config irq
    exited: bool = False                       # the VM exited; kept for a while (retention)


@dataclass(slots=True)
class Snapshot:
    """State for one scrape. Counters are cumulative since the agent started."""

    now_ns: int
    devices: list[DeviceView]
    violations: dict[tuple[VmIdentity, str], int]   # (vm, rule) -> count
    episodes_ended: dict[str, int]                  # outcome -> count
    vms: int
    evictions: dict[str, int]                       # "vm" | "device" -> count
    episodes_started: dict[str, int] = field(default_factory=dict)  # evidence -> count
    suspicions: int = 0                             # NeedsResetSuspected emitted (cumulative)
