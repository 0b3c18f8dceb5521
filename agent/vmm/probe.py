"""What QEMU itself says about its virtio devices, over QMP (agent.vmm.qmp). See docs/qmp.md.

- `virtio_devices(client)`: x-query-virtio -> the virtio devices and their QOM paths;
- `virtio_status(client, path)`: x-query-virtio-status -> status byte and `broken` (QEMU >= 7.2);
- `pci_map(client)`: query-pci -> PCI devices with ids, virtio type and BARs; `device_at` maps a
  guest address seen by the kernel (status register gpa or I/O port) to the BAR holding it;
- `probe(path)`: all of the above over one short-lived connection, bounded in time (the QMP
  session's overall limit) and in work (at most MAX_PROBED_DEVICES status queries; with
  `targets`, only the devices at the suspected addresses);
- `QueryRateLimiter`: at most one probe per VM per interval, so a VM costs no QMP traffic
  unless something about it is already suspicious.

The parse_* functions are pure (QMP "return" values in, dataclasses out) and raise
ProbeFormatError on anything that does not match the QAPI schema.
"""
from __future__ import annotations

import collections
import re
import time
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Iterable, Optional, Protocol

from agent.events import (
    ACKNOWLEDGE, DEVICE_NEEDS_RESET, DRIVER, DRIVER_OK, FAILED, FEATURES_OK, Space,
)
from agent.vmm.qmp import DEFAULT_SESSION_S, DEFAULT_TIMEOUT, QmpClient, QmpVersion, short_repr

VIRTIO_PCI_VENDOR = 0x1af4
MODERN_PCI_BASE = 0x1040          # modern device id = 0x1040 + virtio device id
TRANSITIONAL_PCI_IDS = range(0x1000, 0x1040)
MAX_PROBED_DEVICES = 64           # x-query-virtio-status queries per probe, at most
MAX_BRIDGE_DEPTH = 32             # PCI bridges nested deeper than this are a malformed reply

# virtio device ids (virtio 1.2, 5) -> names from the metric label vocabulary (docs/metrics.md)
VIRTIO_TYPE_NAMES: dict[int, str] = {
    1: "net", 2: "blk", 3: "console", 4: "rng", 5: "balloon", 8: "scsi", 9: "9p", 16: "gpu",
    18: "input", 19: "vsock", 20: "crypto", 23: "iommu", 24: "mem", 25: "sound", 26: "fs",
    27: "pmem", 29: "mac80211_hwsim", 30: "video", 31: "video",
}
# Transitional PCI device id -> virtio device id, for when the subsystem id is absent
# (virtio 1.2, 4.1.2.1)
TRANSITIONAL_VIRTIO_IDS: dict[int, int] = {
    0x1000: 1, 0x1001: 2, 0x1002: 5, 0x1003: 3, 0x1004: 8, 0x1005: 4, 0x1009: 9,
}

# QEMU decodes the status byte into "VIRTIO_CONFIG_S_<NAME>: <description>" strings.
STATUS_BITS: dict[str, int] = {
    "VIRTIO_CONFIG_S_ACKNOWLEDGE": ACKNOWLEDGE,
    "VIRTIO_CONFIG_S_DRIVER": DRIVER,
    "VIRTIO_CONFIG_S_DRIVER_OK": DRIVER_OK,
    "VIRTIO_CONFIG_S_FEATURES_OK": FEATURES_OK,
    "VIRTIO_CONFIG_S_NEEDS_RESET": DEVICE_NEEDS_RESET,
    "VIRTIO_CONFIG_S_FAILED": FAILED,
}


class ProbeFormatError(ValueError):
    """A QMP reply that does not have the shape the QAPI schema promises."""


class Executor(Protocol):
    def execute(self, command: str, arguments: Optional[dict[str, Any]] = None,
                timeout: Optional[float] = None) -> Any: ...


def virtio_type_name(virtio_id: Optional[int]) -> str:
    return VIRTIO_TYPE_NAMES.get(virtio_id, "unknown") if virtio_id is not None else "unknown"


# --- x-query-virtio ----------------------------------------------------------------------------

# virtio-pci: /machine/peripheral/ID/virtio-backend (a child of the PCI proxy);
# virtio-mmio (-device virtio-*-device): /machine/peripheral/ID (the device itself).
_PERIPHERAL_PATH = re.compile(r"^/machine/peripheral/([^/]+)(?:/virtio-backend)?$")


@dataclass(frozen=True, slots=True)
class VirtioDevice:
    path: str            # canonical QOM path of the VirtIODevice (x-query-virtio-status's path)
    name: str            # QEMU's name, e.g. "virtio-net"

    @property
    def qdev_id(self) -> str:
        """The -device id=... (of the PCI proxy for virtio-pci), "" for anonymous devices."""
        m = _PERIPHERAL_PATH.match(self.path)
        return m.group(1) if m else ""

    @property
    def proxied(self) -> bool:
        """True if the VirtIODevice is the `virtio-backend` child of a transport proxy
        (virtio-pci, with or without an id); False for a virtio-mmio device (the device
        itself: /machine/peripheral/X or /machine/peripheral-anon/device[N])."""
        return self.path.endswith("/virtio-backend")


def parse_virtio_list(ret: Any) -> list[VirtioDevice]:
    if not isinstance(ret, list):
        raise ProbeFormatError(f"x-query-virtio: expected a list, got {type(ret).__name__}")
    out = []
    for item in ret:
        try:
            out.append(VirtioDevice(path=_str(item["path"]), name=_str(item["name"])))
        except (KeyError, TypeError, IndexError) as exc:
            raise ProbeFormatError(f"x-query-virtio: bad entry {short_repr(item)}") from exc
    return out


def virtio_devices(client: Executor) -> list[VirtioDevice]:
    return parse_virtio_list(client.execute("x-query-virtio"))


# --- x-query-virtio-status ---------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class VirtioStatus:
    path: str
    name: str
    device_id: int       # virtio device id (1 net, 2 blk, 4 rng, ...)
    status: int          # the device status byte as QEMU holds it (vdev->status)
    broken: bool         # QEMU's vdev->broken: set by virtio_error(), cleared by reset
    started: bool
    disabled: bool
    vm_running: bool
    isr: int

    @property
    def type(self) -> str:
        return virtio_type_name(self.device_id)

    @property
    def needs_reset(self) -> bool:
        return bool(self.status & DEVICE_NEEDS_RESET)


def parse_status_byte(status: Any) -> int:
    """VirtioDeviceStatus {"statuses": ["VIRTIO_CONFIG_S_X: ...", ...], "unknown-statuses"?: n}."""
    try:
        names = status["statuses"]
        # strict: an integer (uint64 bitmap), not a float (Infinity, NaN, 1.5) nor a string
        value = _int(status.get("unknown-statuses", 0))
    except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as exc:
        raise ProbeFormatError(f"status: bad VirtioDeviceStatus {short_repr(status)}") from exc
    if not isinstance(names, list):
        raise ProbeFormatError(f"status: statuses is not a list: {short_repr(names)}")
    for text in names:
        name = _str(text).split(":", 1)[0].strip()
        bit = STATUS_BITS.get(name)
        if bit is None:
            raise ProbeFormatError(f"status: unknown status name {name!r}")
        value |= bit
    if not 0 <= value <= 0xff:
        raise ProbeFormatError(f"status: value {value:#x} is not a byte")
    return value


def parse_virtio_status(path: str, ret: Any) -> VirtioStatus:
    try:
        return VirtioStatus(
            path=path,
            name=_str(ret["name"]),
            device_id=_int(ret["device-id"]),
            status=parse_status_byte(ret["status"]),
            broken=_bool(ret["broken"]),
            started=_bool(ret["started"]),
            disabled=_bool(ret["disabled"]),
            vm_running=_bool(ret["vm-running"]),
            isr=_int(ret["isr"]),
        )
    except (KeyError, TypeError, IndexError) as exc:
        raise ProbeFormatError(
            f"x-query-virtio-status: missing {exc} in {short_repr(ret)}") from exc


def virtio_status(client: Executor, path: str) -> VirtioStatus:
    return parse_virtio_status(path, client.execute("x-query-virtio-status", {"path": path}))


# --- query-pci ---------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class PciBar:
    index: int           # 0-5, 6 = expansion ROM
    space: str           # Space.MMIO | Space.PIO
    address: Optional[int]   # None while the guest (firmware) has not programmed it
    size: int
    prefetch: bool = False
    mem64: bool = False

    def contains(self, space: str, addr: int) -> bool:
        return (self.space == space and self.address is not None
                and self.address <= addr < self.address + self.size)


@dataclass(frozen=True, slots=True)
class PciDevice:
    bus: int
    slot: int
    function: int
    vendor: int
    device: int
    subsystem_vendor: Optional[int]
    subsystem: Optional[int]
    class_code: int
    qdev_id: str
    bars: tuple[PciBar, ...]
    virtio_id: Optional[int]     # None if not a virtio device
    virtio_pci: str              # "modern" (0x1040+), "transitional" (0x1000-0x103f) or ""

    @property
    def bdf(self) -> str:
        # query-pci has no PCI domain; QEMU's root buses used here are all in domain 0.
        return f"0000:{self.bus:02x}:{self.slot:02x}.{self.function:x}"

    @property
    def device_key(self) -> str:
        """Same form as model.Episode.device for PCI devices."""
        return f"pci-{self.bdf}"

    @property
    def virtio_type(self) -> str:
        return virtio_type_name(self.virtio_id)


def virtio_id_from_pci(vendor: int, device: int,
                       subsystem: Optional[int]) -> tuple[Optional[int], str]:
    """(virtio device id, "modern" | "transitional") or (None, "") for a non-virtio device."""
    if vendor != VIRTIO_PCI_VENDOR:
        return None, ""
    if device >= MODERN_PCI_BASE and device <= MODERN_PCI_BASE + 0x3f:
        return device - MODERN_PCI_BASE, "modern"
    if device in TRANSITIONAL_PCI_IDS:
        # Transitional devices carry the virtio id in the subsystem device id.
        if subsystem:
            return subsystem, "transitional"
        return TRANSITIONAL_VIRTIO_IDS.get(device), "transitional"
    return None, ""


def _parse_bar(r: Any) -> PciBar:
    kind = _str(r["type"])
    if kind == "io":
        space = Space.PIO
    elif kind == "memory":
        space = Space.MMIO
    else:
        raise ProbeFormatError(f"query-pci: unknown region type {kind!r}")
    address = _int(r["address"])
    return PciBar(
        index=_int(r["bar"]), space=space,
        # QEMU reports an unprogrammed BAR as PCI_BAR_UNMAPPED (-1 once it is a JSON int).
        address=None if address in (-1, (1 << 64) - 1) else address,
        size=_int(r["size"]),
        prefetch=bool(r.get("prefetch", False)), mem64=bool(r.get("mem_type_64", False)),
    )


def _parse_pci_device(d: Any, out: list[PciDevice], depth: int = 0) -> None:
    if depth > MAX_BRIDGE_DEPTH:
        raise ProbeFormatError(f"query-pci: bridges nested deeper than {MAX_BRIDGE_DEPTH}")
    try:
        ids = d["id"]
        vendor, device = _int(ids["vendor"]), _int(ids["device"])
        subsystem = ids.get("subsystem")
        subsystem = None if subsystem is None else _int(subsystem)
        subsystem_vendor = ids.get("subsystem-vendor")
        subsystem_vendor = None if subsystem_vendor is None else _int(subsystem_vendor)
        virtio_id, kind = virtio_id_from_pci(vendor, device, subsystem)
        out.append(PciDevice(
            bus=_int(d["bus"]), slot=_int(d["slot"]), function=_int(d["function"]),
            vendor=vendor, device=device,
            subsystem_vendor=subsystem_vendor, subsystem=subsystem,
            class_code=_int(d["class_info"]["class"]),
            qdev_id=_str(d["qdev_id"]),
            bars=tuple(_parse_bar(r) for r in d["regions"]),
            virtio_id=virtio_id, virtio_pci=kind,
        ))
        bridge = d.get("pci_bridge")
        if bridge is not None:
            children = bridge.get("devices", [])
            if not isinstance(children, list):
                raise TypeError("pci_bridge.devices is not a list")
            for child in children:
                _parse_pci_device(child, out, depth + 1)
    except (KeyError, TypeError, AttributeError, IndexError) as exc:
        raise ProbeFormatError(f"query-pci: bad device {short_repr(d)}") from exc


def parse_pci(ret: Any) -> list[PciDevice]:
    """Every device of every bus, devices behind bridges included (flattened)."""
    if not isinstance(ret, list):
        raise ProbeFormatError(f"query-pci: expected a list, got {type(ret).__name__}")
    out: list[PciDevice] = []
    for bus in ret:
        try:
            devices = bus["devices"]
            if not isinstance(devices, list):
                raise TypeError("devices is not a list")
        except (KeyError, TypeError, IndexError) as exc:
            raise ProbeFormatError(f"query-pci: bad bus {short_repr(bus)}") from exc
        for d in devices:
            _parse_pci_device(d, out)
    return out


def pci_map(client: Executor) -> list[PciDevice]:
    return parse_pci(client.execute("query-pci"))


@dataclass(frozen=True, slots=True)
class BarHit:
    device: PciDevice
    bar: PciBar
    offset: int          # addr - bar.address


def device_at(devices: list[PciDevice], space: str, addr: int) -> Optional[BarHit]:
    """The device whose programmed BAR holds (space, addr): space is Space.MMIO (a guest-physical
    address) or Space.PIO (an I/O port). None if no BAR holds it."""
    if space not in (Space.MMIO, Space.PIO):
        raise ValueError(f"space must be {Space.MMIO!r} or {Space.PIO!r}, not {space!r}")
    for dev in devices:
        for bar in dev.bars:
            if bar.contains(space, addr):
                return BarHit(dev, bar, addr - bar.address)  # type: ignore[operator]
    return None


PCI_FUNCTION = "pci"    # virtio_at's space for a PCI function, addr = bus << 8 | slot << 3 | fn


def virtio_at(listed: Iterable[VirtioDevice], pci: Iterable[PciDevice], space: str,
              addr: int) -> Optional[VirtioDevice]:
    """The virtio device a guest address (a device's common cfg / I/O base) belongs to, or
    (space PCI_FUNCTION) the virtio device of a PCI function.

    PCI: the BAR holding it names the PCI device, whose qdev id names the virtio device
    (anonymous PCI devices: None). An MMIO address in no PCI BAR (virtio-mmio: QMP has no memory
    map) is the VM's only non-PCI virtio device if it has exactly one; with none or several, or
    for an I/O port in no BAR: None. `listed` must be every device x-query-virtio listed."""
    if space == PCI_FUNCTION:
        # correlation named the device by its PCI address (it saw the enumeration)
        fn = next((d for d in pci if (d.bus << 8 | d.slot << 3 | d.function) == addr), None)
        if fn is None or not fn.qdev_id:
            return None
        return next((v for v in listed if v.qdev_id == fn.qdev_id), None)
    hit = device_at(list(pci), space, addr)
    if hit is not None:
        qid = hit.device.qdev_id
        if not qid:
            return None
        return next((v for v in listed if v.qdev_id == qid), None)
    if space != Space.MMIO:
        return None
    mmio = None
    for v in listed:
        if not v.proxied:
            if mmio is not None:
                return None         # several virtio-mmio devices: which one is unknowable here
            mmio = v
    return mmio


def pci_device_for(devices: list[PciDevice], vdev: VirtioDevice) -> Optional[PciDevice]:
    """The PCI proxy of a virtio device, matched on the -device id (anonymous devices: None)."""
    qid = vdev.qdev_id
    if not qid:
        return None
    for dev in devices:
        if dev.qdev_id == qid:
            return dev
    return None


# --- one probe ---------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class ProbedDevice:
    virtio: VirtioDevice
    status: VirtioStatus
    pci: Optional[PciDevice]     # None for anonymous or non-PCI (virtio-mmio) devices


@dataclass(frozen=True, slots=True)
class VmProbe:
    qemu_version: Optional[QmpVersion]
    devices: tuple[ProbedDevice, ...]        # the devices whose status was queried
    pci: tuple[PciDevice, ...]
    # every device x-query-virtio listed (None: the same as `devices`); more than `devices`
    # when the probe was targeted or capped
    listed: Optional[tuple[VirtioDevice, ...]] = None

    @property
    def virtio(self) -> tuple[VirtioDevice, ...]:
        return self.listed if self.listed is not None else tuple(d.virtio for d in self.devices)


def probe(path: str, timeout: float = DEFAULT_TIMEOUT, *,
          budget_s: Optional[float] = DEFAULT_SESSION_S,
          targets: Optional[Iterable[tuple[str, int]]] = None,
          max_devices: int = MAX_PROBED_DEVICES) -> VmProbe:
    """One connection: the PCI map, the virtio device list and device statuses; closed before
    returning. `targets` ((space, addr) pairs, see `virtio_at`): query the status of the devices
    at those addresses only; None: of every device. Either way at most `max_devices` statuses,
    and the whole session within `budget_s` (QmpDeadline otherwise).
    Raises agent.vmm.qmp.QmpError (QmpCommandError "CommandNotFound" before QEMU 7.2)."""
    with QmpClient.connect(path, timeout, budget_s=budget_s) as client:
        pci = pci_map(client)
        listed = tuple(virtio_devices(client))
        if targets is None:
            wanted: Iterable[VirtioDevice] = listed
        else:
            by_path: dict[str, VirtioDevice] = {}
            for space, addr in targets:
                v = virtio_at(listed, pci, space, addr)
                if v is not None:
                    by_path.setdefault(v.path, v)
            wanted = by_path.values()
        devices = []
        for v in wanted:
            if len(devices) >= max_devices:
                break
            devices.append(ProbedDevice(v, virtio_status(client, v.path), pci_device_for(pci, v)))
        return VmProbe(client.version, tuple(devices), tuple(pci), listed)


# --- rate limiting -----------------------------------------------------------------------------

class QueryRateLimiter:
    """At most one query per key (a VM, e.g. VmIdentity.key) per `interval_s` seconds.

    The table holds at most `max_entries` keys; when full, the key allowed longest ago is
    evicted (counted in `evicted`), which can only let that VM be queried early, never starve
    anyone. Call `forget` when a VM exits.
    """

    def __init__(self, interval_s: float, max_entries: int = 1024,
                 clock: Callable[[], float] = time.monotonic):
        if interval_s <= 0:
            raise ValueError("interval_s must be > 0")
        if max_entries < 1:
            raise ValueError("max_entries must be >= 1")
        self.interval_s = interval_s
        self.max_entries = max_entries
        self._clock = clock
        self._last: collections.OrderedDict[Hashable, float] = collections.OrderedDict()
        self.allowed = 0
        self.denied = 0
        self.evicted = 0

    def allow(self, key: Hashable) -> bool:
        now = self._clock()
        last = self._last.get(key)
        if last is not None and now - last < self.interval_s:
            self.denied += 1
            return False
        self._last[key] = now
        self._last.move_to_end(key)
        while len(self._last) > self.max_entries:
            self._last.popitem(last=False)
            self.evicted += 1
        self.allowed += 1
        return True

    def forget(self, key: Hashable) -> None:
        self._last.pop(key, None)

    def __len__(self) -> int:
        return len(self._last)


# --- strict field accessors --------------------------------------------------------------------

def _str(v: Any) -> str:
    if not isinstance(v, str):
        raise ProbeFormatError(f"expected a string, got {short_repr(v)}")
    return v


def _int(v: Any) -> int:
    # floats (Infinity, NaN, 1e999, 2.0) are refused, not converted (int(inf): OverflowError)
    if isinstance(v, bool) or not isinstance(v, int):
        raise ProbeFormatError(f"expected an integer, got {short_repr(v)}")
    return v


def _bool(v: Any) -> bool:
    if not isinstance(v, bool):
        raise ProbeFormatError(f"expected a boolean, got {short_repr(v)}")
    return v


__all__ = [
    "VIRTIO_PCI_VENDOR", "VIRTIO_TYPE_NAMES", "STATUS_BITS", "ProbeFormatError", "VirtioDevice",
    "VirtioStatus", "PciBar", "PciDevice", "BarHit", "QueryRateLimiter", "virtio_type_name",
    "parse_virtio_list", "parse_status_byte", "parse_virtio_status", "parse_pci",
    "virtio_id_from_pci", "virtio_devices", "virtio_status", "pci_map", "device_at",
    "virtio_at", "pci_device_for", "ProbedDevice", "VmProbe", "probe", "MAX_PROBED_DEVICES",
]
