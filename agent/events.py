"""Typed events: the contract between capture (BPF -> userspace) and correlation.

Every event carries `ts_ns`, the kernel's bpf_ktime_get_ns() (CLOCK_MONOTONIC), and `pid`,
the VMM process (tgid) the event belongs to. `tid` is the thread that caused it (a vCPU
thread for guest accesses; for injections, whichever thread injected). Correlation is pure:
it consumes these and nothing else (plus VM identities handed in by the caller).

Events serialise to one JSON object per line (`to_json`/`from_json`); `record` writes this
format and `replay` reads it, so the format is versioned by the `kind` names below.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, ClassVar, Union

# virtio device status bits (virtio 1.x, 2.1)
ACKNOWLEDGE = 0x01
DRIVER = 0x02
DRIVER_OK = 0x04
FEATURES_OK = 0x08
DEVICE_NEEDS_RESET = 0x40
FAILED = 0x80


class Space:
    MMIO = "mmio"
    PIO = "pio"
    # PCI configuration space (segment 0), whether the guest reached it through the 0xCF8/0xCFC
    # ports or an ECAM (MMCONFIG) window: addr = bus << 20 | device << 15 | function << 12 |
    # register offset (byte), the ECAM layout. Capture translates both into this space.
    PCICFG = "pcicfg"


def pcicfg_addr(bus: int, device: int, function: int, offset: int) -> int:
    return (bus & 0xFF) << 20 | (device & 0x1F) << 15 | (function & 0x7) << 12 | (offset & 0xFFF)


def pcicfg_split(addr: int) -> tuple[int, int]:
    """(bdf as bus << 8 | device << 3 | function, register offset) of a pcicfg address."""
    return (addr >> 12) & 0xFFFF, addr & 0xFFF


class Op:
    READ = "read"
    WRITE = "write"


class Register:
    """What a watched guest address is. Values are stable: they are written to BPF maps."""

    UNKNOWN = 0
    STATUS = 1              # device_status (modern common cfg +0x14, legacy I/O +18, mmio +0x70)
    CONFIG_GENERATION = 2   # modern common cfg +0x15, mmio +0xfc
    MSIX_CONFIG = 3         # modern common cfg +0x10, legacy +20 (with MSI-X)
    QUEUE_NOTIFY = 4        # a queue notify address (kicks)
    ISR = 5                 # ISR status (legacy +19, modern ISR cap, mmio +0x60 InterruptStatus)
    INTERRUPT_ACK = 6       # mmio +0x64
    QUEUE_SELECT = 7        # modern common cfg +0x16 (16 bit), legacy I/O +14
    QUEUE_MSIX_VECTOR = 8   # modern common cfg +0x1a (16 bit), legacy I/O +22 (with MSI-X)
    MSIX_TABLE = 9          # an MSI-X table entry's message address (+0), data (+8) or control (+12)

    NAMES: ClassVar[dict[int, str]] = {}


Register.NAMES = {
    v: k.lower() for k, v in vars(Register).items() if k.isupper() and isinstance(v, int)
}


@dataclass(frozen=True, slots=True)
class RegisterAccess:
    """A guest read or write of a (watched or candidate) device register.

    For reads `value` is what the guest got (the completed access, not the
    "unsatisfied-read" exit). `repeats` is how many identical accesses (same register,
    op and value) the kernel folded since the previous forwarded event for this register.
    `register` is what the kernel watch map said (Register.UNKNOWN for discovery candidates).
    """

    ts_ns: int
    pid: int
    tid: int
    space: str          # Space.MMIO | Space.PIO
    op: str             # Op.READ | Op.WRITE
    addr: int           # guest-physical address (mmio) or port (pio)
    size: int           # bytes: 1, 2, 4 or 8
    value: int
    register: int = Register.UNKNOWN
    repeats: int = 0
    kind: ClassVar[str] = "access"


@dataclass(frozen=True, slots=True)
class QueueNotify:
    """A kick that took KVM's fast MMIO (ioeventfd) path: only the address is known."""

    ts_ns: int
    pid: int
    tid: int
    addr: int
    repeats: int = 0
    kind: ClassVar[str] = "fast_mmio"


@dataclass(frozen=True, slots=True)
class MsiInjected:
    """kvm_msi_set_irq. QEMU with the userspace LAPIC address may pass address 0 (an offset).

    Not proof of delivery (in split-irqchip mode it also fires spuriously): trust
    ApicAccepted for delivery.
    """

    ts_ns: int
    pid: int
    tid: int
    address: int
    data: int
    kind: ClassVar[str] = "msi"


@dataclass(frozen=True, slots=True)
class IrqLine:
    """kvm_set_irq: a GSI (INTx / IOAPIC pin) level change."""

    ts_ns: int
    pid: int
    tid: int
    gsi: int
    level: int
    kind: ClassVar[str] = "irq"


@dataclass(frozen=True, slots=True)
class ApicAccepted:
    """kvm_apic_accept_irq: the local APIC accepted `vector` (delivery evidence)."""

    ts_ns: int
    pid: int
    tid: int
    apicid: int
    vector: int
    delivery_mode: int = 0
    kind: ClassVar[str] = "apic"


@dataclass(frozen=True, slots=True)
class VhostStatus:
    """VHOST_VDPA_SET_STATUS / GET_STATUS ioctl by a VMM, with the status byte."""

    ts_ns: int
    pid: int
    tid: int
    op: str             # Op.READ (GET_STATUS) | Op.WRITE (SET_STATUS)
    fd: int
    value: int
    kind: ClassVar[str] = "vhost_status"


@dataclass(frozen=True, slots=True)
class ProcessExit:
    """The VMM process exited: every device and episode of (pid) ends."""

    ts_ns: int
    pid: int
    kind: ClassVar[str] = "exit"


@dataclass(frozen=True, slots=True)
class VmStarted:
    """Userspace-made: first sight of a VMM process, with its identity.

    `start_time` is the process start time (clock ticks since boot, /proc/PID/stat field 22):
    (pid, start_time) identifies a VM across pid reuse.
    """

    ts_ns: int
    pid: int
    start_time: int
    name: str
    namespace: str = ""
    uuid: str = ""
    vmm: str = "qemu"
    kind: ClassVar[str] = "vm"


Event = Union[
    RegisterAccess, QueueNotify, MsiInjected, IrqLine, ApicAccepted, VhostStatus,
    ProcessExit, VmStarted,
]

EVENT_TYPES: dict[str, type] = {
    cls.kind: cls
    for cls in (RegisterAccess, QueueNotify, MsiInjected, IrqLine, ApicAccepted,
                VhostStatus, ProcessExit, VmStarted)
}


class EventFormatError(ValueError):
    pass


def to_dict(event: Event) -> dict[str, Any]:
    d = {"kind": event.kind}
    d.update(dataclasses.asdict(event))
    return d


def to_json(event: Event) -> str:
    return json.dumps(to_dict(event), separators=(",", ":"), sort_keys=True)


def from_dict(d: dict[str, Any]) -> Event:
    kind = d.get("kind")
    cls = EVENT_TYPES.get(kind)  # type: ignore[arg-type]
    if cls is None:
        raise EventFormatError(f"unknown event kind {kind!r}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - names - {"kind"}
    if unknown:
        raise EventFormatError(f"{kind}: unknown fields {sorted(unknown)}")
    try:
        return cls(**{k: v for k, v in d.items() if k != "kind"})
    except TypeError as exc:
        raise EventFormatError(f"{kind}: {exc}") from None


def from_json(line: str) -> Event:
    try:
        d = json.loads(line)
    except json.JSONDecodeError as exc:
        raise EventFormatError(f"not JSON: {exc}") from None
    if not isinstance(d, dict):
        raise EventFormatError("an event line must be a JSON object")
    return from_dict(d)


__all__ = [
    "ACKNOWLEDGE", "DRIVER", "DRIVER_OK", "FEATURES_OK", "DEVICE_NEEDS_RESET", "FAILED",
    "Space", "pcicfg_addr", "pcicfg_split", "Op", "Register", "RegisterAccess", "QueueNotify", "MsiInjected", "IrqLine",
    "ApicAccepted", "VhostStatus", "ProcessExit", "VmStarted", "Event", "EVENT_TYPES",
    "EventFormatError", "to_dict", "to_json", "from_dict", "from_json",
]
