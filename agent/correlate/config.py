"""Correlator settings and operator hints."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from agent.events import Space
from agent.model import Transport

MS = 1_000_000
S = 1_000_000_000


@dataclass(frozen=True, slots=True)
class DeviceHint:
    """An operator-told device: the status register of (space, addr) in VMs named `vm`
    ("" = any VM). A hinted address is confirmed on its first access, with this transport/type;
    a hint naming a VM is watched as soon as that VM appears."""

    space: str
    addr: int                      # the status register's address
    transport: str = ""            # "" = decide from the access size
    type: str = "unknown"
    vm: str = ""
    config_vector: Optional[int] = None  # APIC vector of the config interrupt, when known
    gsi: Optional[int] = None             # INTx GSI, when known

    def __post_init__(self) -> None:
        if self.space not in (Space.MMIO, Space.PIO):
            raise ValueError(f"hint space must be mmio or pio, not {self.space!r}")
        if self.transport not in ("", Transport.MMIO, Transport.PCI_MODERN, Transport.PCI_LEGACY):
            raise ValueError(f"hint transport {self.transport!r} is not a guest transport")


@dataclass(frozen=True, slots=True)
class CorrelatorConfig:
    stuck_after_ns: int = 60 * S          # an open episode this old is stuck (EpisodeStuck once)
    max_vms: int = 256
    max_devices: int = 4096               # over all VMs
    notify_window_ns: int = 200 * MS      # config interrupt <-> 0x40 read attribution window
    reorder_window_ns: int = 50 * MS      # events are held this long and processed in ts order
    max_candidates_per_vm: int = 64       # discovery candidate addresses kept per VM (LRU)
    max_recent_interrupts: int = 32       # per VM, for attributing interrupts after the fact
    max_reinit_values: int = 16           # per episode
    # NEEDS_RESET suspected (kernel evidence) when, after a config interrupt, the device is kicked
    # and nothing in the VM completes (no queue interrupt) for this long
    suspect_window_ns: int = 1 * S
    suspect_idle_ns: int = 30 * S         # a config interrupt not followed by a kick this long: dropped
    retain_exited_ns: int = 120 * S       # an exited VM's devices stay in snapshots this long (0: not)
    hints: tuple[DeviceHint, ...] = ()

    def __post_init__(self) -> None:
        for name in ("stuck_after_ns", "max_vms", "max_devices", "notify_window_ns",
                     "max_candidates_per_vm", "max_recent_interrupts", "max_reinit_values",
                     "suspect_window_ns", "suspect_idle_ns"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"CorrelatorConfig.{name} must be a positive integer, not {value!r}")
        if not isinstance(self.reorder_window_ns, int) or self.reorder_window_ns < 0:
            raise ValueError("CorrelatorConfig.reorder_window_ns must be an integer >= 0")
        if not isinstance(self.retain_exited_ns, int) or self.retain_exited_ns < 0:
            raise ValueError("CorrelatorConfig.retain_exited_ns must be an integer >= 0")
