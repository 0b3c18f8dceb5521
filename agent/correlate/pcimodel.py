"""The guest's PCI devices as it programmed them: pure, from configuration-space accesses.

One PciModel per VM, fed with events.Space.PCICFG accesses (capture translates the 0xCF8/0xCFC
ports and the ECAM window into that space) and with the MSI-X table, msix_config and
queue_msix_vector accesses of the devices it found. From these come, exactly, what the guest
told the device: each function's bus:device.function, vendor/device/subsystem ids and so the
virtio device type (virtio 1.x 4.1.2), its BARs (sizing handled), the virtio vendor
capabilities (common / notify / ISR / device configuration, 4.1.4), the MSI-X capability and
table (entries -> APIC vectors), and the INTx line. Nothing here is QEMU-specific: Cloud
Hypervisor and crosvm program the same configuration space.

Reads are the truth of a register. Writes are taken only for registers the guest can change
(command, BARs, interrupt line, MSI-X message control, q35's PCIEXBAR): a guest writing a
read-only id cannot forge an identity. Everything is bounded: MAX_FUNCTIONS per VM (least
recently touched evicted), 256 bytes of configuration space per function, MAX_MSIX_ENTRIES.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Optional

from agent.events import Space, pcicfg_split
from agent.correlate.layout import type_from_pci_device_id, type_from_virtio_id

VIRTIO_VENDOR = 0x1AF4
CFG_SIZE = 0x100            # the standard header and capability list: all virtio needs
MAX_FUNCTIONS = 256
MAX_MSIX_ENTRIES = 64       # entries followed per function (a table may have up to 2048)
MAX_QUEUES = 64             # queue -> vector pairs followed per device

# configuration header (PCI local bus 3.0, type 0)
COMMAND = 0x04
STATUS = 0x06
HEADER_TYPE = 0x0E
BAR0 = 0x10
SUBSYSTEM_ID = 0x2E
CAP_PTR = 0x34
INTERRUPT_LINE = 0x3C
STATUS_CAP_LIST = 0x10
WRITABLE = ((COMMAND, COMMAND + 2), (INTERRUPT_LINE, INTERRUPT_LINE + 1))
CAP_VENDOR = 0x09
CAP_MSIX = 0x11
# virtio_pci_cap.cfg_type (virtio 1.x 4.1.4)
VIRTIO_PCI_CAP_COMMON_CFG = 1
VIRTIO_PCI_CAP_NOTIFY_CFG = 2
VIRTIO_PCI_CAP_ISR_CFG = 3
VIRTIO_PCI_CAP_DEVICE_CFG = 4
# the sizes of the structures (virtio 1.x 4.1.4.3 common cfg, 4.1.4.5 ISR)
MIN_LENGTH = {VIRTIO_PCI_CAP_COMMON_CFG: 0x38, VIRTIO_PCI_CAP_ISR_CFG: 1}
# q35 (ICH9 MCH) PCIEXBAR at 00:00.0 +0x60: enable bit 0, length bits 2:1, base bits 35:28
PCIEXBAR = 0x60
Q35_HOST_BDF = 0
ECAM_SIZES = {0: 256 << 20, 1: 128 << 20, 2: 64 << 20}

MSI_ADDRESS_BASE = 0xFEE00000


def bdf_name(bdf: int) -> str:
    """The guest's numbering, as `lspci -D` and query-pci print it (segment 0)."""
    return f"0000:{bdf >> 8:02x}:{(bdf >> 3) & 0x1F:02x}.{bdf & 7:x}"


@dataclass(frozen=True, slots=True)
class Bar:
    index: int
    io: bool
    base: int                   # assigned address (mmio) or port (io)
    size: Optional[int]         # None if sizing was not seen


@dataclass(frozen=True, slots=True)
class Region:
    """A virtio structure or MSI-X table at an absolute guest address."""

    space: str                  # events.Space.MMIO | PIO
    addr: int
    length: int

    def contains(self, space: str, addr: int) -> bool:
        return space == self.space and self.addr <= addr < self.addr + self.length


@dataclass(slots=True)
class MsixEntry:
    address: Optional[int] = None   # message address (low dword)
    data: Optional[int] = None
    masked: Optional[bool] = None

    def vector(self) -> Optional[tuple[Optional[int], int]]:
        """(destination APIC id or None for logical mode, APIC vector), when the entry is
        completely programmed, unmasked and targets the local APICs."""
        if self.address is None or self.data is None or self.masked is not False:
            return None
        if self.address & 0xFFF00000 != MSI_ADDRESS_BASE:
            return None
        dest = None if self.address & 0x4 else (self.address >> 12) & 0xFF
        return dest, self.data & 0xFF


@dataclass(slots=True)
class PciFunction:
    bdf: int
    cfg: bytearray = field(default_factory=lambda: bytearray(CFG_SIZE))
    known: bytearray = field(default_factory=lambda: bytearray(CFG_SIZE))  # 1: byte seen
    sizing: set = field(default_factory=set)        # BAR dword offsets written all-ones
    bar_masks: dict = field(default_factory=dict)   # BAR dword offset -> mask read after that
    msix: dict = field(default_factory=dict)        # entry index -> MsixEntry
    msix_config: Optional[int] = None               # the MSI-X entry of config changes
    queue_select: Optional[int] = None
    queue_vectors: dict = field(default_factory=dict)  # queue -> msix entry (0xFFFF: none)
    version: int = 0        # bumped when what the configuration space says changes (caches)

    # -- raw bytes -----------------------------------------------------------------------

    def _get(self, off: int, size: int) -> Optional[int]:
        if off < 0 or off + size > CFG_SIZE or not all(self.known[off:off + size]):
            return None
        return int.from_bytes(self.cfg[off:off + size], "little")

    def _put(self, off: int, size: int, value: int) -> None:
        size = min(size, CFG_SIZE - off)
        if size <= 0:
            return
        new = (value & ((1 << 8 * size) - 1)).to_bytes(size, "little")
        if self.cfg[off:off + size] == new and all(self.known[off:off + size]):
            return
        self.cfg[off:off + size] = new
        self.known[off:off + size] = b"\x01" * size
        self.version += 1

    # -- accesses ------------------------------------------------------------------------

    def read(self, off: int, size: int, value: int) -> None:
        dword = off & ~3
        if BAR0 <= dword < BAR0 + 24 and dword in self.sizing:
            # the read after an all-ones write: the BAR's size mask, not its address
            self.sizing.discard(dword)
            if size == 4 and off == dword and self.bar_masks.get(dword) != value:
                self.bar_masks[dword] = value
                self.version += 1
            return
        self._put(off, size, value)

    def write(self, off: int, size: int, value: int, writable: tuple = ()) -> None:
        """A guest write: BARs (an all-ones write starts sizing), and the bytes of the
        read-write registers in `writable` ((start, end) offsets); the rest is not taken."""
        dword = off & ~3
        if BAR0 <= dword < BAR0 + 24:
            if size == 4 and value == 0xFFFFFFFF:
                self.sizing.add(dword)
                return
            self.sizing.discard(dword)
            if size == 4 and off == dword and not self._upper_dword(dword):
                # the low bits of a BAR (I/O or memory, type, prefetchable) are read-only: a
                # guest writing an address without them does not change them
                ref = self.bar_masks.get(dword)     # the size mask carries the type bits
                if ref is None:
                    ref = self._get(dword, 4)
                if ref is not None:
                    low = 0x3 if ref & 1 else 0xF
                    value = (value & ~low) | (ref & low)
            self._put(off, size, value)
            return
        for i in range(size):
            at = off + i
            if any(lo <= at < hi for lo, hi in WRITABLE + writable):
                self._put(at, 1, value >> (8 * i))

    def _upper_dword(self, dword: int) -> bool:
        """Is this BAR dword the high half of the 64-bit memory BAR before it? All its bits are
        address bits (Linux sizes it too: all-ones, mask 0xffffffff, then 0 written back)."""
        at = BAR0
        while at < dword:
            ref = self.bar_masks.get(at)
            if ref is None:
                ref = self._get(at, 4)
            if ref is not None and not ref & 1 and (ref >> 1) & 3 == 2:
                if at + 4 == dword:
                    return True
                at += 8             # skip the high half
            else:
                at += 4
        return False

    # -- identity ------------------------------------------------------------------------

    @property
    def vendor(self) -> Optional[int]:
        return self._get(0, 2)

    @property
    def device_id(self) -> Optional[int]:
        return self._get(2, 2)

    @property
    def is_virtio(self) -> bool:
        dev = self.device_id
        return self.vendor == VIRTIO_VENDOR and dev is not None and 0x1000 <= dev <= 0x107F

    @property
    def virtio_type(self) -> str:
        """The device type (virtio 1.x 4.1.2.1): modern ids are 0x1040 + type; a transitional
        device's subsystem id is its virtio device id."""
        dev = self.device_id
        if dev is None:
            return "unknown"
        if dev >= 0x1040:
            return type_from_pci_device_id(dev)
        sub = self._get(SUBSYSTEM_ID, 2)
        if sub is not None and type_from_virtio_id(sub) != "unknown":
            return type_from_virtio_id(sub)
        return type_from_pci_device_id(dev)

    @property
    def transitional(self) -> bool:
        dev = self.device_id
        return dev is not None and dev < 0x1040

    # -- resources -----------------------------------------------------------------------

    def bar(self, index: int) -> Optional[Bar]:
        if not 0 <= index < 6:
            return None
        off = BAR0 + 4 * index
        lo = self._get(off, 4)
        if lo is None or self._upper_dword(off):    # (the high half of a 64-bit BAR)
            return None
        mask = self.bar_masks.get(off)
        if lo & 1:
            base = lo & ~0x3
            size = ((~(mask & ~0x3) + 1) & 0xFFFF) if mask else None
            return Bar(index, True, base, size) if base else None
        base = lo & ~0xF
        if (lo >> 1) & 3 == 2:              # 64-bit: the next BAR holds the high dword
            hi = self._get(off + 4, 4)
            if hi is None:
                return None
            base |= hi << 32
        size = ((~(mask & ~0xF) + 1) & 0xFFFFFFFF) if mask else None
        return Bar(index, False, base, size) if base else None

    @property
    def memory_enabled(self) -> bool:
        cmd = self._get(COMMAND, 2)
        return cmd is not None and bool(cmd & 0x2)

    @property
    def io_enabled(self) -> bool:
        cmd = self._get(COMMAND, 2)
        return cmd is not None and bool(cmd & 0x1)

    @property
    def interrupt_line(self) -> Optional[int]:
        line = self._get(INTERRUPT_LINE, 1)
        return line if line is not None and 0 < line < 0xFF else None

    def capabilities(self) -> list[tuple[int, int]]:
        """(offset, id) of each capability the guest walked (stops at the first unread link)."""
        status = self._get(STATUS, 2)
        if status is None or not status & STATUS_CAP_LIST:
            return []
        out = []
        ptr = self._get(CAP_PTR, 1)
        seen = set()
        # the two low bits of a pointer are reserved: mask them before the loop check
        while ptr and (ptr & 0xFC) >= 0x40 and (ptr & 0xFC) not in seen and len(out) < 48:
            ptr &= 0xFC
            seen.add(ptr)
            cap_id = self._get(ptr, 1)
            if cap_id is None:
                break
            out.append((ptr, cap_id))
            ptr = self._get(ptr + 1, 1)
        return out

    def virtio_cap(self, cfg_type: int) -> Optional[tuple[int, int, int, Optional[int]]]:
        """(cap offset, bar, offset in bar, length or None if the guest did not read it) of the
        first virtio capability of cfg_type."""
        for ptr, cap_id in self.capabilities():
            if cap_id != CAP_VENDOR or self._get(ptr + 3, 1) != cfg_type:
                continue
            bar, off = self._get(ptr + 4, 1), self._get(ptr + 8, 4)
            if bar is None or off is None:
                return None
            return ptr, bar, off, self._get(ptr + 12, 4)
        return None

    def region(self, cfg_type: int) -> Optional[Region]:
        cap = self.virtio_cap(cfg_type)
        if cap is None:
            return None
        _, bar_index, off, length = cap
        bar = self.bar(bar_index)
        if bar is None:
            return None
        if length is None:
            # a driver need not read the length: the structure's spec size, or (notify) what
            # the BAR holds past its offset, at most a page
            length = MIN_LENGTH.get(cfg_type) or (
                min(bar.size - off, 0x1000) if bar.size and bar.size > off else 4)
        return Region(Space.PIO if bar.io else Space.MMIO, bar.base + off, length)

    @property
    def notify_multiplier(self) -> Optional[int]:
        cap = self.virtio_cap(VIRTIO_PCI_CAP_NOTIFY_CFG)
        return self._get(cap[0] + 16, 4) if cap is not None else None

    def msix_cap(self) -> Optional[int]:
        for ptr, cap_id in self.capabilities():
            if cap_id == CAP_MSIX:
                return ptr
        return None

    def msix_control(self) -> Optional[int]:
        ptr = self.msix_cap()
        return self._get(ptr + 2, 2) if ptr is not None else None

    @property
    def msix_enabled(self) -> Optional[bool]:
        """True when MSI-X is on and not function-masked; None if not known."""
        on = self.msix_enable_set
        return on and not self.msix_control() & 0x4000     # (None / False as they are)

    @property
    def msix_enable_set(self) -> Optional[bool]:
        """MSI-X Enable, whatever the Function Mask: set, the function must not use INTx#
        (PCI 3.0 6.8.2.3); None if not known."""
        ctrl = self.msix_control()
        if ctrl is None:
            return None if self.msix_cap() is not None else False
        return bool(ctrl & 0x8000)

    def msix_table(self) -> Optional[Region]:
        ptr = self.msix_cap()
        if ptr is None:
            return None
        ctrl, table = self._get(ptr + 2, 2), self._get(ptr + 4, 4)
        if ctrl is None or table is None:
            return None
        bar = self.bar(table & 0x7)
        if bar is None or bar.io:
            return None
        entries = min((ctrl & 0x7FF) + 1, MAX_MSIX_ENTRIES)
        return Region(Space.MMIO, bar.base + (table & ~0x7), 16 * entries)

    def msix_access(self, offset: int, value: int, size: int) -> None:
        """A read or write of the MSI-X table at `offset` from its start."""
        index, word = divmod(offset, 16)
        if index >= MAX_MSIX_ENTRIES or size != 4:
            return
        entry = self.msix.setdefault(index, MsixEntry())
        if word == 0:
            entry.address = value
        elif word == 8:
            entry.data = value
        elif word == 12:
            entry.masked = bool(value & 1)

    def vector_of(self, entry: Optional[int]) -> Optional[tuple[Optional[int], int]]:
        """(destination, vector) the MSI-X entry is programmed with, when exactly known."""
        if entry is None or entry == 0xFFFF or not self.msix_enabled:
            return None
        e = self.msix.get(entry)
        return e.vector() if e is not None else None

    def set_queue_vector(self, entry: int) -> None:
        if self.queue_select is not None and (self.queue_select in self.queue_vectors
                                              or len(self.queue_vectors) < MAX_QUEUES):
            self.queue_vectors[self.queue_select] = entry


@dataclass(frozen=True, slots=True)
class VirtioPci:
    """What correlation needs of one virtio PCI function, all at absolute guest addresses."""

    bdf: int
    type: str
    common: Optional[Region]        # modern common configuration
    isr: Optional[Region]
    notify: Optional[Region]
    notify_multiplier: Optional[int]
    legacy_io: Optional[int]        # transitional: the legacy I/O BAR 0 base
    msix_table: Optional[Region]
    msix_enabled: Optional[bool]
    interrupt_line: Optional[int]

    @property
    def name(self) -> str:
        return f"pci-{bdf_name(self.bdf)}"


class PciModel:
    """One VM's PCI functions. `config_access` returns the bdf it touched (or None)."""

    def __init__(self, max_functions: int = MAX_FUNCTIONS) -> None:
        self.functions: OrderedDict[int, PciFunction] = OrderedDict()
        self.max_functions = max_functions
        # bdf -> (function version, virtio view, memory BARs): a view is derived once per
        # change of what the guest told, not per access
        self._views: dict[int, tuple[int, Optional["VirtioPci"], tuple]] = {}
        self.evicted = 0
        self.ecam: Optional[tuple[int, int]] = None    # (base, size) the guest programmed

    def function(self, bdf: int, create: bool = False) -> Optional[PciFunction]:
        fn = self.functions.get(bdf)
        if fn is None and create:
            if len(self.functions) >= self.max_functions:
                gone, _ = self.functions.popitem(last=False)
                self._views.pop(gone, None)
                self.evicted += 1
            fn = self.functions[bdf] = PciFunction(bdf)
        elif fn is not None:
            self.functions.move_to_end(bdf)
        return fn

    def config_access(self, addr: int, op_write: bool, size: int, value: int) -> Optional[int]:
        bdf, off = pcicfg_split(addr)
        if off >= CFG_SIZE or size not in (1, 2, 4):
            return None
        if not op_write:
            if off < 4 and value & 0xFFFF == 0xFFFF:
                # nothing there (a master abort reads all-ones): not a function
                if bdf in self.functions and off == 0:
                    del self.functions[bdf]
                    self._views.pop(bdf, None)
                    return bdf      # gone: what was derived from it goes too
                return None
            fn = self.function(bdf, create=off == 0)
            if fn is None:
                return None
            fn.read(off, size, value)
            return bdf
        fn = self.function(bdf)
        if fn is None:
            return None
        extra = []
        ptr = fn.msix_cap()
        if ptr is not None:
            # MSI-X message control: its high byte (enable, function mask); the low byte is
            # table size bits 7:0, read-only (PCI 3.0 6.8.2.3)
            extra.append((ptr + 3, ptr + 4))
        if bdf == Q35_HOST_BDF:
            extra.append((PCIEXBAR, PCIEXBAR + 8))
        fn.write(off, size, value, tuple(extra))
        if bdf == Q35_HOST_BDF and PCIEXBAR <= off < PCIEXBAR + 8:
            self._pciexbar(fn)
        return bdf

    def _pciexbar(self, fn: PciFunction) -> None:
        if fn.device_id != 0x29C0 or fn.vendor != 0x8086:      # Q35/ICH9 MCH only
            return
        lo, hi = fn._get(PCIEXBAR, 4), fn._get(PCIEXBAR + 4, 4)
        if lo is None:
            return
        size = ECAM_SIZES.get((lo >> 1) & 3)
        if not lo & 1 or size is None:
            self.ecam = None
            return
        base = ((hi or 0) << 32 | lo) & ((1 << 36) - 1) & ~(size - 1)
        self.ecam = (base, size)

    def virtio(self, bdf: int) -> Optional[VirtioPci]:
        """The virtio view of a function, once its identity is known."""
        return self._view(bdf)[0]

    def memory_bars(self, bdf: int) -> tuple:
        """(base, size or None) of a virtio function's assigned memory BARs."""
        return self._view(bdf)[1]

    def _view(self, bdf: int) -> tuple:
        fn = self.functions.get(bdf)
        if fn is None:
            self._views.pop(bdf, None)
            return None, ()
        cached = self._views.get(bdf)
        if cached is not None and cached[0] == fn.version:
            return cached[1], cached[2]
        view = self._derive(bdf, fn)
        bars = tuple((b.base, b.size) for b in (fn.bar(i) for i in range(6))
                     if b is not None and not b.io) if view is not None else ()
        self._views[bdf] = (fn.version, view, bars)
        return view, bars

    def _derive(self, bdf: int, fn: PciFunction) -> Optional[VirtioPci]:
        if not fn.is_virtio:
            return None
        legacy = None
        if fn.transitional:
            bar0 = fn.bar(0)
            legacy = bar0.base if bar0 is not None and bar0.io else None
        return VirtioPci(
            bdf=bdf, type=fn.virtio_type,
            common=fn.region(VIRTIO_PCI_CAP_COMMON_CFG),
            isr=fn.region(VIRTIO_PCI_CAP_ISR_CFG),
            notify=fn.region(VIRTIO_PCI_CAP_NOTIFY_CFG),
            notify_multiplier=fn.notify_multiplier,
            legacy_io=legacy, msix_table=fn.msix_table(), msix_enabled=fn.msix_enabled,
            interrupt_line=fn.interrupt_line)
