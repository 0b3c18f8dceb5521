"""A virtio PCI function and a guest that enumerates and programs it, as agent.events.

Written from the specs, not from agent.correlate.pcimodel: the configuration space a virtio 1.x
device presents (4.1.2 ids, 4.1.4 vendor capabilities; PCI 3.0 header, BARs, MSI-X capability)
and what a firmware / driver does with it through the configuration mechanism (read the ids,
size and assign BARs, walk the capability list byte by byte, enable MSI-X, program table entries,
write msix_config). Capture delivers configuration accesses as Space.PCICFG with ECAM-style
addresses; that is what `cfg_read` / `cfg_write` emit.

The layout follows QEMU's (BAR1: MSI-X table, BAR4: 64-bit, common cfg +0, ISR +0x1000, device
cfg +0x2000, notify +0x3000 with multiplier 4) unless told otherwise.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from agent import events as E

VIRTIO_IDS = {"net": 1, "blk": 2, "console": 3, "rng": 4, "balloon": 5, "scsi": 8, "9p": 9}
TRANSITIONAL_IDS = {"net": 0x1000, "blk": 0x1001, "balloon": 0x1002, "console": 0x1003,
                    "scsi": 0x1004, "rng": 0x1005, "9p": 0x1009}


@dataclass
class Function:
    """The configuration space of one virtio PCI function (what the device answers)."""

    bdf: int
    type: str = "rng"
    transitional: bool = False
    msix_vectors: int = 2               # 0: no MSI-X capability (INTx only)
    bar4: int = 0xFE000000              # modern structures (64-bit memory BAR)
    bar1: int = 0xFEB80000              # MSI-X table + PBA
    io_bar: int = 0xC000                # transitional: legacy I/O BAR 0
    line: int = 11
    space: bytearray = field(default_factory=lambda: bytearray(256))
    sizes: dict = field(default_factory=dict)   # BAR offset -> size (0 = not implemented)

    def __post_init__(self) -> None:
        c = self.space
        device = TRANSITIONAL_IDS[self.type] if self.transitional else 0x1040 + VIRTIO_IDS[self.type]
        self._w(0x00, 2, 0x1AF4)
        self._w(0x02, 2, device)
        self._w(0x06, 2, 0x0010)                    # status: capabilities list
        self._w(0x08, 4, 0x00FF0001 if self.type != "net" else 0x02000001)
        self._w(0x2C, 2, 0x1AF4)
        self._w(0x2E, 2, VIRTIO_IDS[self.type] if self.transitional else 0x1100)
        self._w(0x3D, 1, 1)                          # INTA
        self.sizes = {0x10: 0x40 if self.transitional else 0,
                      0x14: 0x1000 if self.msix_vectors else 0, 0x18: 0, 0x1C: 0,
                      0x20: 0x4000, 0x24: 0}
        caps = []
        if self.msix_vectors:
            # table at BAR1 +0, PBA at BAR1 +0x800
            caps.append((0x11, bytes([0, 0]) + (self.msix_vectors - 1).to_bytes(2, "little")
                         + (0x0 | 1).to_bytes(4, "little") + (0x800 | 1).to_bytes(4, "little")))
        for cfg_type, off, length, extra in ((1, 0x0, 0x1000, b""), (3, 0x1000, 0x1000, b""),
                                             (4, 0x2000, 0x1000, b""),
                                             (2, 0x3000, 0x1000, (4).to_bytes(4, "little"))):
            body = bytes([0, 0, 16 + len(extra), cfg_type, 4, 0, 0, 0]) + \
                off.to_bytes(4, "little") + length.to_bytes(4, "little") + extra
            caps.append((0x09, body))
        ptr = 0x40
        self._w(0x34, 1, ptr)
        for i, (cap_id, body) in enumerate(caps):
            nxt = ptr + len(body) if i + 1 < len(caps) else 0
            nxt = (nxt + 3) & ~3
            c[ptr:ptr + len(body)] = body
            c[ptr] = cap_id
            c[ptr + 1] = nxt if i + 1 < len(caps) else 0
            ptr = nxt
        self.msix_cap = 0x40 if self.msix_vectors else None

    def _w(self, off: int, size: int, value: int) -> None:
        self.space[off:off + size] = value.to_bytes(size, "little")

    def read(self, off: int, size: int) -> int:
        return int.from_bytes(self.space[off:off + size], "little")

    @property
    def common(self) -> int:
        return self.bar4

    @property
    def isr(self) -> int:
        return self.bar4 + 0x1000

    @property
    def notify(self) -> int:
        return self.bar4 + 0x3000

    @property
    def name(self) -> str:
        return f"pci-0000:{self.bdf >> 8:02x}:{(self.bdf >> 3) & 0x1F:02x}.{self.bdf & 7:x}"


class Guest:
    """A guest (firmware + driver) programming functions; `emit(event)` receives each access."""

    def __init__(self, pid: int, tid: int, clock, emit) -> None:
        self.pid, self.tid, self.clock, self.emit = pid, tid, clock, emit

    def _ev(self, space: str, op: str, addr: int, size: int, value: int) -> None:
        self.emit(E.RegisterAccess(self.clock(), self.pid, self.tid, space, op, addr, size, value))

    def cfg_read(self, fn: Function, off: int, size: int = 4) -> int:
        value = fn.read(off, size)
        self._ev(E.Space.PCICFG, E.Op.READ, E.pcicfg_addr(fn.bdf >> 8, (fn.bdf >> 3) & 31,
                                                             fn.bdf & 7, off), size, value)
        return value

    def cfg_write(self, fn: Function, off: int, value: int, size: int = 4) -> None:
        self._ev(E.Space.PCICFG, E.Op.WRITE, E.pcicfg_addr(fn.bdf >> 8, (fn.bdf >> 3) & 31,
                                                              fn.bdf & 7, off), size, value)

    def probe_empty(self, bdf: int) -> None:
        self._ev(E.Space.PCICFG, E.Op.READ, E.pcicfg_addr(bdf >> 8, (bdf >> 3) & 31, bdf & 7, 0),
                 4, 0xFFFFFFFF)

    def enumerate(self, fn: Function) -> None:
        """What a BIOS does: ids, BAR sizing and assignment, interrupt line, decoding on."""
        self.cfg_read(fn, 0x00)
        self.cfg_read(fn, 0x08)
        self.cfg_read(fn, 0x0C)
        self.cfg_read(fn, 0x2C)
        self.cfg_write(fn, 0x04, 0, 2)
        off = 0x10
        while off <= 0x24:
            size = fn.sizes.get(off, 0)
            io = off == 0x10 and fn.transitional
            is64 = off == 0x20
            self.cfg_read(fn, off)
            self.cfg_write(fn, off, 0xFFFFFFFF)
            mask = 0 if not size else ((~(size - 1)) & 0xFFFFFFFF) | (1 if io else 0) | \
                (0x4 if is64 else 0)
            fn._w(off, 4, mask)
            self.cfg_read(fn, off)
            base = {0x10: fn.io_bar | 1, 0x14: fn.bar1, 0x20: fn.bar4 | 0x4}.get(off, 0) \
                if size else 0
            fn._w(off, 4, base)
            self.cfg_write(fn, off, base)
            if is64 and size:
                fn._w(off + 4, 4, 0)
                self.cfg_write(fn, off + 4, 0)
                off += 4
            off += 4
        fn._w(0x3C, 1, fn.line)
        self.cfg_write(fn, 0x3C, fn.line, 1)
        fn._w(0x04, 2, 0x7)
        self.cfg_write(fn, 0x04, 0x7, 2)

    def walk_caps(self, fn: Function) -> None:
        """What a driver does to find its structures: the capability list, byte by byte."""
        self.cfg_read(fn, 0x06, 2)
        ptr = self.cfg_read(fn, 0x34, 1)
        while ptr:
            cap_id = self.cfg_read(fn, ptr, 1)
            nxt = self.cfg_read(fn, ptr + 1, 1)
            if cap_id == 0x09:
                self.cfg_read(fn, ptr + 2, 1)
                self.cfg_read(fn, ptr + 3, 1)
                self.cfg_read(fn, ptr + 4, 1)
                self.cfg_read(fn, ptr + 8, 4)
                self.cfg_read(fn, ptr + 12, 4)
                if fn.read(ptr + 3, 1) == 2:
                    self.cfg_read(fn, ptr + 16, 4)
            elif cap_id == 0x11:
                self.cfg_read(fn, ptr + 2, 2)
                self.cfg_read(fn, ptr + 4, 4)
                self.cfg_read(fn, ptr + 8, 4)
            ptr = nxt

    def msix_entry(self, fn: Function, entry: int, vector: int, dest: int = 0,
                   masked: bool = False) -> None:
        base = fn.bar1 + 16 * entry
        self._ev(E.Space.MMIO, E.Op.WRITE, base, 4, 0xFEE00000 | dest << 12)
        self._ev(E.Space.MMIO, E.Op.WRITE, base + 4, 4, 0)
        self._ev(E.Space.MMIO, E.Op.WRITE, base + 8, 4, vector)
        self._ev(E.Space.MMIO, E.Op.WRITE, base + 12, 4, 1 if masked else 0)

    def msix_enable(self, fn: Function, on: bool = True, masked: bool = False) -> None:
        ctrl = fn.read(fn.msix_cap + 2, 2) & 0x7FF | (0x8000 if on else 0) | \
            (0x4000 if masked else 0)
        fn._w(fn.msix_cap + 2, 2, ctrl)
        self.cfg_write(fn, fn.msix_cap + 2, ctrl, 2)

    def msix_config(self, fn: Function, entry: int) -> None:
        if fn.transitional:
            self._ev(E.Space.PIO, E.Op.WRITE, fn.io_bar + 20, 2, entry)
        else:
            self._ev(E.Space.MMIO, E.Op.WRITE, fn.common + 0x10, 2, entry)

    def queue_vector(self, fn: Function, queue: int, entry: int) -> None:
        if fn.transitional:
            self._ev(E.Space.PIO, E.Op.WRITE, fn.io_bar + 14, 2, queue)
            self._ev(E.Space.PIO, E.Op.WRITE, fn.io_bar + 22, 2, entry)
        else:
            self._ev(E.Space.MMIO, E.Op.WRITE, fn.common + 0x16, 2, queue)
            self._ev(E.Space.MMIO, E.Op.WRITE, fn.common + 0x1A, 2, entry)

    def program(self, fn: Function, config_vector: int | None, queue_vector: int | None = None,
                dest: int = 0) -> None:
        """Enumerate, find the structures, and (with MSI-X) program entry 0 for config changes
        and entry 1 for queue 0, as Linux's virtio_pci does."""
        self.enumerate(fn)
        self.walk_caps(fn)
        if fn.msix_vectors and config_vector is not None:
            self.msix_enable(fn, masked=True)
            self.msix_entry(fn, 0, config_vector, dest)
            if queue_vector is not None:
                self.msix_entry(fn, 1, queue_vector, dest)
            self.msix_enable(fn)
            self.msix_config(fn, 0)
            if queue_vector is not None:
                self.queue_vector(fn, 0, 1)
