"""The PCI model and watch plan against PCI Local Bus 3.0 and virtio 1.x 4.1.

PCI 3.0 6.1 (type 0 header: ids at 0x00/0x02, command 0x04 with I/O space bit 0 and memory
space bit 1, status 0x06 with Capabilities List bit 4, BARs 0x10-0x24, subsystem id 0x2E,
capabilities pointer 0x34 whose two low bits are reserved, interrupt line 0x3C where 0xFF means
"unknown / not connected"), 6.2.5.1 (BAR sizing: write all ones, read the mask back; bit 0 I/O,
bits 2:1 type where 10b is 64-bit and the next BAR holds the high dword; the low bits are
read-only), 6.8.2 (MSI-X: message control bit 15 enable, bit 14 function mask, bits 10:0 table
size - 1; table offset / BIR at +4; 16-byte entries: address +0, data +8, vector control +12
with bit 0 masked), the x86 MSI address format (0xFEE, destination id bits 19:12, bit 2
logical destination mode; data bits 7:0 vector); virtio 4.1.2 (vendor 0x1AF4, devices
0x1000-0x107F, transitional ones typed by the subsystem id), 4.1.4 (virtio_pci_cap: cfg_type
+3, bar +4, offset +8, length +12; notify_off_multiplier +16). Device side: tests/unit/pciguest.py
(written from the same specs).
"""
from __future__ import annotations

import pytest

from agent.correlate.pcimodel import (
    MAX_MSIX_ENTRIES, MAX_QUEUES, Bar, MsixEntry, PciFunction, PciModel, Region, VirtioPci,
    bdf_name,
)
from agent.correlate.layout import Layout
from agent.correlate.pciwatch import layout_of, needs_watch, watch_plan
from agent.events import Register, Space, pcicfg_addr
from agent.model import Transport
from pciguest import Function

BDF = 3 << 3            # 00:03.0


def addr(bdf: int, off: int) -> int:
    return pcicfg_addr(bdf >> 8, (bdf >> 3) & 31, bdf & 7, off)


class Firmware:
    """Drives a PciModel with the configuration accesses a BIOS and a driver make."""

    def __init__(self, model: PciModel | None = None) -> None:
        self.m = model or PciModel()

    def read(self, fn: Function, off: int, size: int = 4):
        return self.m.config_access(addr(fn.bdf, off), False, size, fn.read(off, size))

    def write(self, fn: Function, off: int, value: int, size: int = 4):
        return self.m.config_access(addr(fn.bdf, off), True, size, value)

    def enumerate(self, fn: Function) -> None:
        self.read(fn, 0x00)
        self.read(fn, 0x08)
        self.read(fn, 0x2C)
        for off in range(0x10, 0x28, 4):
            size = fn.sizes.get(off, 0)
            io = off == 0x10 and fn.transitional
            self.read(fn, off)
            self.write(fn, off, 0xFFFFFFFF)
            mask = 0 if not size else (~(size - 1) & 0xFFFFFFFF) | (1 if io else 0) | \
                (0x4 if off == 0x20 else 0)
            fn._w(off, 4, mask)
            self.read(fn, off)
            base = {0x10: fn.io_bar | 1, 0x14: fn.bar1, 0x20: fn.bar4 | 0x4}.get(off, 0) \
                if size else 0
            fn._w(off, 4, base)
            self.write(fn, off, base)
        fn._w(0x3C, 1, fn.line)
        self.write(fn, 0x3C, fn.line, 1)
        fn._w(0x04, 2, 0x7)
        self.write(fn, 0x04, 0x7, 2)

    def walk(self, fn: Function) -> None:
        self.read(fn, 0x06, 2)
        ptr = fn.read(0x34, 1)
        self.read(fn, 0x34, 1)
        while ptr:
            self.read(fn, ptr, 1)
            self.read(fn, ptr + 1, 1)
            if fn.read(ptr, 1) == 0x09:
                for o, s in ((3, 1), (4, 1), (8, 4), (12, 4)):
                    self.read(fn, ptr + o, s)
                if fn.read(ptr + 3, 1) == 2:
                    self.read(fn, ptr + 16, 4)
            elif fn.read(ptr, 1) == 0x11:
                self.read(fn, ptr + 2, 2)
                self.read(fn, ptr + 4, 4)
            ptr = fn.read(ptr + 1, 1)

    def msix_enable(self, fn: Function, on: bool = True, masked: bool = False) -> None:
        ctrl = fn.read(fn.msix_cap + 2, 2) & 0x7FF | (0x8000 if on else 0) | \
            (0x4000 if masked else 0)
        fn._w(fn.msix_cap + 2, 2, ctrl)
        self.write(fn, fn.msix_cap + 2, ctrl, 2)


def programmed(fn: Function | None = None) -> tuple[Firmware, Function]:
    fw = Firmware()
    fn = fn or Function(BDF)
    fw.enumerate(fn)
    fw.walk(fn)
    return fw, fn


# -- identity (PCI 6.2.1, virtio 4.1.2) -----------------------------------------------------

def test_a_modern_function_is_typed_by_its_device_id_and_found_at_its_structures():
    fw, fn = programmed(Function(BDF, type="blk"))
    v = fw.m.virtio(BDF)
    assert v.type == "blk" and v.name == "pci-0000:00:03.0" and v.bdf == BDF
    # 4.1.4: cap bar 4 (64-bit at fn.bar4), common +0 len 0x1000, ISR +0x1000, notify +0x3000
    assert v.common == Region(Space.MMIO, fn.bar4, 0x1000)
    assert v.isr == Region(Space.MMIO, fn.bar4 + 0x1000, 0x1000)
    assert v.notify == Region(Space.MMIO, fn.bar4 + 0x3000, 0x1000)
    assert v.notify_multiplier == 4
    assert v.legacy_io is None
    # MSI-X table at BAR1 offset 0, 2 entries of 16 bytes
    assert v.msix_table == Region(Space.MMIO, fn.bar1, 32)
    assert v.msix_enabled is False            # not enabled yet
    assert v.interrupt_line == fn.line
    assert fw.m.memory_bars(BDF) == ((fn.bar1, 0x1000), (fn.bar4, 0x4000))


def test_a_transitional_function_is_typed_by_its_subsystem_id_with_its_io_bar():
    fw, fn = programmed(Function(BDF, type="net", transitional=True))
    v = fw.m.virtio(BDF)
    assert v.type == "net" and v.legacy_io == fn.io_bar
    f = fw.m.function(BDF)
    assert f.transitional and f.is_virtio and f.device_id == 0x1000
    assert f.bar(0) == Bar(0, True, fn.io_bar, 0x40)
    # it has modern structures too: it is known by its common configuration
    assert layout_of(v) == Layout(Transport.PCI_MODERN, Space.MMIO, fn.bar4)


def test_a_transitional_device_with_an_unknown_subsystem_falls_back_to_its_device_id():
    f = PciFunction(BDF)
    f.read(0, 4, 0x1000 << 16 | 0x1AF4)          # transitional net
    f.read(0x2C, 4, 0x0000 << 16 | 0x1AF4)       # subsystem id 0: no device type
    assert f.virtio_type == "net"
    f.read(0x2C, 4, 0x0004 << 16 | 0x1AF4)       # subsystem says rng: it wins (4.1.2.1)
    assert f.virtio_type == "rng"


@pytest.mark.parametrize("vendor, device, virtio", [
    (0x1AF4, 0x1000, True), (0x1AF4, 0x107F, True), (0x1AF4, 0x0FFF, False),
    (0x1AF4, 0x1080, False), (0x8086, 0x1041, False), (0x1AF4, 0x1110, False)])
def test_virtio_is_vendor_0x1af4_with_a_device_id_from_0x1000_to_0x107f(vendor, device, virtio):
    m = PciModel()
    m.config_access(addr(BDF, 0), False, 4, device << 16 | vendor)
    assert m.function(BDF).is_virtio is virtio
    assert (m.virtio(BDF) is not None) is virtio


def test_an_all_ones_vendor_read_is_an_empty_slot_and_forgets_a_function_there():
    m = PciModel()
    assert m.config_access(addr(BDF, 0), False, 4, 0xFFFFFFFF) is None
    assert m.function(BDF) is None
    assert m.config_access(addr(BDF, 0), False, 4, 0x1041 << 16 | 0x1AF4) == BDF
    # unplugged: the function goes, and its bdf is returned (what was derived from it goes too)
    assert m.config_access(addr(BDF, 0), False, 2, 0xFFFF) == BDF
    assert m.function(BDF) is None and m.virtio(BDF) is None
    # a device id read of 0xFFFF at +2 is not a vendor read: nothing there is created
    assert m.config_access(addr(BDF + 1, 2), False, 2, 0xFFFF) is None
    assert m.function(BDF + 1) is None


def test_a_function_exists_only_once_its_vendor_id_was_read():
    m = PciModel()
    assert m.config_access(addr(BDF, 8), False, 4, 0x00FF0001) is None
    assert m.config_access(addr(BDF, 4), True, 2, 0x7) is None
    assert m.function(BDF) is None


@pytest.mark.parametrize("off, size", [(0x100, 4), (0x1FF, 1), (0, 3), (0, 8)])
def test_accesses_past_the_standard_space_or_of_odd_sizes_are_ignored(off, size):
    m = PciModel()
    assert m.config_access(addr(BDF, off), False, size, 0x1041 << 16 | 0x1AF4) is None
    assert m.function(BDF) is None


def test_reads_of_every_size_assemble_the_identity():
    m = PciModel()
    m.config_access(addr(BDF, 0), False, 1, 0xF4)
    m.config_access(addr(BDF, 1), False, 1, 0x1A)
    m.config_access(addr(BDF, 2), False, 2, 0x1044)
    f = m.function(BDF)
    assert (f.vendor, f.device_id, f.virtio_type) == (0x1AF4, 0x1044, "rng")


def test_the_guest_cannot_forge_read_only_ids_by_writing_them():
    fw, fn = programmed()
    fw.write(fn, 0x00, 0x1041 << 16 | 0x1AF4)
    fw.write(fn, 0x2C, 0x0001 << 16 | 0x1AF4)
    f = fw.m.function(BDF)
    assert f.device_id == 0x1044 and fw.m.virtio(BDF).type == "rng"


def test_an_unknown_identity_is_unknown():
    f = PciFunction(BDF)
    assert f.virtio_type == "unknown" and not f.is_virtio and not f.transitional


@pytest.mark.parametrize("bdf, name", [(0, "0000:00:00.0"), (BDF, "0000:00:03.0"),
                                       (1 << 8 | 31 << 3 | 7, "0000:01:1f.7"),
                                       (0xFF << 8 | 0x10 << 3 | 2, "0000:ff:10.2")])
def test_bdf_names_are_lspci_numbering(bdf, name):
    assert bdf_name(bdf) == name


# -- command, interrupt line (PCI 6.2.2, 6.2.4) ---------------------------------------------

def test_command_bits_decode_io_and_memory_space():
    f = PciFunction(BDF)
    assert not f.memory_enabled and not f.io_enabled          # not known
    f.write(0x04, 2, 0x2)
    assert f.memory_enabled and not f.io_enabled
    f.write(0x04, 2, 0x1)
    assert f.io_enabled and not f.memory_enabled
    f.write(0x04, 1, 0x3)
    assert f.io_enabled and f.memory_enabled


@pytest.mark.parametrize("line, known", [(11, 11), (1, 1), (0xFE, 0xFE), (0xFF, None), (0, None)])
def test_interrupt_line_0xff_is_no_connection(line, known):
    f = PciFunction(BDF)
    f.write(0x3C, 1, line)
    assert f.interrupt_line == known


def test_the_interrupt_pin_next_to_the_line_is_read_only():
    f = PciFunction(BDF)
    f.write(0x3C, 2, 0x0305)                     # line 5, pin 3 (read-only)
    assert f.interrupt_line == 5 and f._get(0x3D, 1) is None


# -- BARs (PCI 6.2.5.1) ------------------------------------------------------------------

def size_bar(f: PciFunction, off: int, mask: int, base: int) -> None:
    f.write(off, 4, 0xFFFFFFFF)
    f.read(off, 4, mask)
    f.write(off, 4, base)


def test_a_32_bit_memory_bar_sizes_from_its_mask_and_keeps_its_type_bits():
    f = PciFunction(BDF)
    size_bar(f, 0x14, 0xFFFFF008, 0xFEB80000)     # 4 KiB, prefetchable
    b = f.bar(1)
    assert b == Bar(1, False, 0xFEB80000, 0x1000)
    assert f._get(0x14, 4) == 0xFEB80008           # the read-only low bits stay


def test_a_64_bit_memory_bar_takes_its_high_dword_from_the_next_bar():
    f = PciFunction(BDF)
    size_bar(f, 0x20, 0xFFFFC004, 0xFE000000)
    assert f.bar(4) is None                        # high dword not seen yet
    f.write(0x24, 4, 0x1)
    assert f.bar(4) == Bar(4, False, 0x1_FE000000, 0x4000)


def test_an_io_bar_sizes_in_the_16_bit_port_space():
    f = PciFunction(BDF)
    size_bar(f, 0x10, 0xFFFFFFC1, 0xC040)          # 64 ports; written without bit 0
    assert f.bar(0) == Bar(0, True, 0xC040, 0x40)
    assert f._get(0x10, 4) & 1 == 1


def test_a_bar_read_without_sizing_has_no_size_and_an_unassigned_bar_is_none():
    f = PciFunction(BDF)
    f.read(0x18, 4, 0xFE000000)
    assert f.bar(2) == Bar(2, False, 0xFE000000, None)
    f.read(0x1C, 4, 0)
    assert f.bar(3) is None
    f.read(0x10, 4, 0x1)                           # I/O BAR at port 0: unassigned
    assert f.bar(0) is None
    assert f.bar(5) is None and f.bar(6) is None and f.bar(-1) is None


def test_a_bar_write_not_preceded_by_sizing_keeps_the_type_of_what_was_read():
    f = PciFunction(BDF)
    f.read(0x10, 4, 0xC001)
    f.write(0x10, 4, 0xD000)                       # a driver moving its I/O BAR
    assert f.bar(0) == Bar(0, True, 0xD000, None)


def test_a_partial_bar_write_or_a_non_dword_mask_read_is_no_sizing():
    f = PciFunction(BDF)
    f.write(0x14, 4, 0xFFFFFFFF)
    f.read(0x14, 2, 0xF000)                        # not the whole mask
    assert f.bar_masks == {}
    f.write(0x14, 2, 0xFFFF)                       # not an all-ones dword: an address
    assert f._get(0x14, 2) == 0xFFFF


def test_reprogramming_a_bar_moves_the_virtio_structures():
    fw, fn = programmed()
    before = fw.m.virtio(BDF).common
    fn.bar4 = 0xFD000000
    fn._w(0x20, 4, fn.bar4 | 0x4)
    fw.write(fn, 0x20, fn.bar4 | 0x4)
    after = fw.m.virtio(BDF).common
    assert before.addr == 0xFE000000 and after.addr == 0xFD000000


# -- capabilities (PCI 6.7, virtio 4.1.4) ---------------------------------------------------

def cap_function(status: int = 0x10, ptr: int = 0x40) -> PciFunction:
    f = PciFunction(BDF)
    f.read(0x06, 2, status)
    f.read(0x34, 1, ptr)
    return f


def test_no_capabilities_without_the_status_bit():
    f = cap_function(status=0)
    f.read(0x40, 2, 0x0011)
    assert f.capabilities() == [] and f.msix_cap() is None
    assert f.msix_enabled is False


def test_the_walk_follows_next_pointers_and_masks_their_reserved_low_bits():
    f = cap_function(ptr=0x43)                     # low bits reserved: 0x40
    f.read(0x40, 1, 0x09)
    f.read(0x41, 1, 0x52)                          # next 0x50 with reserved bits set
    f.read(0x50, 1, 0x11)
    f.read(0x51, 1, 0x00)
    assert f.capabilities() == [(0x40, 0x09), (0x50, 0x11)]
    assert f.msix_cap() == 0x50


def test_the_walk_stops_at_a_loop_a_pointer_into_the_header_or_an_unread_link():
    f = cap_function()
    f.read(0x40, 1, 0x09)
    f.read(0x41, 1, 0x40)                          # points to itself
    assert f.capabilities() == [(0x40, 0x09)]
    g = cap_function()
    g.read(0x3C, 1, 11)                            # the interrupt line, known
    g.read(0x40, 1, 0x09)
    g.read(0x41, 1, 0x3C)                          # into the header: invalid
    assert g.capabilities() == [(0x40, 0x09)]
    h = cap_function()
    h.read(0x40, 1, 0x09)                          # next pointer never read
    assert h.capabilities() == [(0x40, 0x09)]
    k = cap_function()
    assert k.capabilities() == []                  # the capability's id never read


def vendor_cap(f: PciFunction, at: int, cfg_type: int, bar: int, off: int,
               length: int | None, nxt: int = 0) -> None:
    f.read(at, 1, 0x09)
    f.read(at + 1, 1, nxt)
    f.read(at + 3, 1, cfg_type)
    f.read(at + 4, 1, bar)
    f.read(at + 8, 4, off)
    if length is not None:
        f.read(at + 12, 4, length)


def test_the_first_virtio_capability_of_a_type_wins():
    f = cap_function()
    vendor_cap(f, 0x40, 1, 4, 0x0, 0x38, nxt=0x54)
    vendor_cap(f, 0x54, 1, 4, 0x2000, 0x38)
    assert f.virtio_cap(1) == (0x40, 4, 0x0, 0x38)
    assert f.virtio_cap(3) is None


def test_a_virtio_capability_whose_bar_or_offset_was_not_read_is_unknown():
    f = cap_function()
    f.read(0x40, 1, 0x09)
    f.read(0x41, 1, 0)
    f.read(0x43, 1, 1)
    assert f.virtio_cap(1) is None


def test_a_structure_whose_length_the_driver_did_not_read_takes_the_spec_size():
    f = cap_function()
    vendor_cap(f, 0x40, 1, 4, 0x100, None, nxt=0x54)       # common: 0x38 (4.1.4.3)
    vendor_cap(f, 0x54, 3, 4, 0x1000, None, nxt=0x68)      # ISR: 1 byte (4.1.4.5)
    vendor_cap(f, 0x68, 2, 4, 0x3000, None)                # notify: up to the BAR end, a page
    size_bar(f, 0x20, 0xFFFFC004, 0xFE000000)
    f.write(0x24, 4, 0)
    assert f.region(1) == Region(Space.MMIO, 0xFE000100, 0x38)
    assert f.region(3) == Region(Space.MMIO, 0xFE001000, 1)
    assert f.region(2) == Region(Space.MMIO, 0xFE003000, 0x1000)


def test_a_notify_structure_without_a_read_length_ends_at_the_bar_end_or_a_page():
    f = cap_function()
    vendor_cap(f, 0x40, 2, 1, 0x3F00, None)
    size_bar(f, 0x14, 0xFFFFC000, 0xFEB80000)              # 16 KiB BAR
    assert f.region(2) == Region(Space.MMIO, 0xFEB83F00, 0x100)
    g = cap_function()
    vendor_cap(g, 0x40, 2, 1, 0x4000, None)                # at or past the end: 4 bytes
    size_bar(g, 0x14, 0xFFFFC000, 0xFEB80000)
    assert g.region(2) == Region(Space.MMIO, 0xFEB84000, 4)
    h = cap_function()
    vendor_cap(h, 0x40, 2, 1, 0, None)                     # BAR size unknown: 4 bytes
    h.read(0x14, 4, 0xFEB80000)
    assert h.region(2) == Region(Space.MMIO, 0xFEB80000, 4)


def test_a_structure_in_an_io_bar_is_in_port_space_and_one_in_an_unknown_bar_is_none():
    f = cap_function()
    vendor_cap(f, 0x40, 1, 0, 0x0, 0x38, nxt=0x54)
    vendor_cap(f, 0x54, 3, 5, 0x0, 1)
    f.read(0x10, 4, 0xC041)
    assert f.region(1) == Region(Space.PIO, 0xC040, 0x38)
    assert f.region(3) is None


def test_the_notify_multiplier_is_read_at_cap_plus_16():
    f = cap_function()
    vendor_cap(f, 0x40, 2, 4, 0x3000, 0x1000)
    assert f.notify_multiplier is None
    f.read(0x50, 4, 4)
    assert f.notify_multiplier == 4
    assert cap_function().notify_multiplier is None


def test_region_contains_is_half_open_and_space_bound():
    r = Region(Space.MMIO, 0x1000, 0x10)
    assert r.contains(Space.MMIO, 0x1000) and r.contains(Space.MMIO, 0x100F)
    assert not r.contains(Space.MMIO, 0x1010) and not r.contains(Space.MMIO, 0xFFF)
    assert not r.contains(Space.PIO, 0x1000)


# -- MSI-X (PCI 6.8.2) --------------------------------------------------------------------

def msix_function(table: int = 0x0 | 1, ctrl: int = 0x0001) -> PciFunction:
    f = cap_function()
    f.read(0x40, 1, 0x11)
    f.read(0x41, 1, 0)
    f.read(0x42, 2, ctrl)
    f.read(0x44, 4, table)
    size_bar(f, 0x14, 0xFFFFF000, 0xFEB80000)
    return f


def test_the_table_is_where_its_bir_and_offset_say_with_its_size():
    f = msix_function(table=0x800 | 1, ctrl=0x0003)            # BAR1 +0x800, 4 entries
    assert f.msix_table() == Region(Space.MMIO, 0xFEB80800, 64)
    g = msix_function(ctrl=0x07FF)                             # 2048 entries: up to a bound
    assert g.msix_table() == Region(Space.MMIO, 0xFEB80000, 16 * MAX_MSIX_ENTRIES)


def test_a_table_in_an_io_or_unknown_bar_is_none():
    f = msix_function(table=0x0 | 0)                           # BIR 0, I/O BAR
    f.read(0x10, 4, 0xC001)
    assert f.msix_table() is None
    g = msix_function(table=0x0 | 2)                           # BIR 2, never read
    assert g.msix_table() is None


@pytest.mark.parametrize("ctrl, enabled", [(0x0001, False), (0x8001, True), (0xC001, False),
                                           (0x4001, False)])
def test_msix_is_enabled_with_bit_15_unless_function_masked_by_bit_14(ctrl, enabled):
    assert msix_function(ctrl=ctrl).msix_enabled is enabled


def test_msix_control_is_writable_and_unknown_until_read():
    f = cap_function()
    f.read(0x40, 1, 0x11)
    f.read(0x41, 1, 0)
    assert f.msix_enabled is None                  # the capability is there, its state unknown
    m = PciModel()
    m.config_access(addr(BDF, 0), False, 4, 0x1041 << 16 | 0x1AF4)
    for off, size, value in ((0x06, 2, 0x10), (0x34, 1, 0x40), (0x40, 1, 0x11), (0x41, 1, 0),
                             (0x42, 2, 0x0001)):
        m.config_access(addr(BDF, off), False, size, value)
    m.config_access(addr(BDF, 0x42), True, 2, 0x8001)
    assert m.function(BDF).msix_enabled is True


def test_an_entry_needs_address_data_and_an_unmasked_control_to_give_a_vector():
    e = MsixEntry()
    assert e.vector() is None
    e.address, e.data = 0xFEE00000 | 2 << 12, 0x4031
    assert e.vector() is None                      # mask state never seen
    e.masked = True
    assert e.vector() is None
    e.masked = False
    assert e.vector() == (2, 0x31)                 # data bits 7:0, destination bits 19:12
    e.address = 0xFEE00000 | 2 << 12 | 0x4         # logical destination mode: any CPU
    assert e.vector() == (None, 0x31)
    e.address = 0xFED00000                         # not the local APICs
    assert e.vector() is None


def test_table_accesses_fill_entries_by_dword():
    f = msix_function(ctrl=0x8001)
    f.msix_access(16 * 1 + 0, 0xFEE01000, 4)
    f.msix_access(16 * 1 + 4, 0, 4)                # upper address: ignored
    f.msix_access(16 * 1 + 8, 0x51, 4)
    f.msix_access(16 * 1 + 12, 0, 4)
    assert f.vector_of(1) == (1, 0x51)
    f.msix_access(16 * 1 + 12, 1, 4)               # masked again
    assert f.vector_of(1) is None
    f.msix_access(16 * 1 + 8, 0x61, 2)             # not a dword: not taken
    assert f.msix[1].data == 0x51
    f.msix_access(16 * MAX_MSIX_ENTRIES, 0xFEE00000, 4)
    assert MAX_MSIX_ENTRIES not in f.msix


def test_no_vector_without_msix_enabled_for_no_vector_or_an_unknown_entry():
    f = msix_function(ctrl=0x0001)
    for word, value in ((0, 0xFEE00000), (8, 0x31), (12, 0)):
        f.msix_access(word, value, 4)
    assert f.vector_of(0) is None                  # MSI-X disabled
    g = msix_function(ctrl=0x8001)
    for word, value in ((0, 0xFEE00000), (8, 0x31), (12, 0)):
        g.msix_access(word, value, 4)
    assert g.vector_of(0) == (0, 0x31)
    assert g.vector_of(0xFFFF) is None             # VIRTIO_MSI_NO_VECTOR
    assert g.vector_of(None) is None and g.vector_of(1) is None


def test_queue_vectors_follow_queue_select_and_are_bounded():
    f = PciFunction(BDF)
    f.set_queue_vector(1)
    assert f.queue_vectors == {}                   # no queue selected yet
    for q in range(MAX_QUEUES + 5):
        f.queue_select = q
        f.set_queue_vector(q + 1)
    assert len(f.queue_vectors) == MAX_QUEUES
    f.queue_select = 0
    f.set_queue_vector(0xFFFF)                     # a followed queue can still change
    assert f.queue_vectors[0] == 0xFFFF


# -- bounds ----------------------------------------------------------------------------------

def test_functions_are_bounded_least_recently_touched_first_out():
    m = PciModel(max_functions=2)
    for bdf in (8, 16):
        m.config_access(addr(bdf, 0), False, 4, 0x1044 << 16 | 0x1AF4)
    m.config_access(addr(8, 8), False, 4, 1)       # touch 8: 16 is the oldest
    m.config_access(addr(24, 0), False, 4, 0x1044 << 16 | 0x1AF4)
    assert list(m.functions) == [8, 24] and m.evicted == 1
    assert m.virtio(16) is None and m.memory_bars(16) == ()


def test_the_derived_view_changes_when_the_configuration_does():
    fw, fn = programmed()
    v1 = fw.m.virtio(BDF)
    assert fw.m.virtio(BDF) is v1                  # unchanged: the same view
    fw.msix_enable(fn)
    v2 = fw.m.virtio(BDF)
    assert v2.msix_enabled is True and v1.msix_enabled is False


# -- q35 ECAM window (ICH9 MCH PCIEXBAR at 00:00.0 +0x60) -------------------------------------

def mch() -> PciModel:
    m = PciModel()
    m.config_access(addr(0, 0), False, 4, 0x29C0 << 16 | 0x8086)
    return m


@pytest.mark.parametrize("length_bits, size", [(0, 256 << 20), (1, 128 << 20), (2, 64 << 20)])
def test_pciexbar_opens_the_ecam_window_of_its_length(length_bits, size):
    m = mch()
    m.config_access(addr(0, 0x64), True, 4, 0)
    m.config_access(addr(0, 0x60), True, 4, 0xB0000000 | length_bits << 1 | 1)
    assert m.ecam == (0xB0000000, size)


def test_pciexbar_disabled_or_with_a_reserved_length_closes_the_window():
    m = mch()
    m.config_access(addr(0, 0x60), True, 4, 0xB0000001)
    assert m.ecam == (0xB0000000, 256 << 20)
    m.config_access(addr(0, 0x60), True, 4, 0xB0000000)
    assert m.ecam is None
    m.config_access(addr(0, 0x60), True, 4, 0xB0000000 | 3 << 1 | 1)
    assert m.ecam is None


def test_pciexbar_high_dword_and_base_alignment():
    m = mch()
    m.config_access(addr(0, 0x64), True, 4, 0x1)
    m.config_access(addr(0, 0x60), True, 4, 0xB4000000 | 1)   # 256 MiB: bits 27:0 ignored
    assert m.ecam == (0x1_B0000000, 256 << 20)


def test_pciexbar_of_another_host_bridge_is_not_an_ecam_window():
    m = PciModel()
    m.config_access(addr(0, 0), False, 4, 0x1237 << 16 | 0x8086)   # i440FX
    m.config_access(addr(0, 0x60), True, 4, 0xB0000001)
    assert m.ecam is None
    other = PciModel()
    other.config_access(addr(8, 0), False, 4, 0x29C0 << 16 | 0x8086)
    other.config_access(addr(8, 0x60), True, 4, 0xB0000001)
    assert other.ecam is None


# -- the watch plan (virtio 4.1.4, 4.1.4.4, 4.1.4.8) ------------------------------------------

def test_a_modern_device_is_watched_at_its_common_isr_notify_and_msix_registers():
    fw, fn = programmed()
    v = fw.m.virtio(BDF)
    plan = watch_plan(v)
    c = fn.common
    assert plan[(Space.MMIO, c + 0x14)] == Register.STATUS
    assert plan[(Space.MMIO, c + 0x15)] == Register.CONFIG_GENERATION
    assert plan[(Space.MMIO, c + 0x10)] == Register.MSIX_CONFIG
    assert plan[(Space.MMIO, c + 0x16)] == Register.QUEUE_SELECT
    assert plan[(Space.MMIO, c + 0x1A)] == Register.QUEUE_MSIX_VECTOR
    assert plan[(Space.MMIO, fn.isr)] == Register.ISR
    # 4.1.4.4: queue notify address = notify cap offset + queue_notify_off * multiplier (4)
    notify = sorted(a for (s, a), r in plan.items() if r == Register.QUEUE_NOTIFY)
    assert notify == [fn.notify + 4 * q for q in range(8)]
    table = sorted(a for (s, a), r in plan.items() if r == Register.MSIX_TABLE)
    assert table == [fn.bar1 + 16 * i + w for i in range(2) for w in (0, 8, 12)]
    assert len(plan) == 5 + 1 + 8 + 6
    assert layout_of(v).base == c and layout_of(v).transport == Transport.PCI_MODERN


def test_a_transitional_device_is_also_watched_through_its_legacy_io_registers():
    fw, fn = programmed(Function(BDF, type="net", transitional=True))
    plan = watch_plan(fw.m.virtio(BDF))
    b = fn.io_bar
    assert {k: plan[k] for k in plan if k[0] == Space.PIO} == {
        (Space.PIO, b + 18): Register.STATUS, (Space.PIO, b + 19): Register.ISR,
        (Space.PIO, b + 20): Register.MSIX_CONFIG, (Space.PIO, b + 14): Register.QUEUE_SELECT,
        (Space.PIO, b + 22): Register.QUEUE_MSIX_VECTOR, (Space.PIO, b + 16): Register.QUEUE_NOTIFY}


def virtio_view(**kw) -> VirtioPci:
    base = dict(bdf=BDF, type="rng", common=None, isr=None, notify=None, notify_multiplier=None,
                legacy_io=None, msix_table=None, msix_enabled=None, interrupt_line=None)
    base.update(kw)
    return VirtioPci(**base)


def test_a_notify_multiplier_of_0_is_one_address_for_every_queue():
    plan = watch_plan(virtio_view(notify=Region(Space.MMIO, 0xFE003000, 0x1000),
                                  notify_multiplier=0))
    assert list(plan.items()) == [((Space.MMIO, 0xFE003000), Register.QUEUE_NOTIFY)]
    assert watch_plan(virtio_view(notify=Region(Space.MMIO, 0xFE003000, 0x1000))) == plan


def test_notify_addresses_stop_at_the_structure_end():
    plan = watch_plan(virtio_view(notify=Region(Space.MMIO, 0xFE003000, 12), notify_multiplier=4))
    assert sorted(a for (_, a) in plan) == [0xFE003000, 0xFE003004, 0xFE003008]
    small = watch_plan(virtio_view(notify=Region(Space.MMIO, 0xFE003000, 2), notify_multiplier=4))
    assert list(small) == [(Space.MMIO, 0xFE003000)]


def test_msix_table_watches_are_bounded_and_not_asked_of_capture():
    plan = watch_plan(virtio_view(msix_table=Region(Space.MMIO, 0xFEB80000, 16 * 64)))
    assert len(plan) == 16 * 3
    assert all(not needs_watch(r) for r in plan.values())
    assert all(needs_watch(r) for r in (Register.STATUS, Register.ISR, Register.QUEUE_NOTIFY,
                                        Register.MSIX_CONFIG, Register.UNKNOWN))


def test_a_device_with_neither_common_cfg_nor_legacy_bar_has_no_status_layout():
    assert layout_of(virtio_view()) is None
    assert watch_plan(virtio_view()) == {}
    lay = layout_of(virtio_view(legacy_io=0xC040))
    assert (lay.transport, lay.space, lay.base) == (Transport.PCI_LEGACY, Space.PIO, 0xC040)
    lay = layout_of(virtio_view(common=Region(Space.PIO, 0xC100, 0x38), legacy_io=0xC040))
    assert (lay.transport, lay.space, lay.base) == (Transport.PCI_MODERN, Space.PIO, 0xC100)


# -- more of the same rules, at their edges ----------------------------------------------------

@pytest.mark.parametrize("address, dest", [(0xFEE01001, 1), (0xFEE01002, 1), (0xFEE01008, 1),
                                           (0xFEE0100C, None)])
def test_msi_address_bits_1_0_and_3_do_not_change_the_target(address, dest):
    # x86 MSI address: bits 1:0 don't care, bit 3 redirection hint, bit 2 destination mode
    assert MsixEntry(address, 0x31, False).vector() == (dest, 0x31)


@pytest.mark.parametrize("address, data", [(0xFEE00000, None), (None, 0x31)])
def test_an_entry_with_its_address_or_data_unknown_gives_no_vector(address, data):
    assert MsixEntry(address, data, False).vector() is None


def bar_fn() -> PciFunction:
    return PciFunction(BDF)


def test_linux_sizing_of_both_halves_of_a_64_bit_bar_keeps_the_high_dword_an_address():
    # PCI 6.2.5.1: the upper dword of a 64-bit BAR is all address bits: its mask reads
    # 0xFFFFFFFF, which is no I/O-space indicator
    f = bar_fn()
    f.read(0x20, 4, 0xFE00000C)
    f.read(0x24, 4, 0x1)
    size_bar(f, 0x20, 0xFFFFC00C, 0xFE00000C)
    size_bar(f, 0x24, 0xFFFFFFFF, 0x1)
    assert f.bar(4) == Bar(4, False, 0x1_FE000000, 0x4000)


def test_the_high_dword_written_before_the_low_one_is_still_an_address():
    f = bar_fn()
    f.write(0x10, 4, 0xFFFFFFFF)
    f.read(0x10, 4, 0xFFFFC004)                    # 64-bit, 16 KiB; its value never read
    f.write(0x14, 4, 0xFFFFFFFF)
    f.read(0x14, 4, 0xFFFFFFFF)
    f.write(0x14, 4, 0x2)
    f.write(0x10, 4, 0xFE000000)
    assert f.bar(0) == Bar(0, False, 0x2_FE000000, 0x4000)


def test_a_driver_moving_a_64_bit_bar_writes_its_high_dword_as_is():
    f = bar_fn()
    f.read(0x18, 4, 0xFE00000C)                    # no sizing seen (agent started late)
    f.read(0x1C, 4, 0x0)
    f.write(0x1C, 4, 0x1)
    assert f.bar(2) == Bar(2, False, 0x1_FE000000, None)


def test_only_the_high_half_sized_is_still_the_high_half():
    f = bar_fn()
    f.read(0x20, 4, 0xFE00000C)
    size_bar(f, 0x24, 0xFFFFFFFF, 0x4)
    assert f.bar(4) == Bar(4, False, 0x4_FE000000, None)


def test_a_64_bit_bar_after_two_32_bit_bars_and_two_64_bit_bars_in_a_row():
    f = bar_fn()
    size_bar(f, 0x10, 0xFFFFF000, 0xFEB80000)      # BAR0, BAR1: 32-bit
    size_bar(f, 0x14, 0xFFFFF008, 0xFEB81000)
    size_bar(f, 0x18, 0xFFFFC004, 0xFE000004)      # BAR2/3: 64-bit
    size_bar(f, 0x1C, 0xFFFFFFFF, 0x5)
    assert f.bar(2) == Bar(2, False, 0x5_FE000000, 0x4000)
    g = bar_fn()
    size_bar(g, 0x10, 0xFFFFC00C, 0xFE00000C)      # BAR0/1 and BAR2/3: 64-bit
    size_bar(g, 0x14, 0xFFFFFFFF, 0x1)
    size_bar(g, 0x18, 0xFFFFC004, 0xFD000004)
    size_bar(g, 0x1C, 0xFFFFFFFF, 0x2)
    assert g.bar(0) == Bar(0, False, 0x1_FE000000, 0x4000)
    assert g.bar(2) == Bar(2, False, 0x2_FD000000, 0x4000)


def test_a_32_bit_bar_after_a_64_bit_pair_keeps_its_read_only_bits():
    f = bar_fn()
    size_bar(f, 0x10, 0xFFFFC00C, 0xFE00000C)
    size_bar(f, 0x14, 0xFFFFFFFF, 0x0)
    size_bar(f, 0x18, 0xFFFFF008, 0xFEB80000)      # written without its prefetchable bit
    assert f._get(0x18, 4) == 0xFEB80008
    assert f.bar(2) == Bar(2, False, 0xFEB80000, 0x1000)


def test_an_io_bar_with_address_bit_2_set_is_no_64_bit_memory_bar():
    # I/O BAR: bit 0 set, bit 1 reserved, bits 31:2 address: 0xC005 is port 0xC004
    f = bar_fn()
    size_bar(f, 0x10, 0xFFFFFFFD, 0xC005)
    size_bar(f, 0x14, 0xFFFFF008, 0xFEB80000)
    assert f.bar(0) == Bar(0, True, 0xC004, 0x4)
    assert f._get(0x14, 4) == 0xFEB80008           # BAR1 is a BAR of its own


def test_the_cardbus_cis_pointer_after_the_bars_is_no_bar():
    f = bar_fn()
    f.read(0x28, 4, 0xFE000000)
    assert f.bar(6) is None


def test_a_notify_structure_without_a_read_length_is_at_most_a_page():
    f = cap_function()
    vendor_cap(f, 0x40, 2, 1, 0, None)
    size_bar(f, 0x14, 0xFFFFC000, 0xFEB80000)      # 16 KiB past the offset
    assert f.region(2) == Region(Space.MMIO, 0xFEB80000, 0x1000)


def recreate(m: PciModel, bdf: int, device_id: int) -> None:
    m.config_access(addr(bdf, 0), False, 4, device_id << 16 | 0x1AF4)


def test_an_evicted_function_found_again_is_derived_afresh():
    m = PciModel(max_functions=1)
    recreate(m, 8, 0x1044)
    assert m.virtio(8).type == "rng"
    recreate(m, 16, 0x1044)                        # evicts 8
    recreate(m, 8, 0x1041)                         # 8 is back, another device
    assert m.virtio(8).type == "net"
    assert m.evicted == 2
    assert m.function(8).bdf == 8


def test_an_unplugged_function_plugged_again_is_derived_afresh():
    m = PciModel()
    recreate(m, 8, 0x1044)
    assert m.virtio(8).type == "rng"
    m.config_access(addr(8, 0), False, 4, 0xFFFFFFFF)
    recreate(m, 8, 0x1041)
    assert m.virtio(8).type == "net"


def test_an_access_past_the_standard_space_of_a_known_function_touches_nothing():
    m = PciModel()
    recreate(m, 8, 0x1044)
    assert m.config_access(addr(8, 0x100), False, 4, 0x12345678) is None
    assert m.config_access(addr(8, 0x100), True, 4, 0x12345678) is None
    assert m.config_access(addr(8, 0xFF), False, 1, 0x12) == 8


def test_only_virtio_functions_have_memory_bars_to_watch():
    m = PciModel()
    m.config_access(addr(8, 0), False, 4, 0x100E << 16 | 0x8086)     # an e1000
    m.config_access(addr(8, 0x10), False, 4, 0xFEB00000)
    assert m.virtio(8) is None and m.memory_bars(8) == ()


def msix_model() -> tuple[PciModel, int]:
    m = PciModel()
    recreate(m, BDF, 0x1044)
    for off, size, value in ((0x06, 2, 0x10), (0x34, 1, 0x40), (0x40, 1, 0x11), (0x41, 1, 0),
                             (0x42, 2, 0x0001), (0x44, 4, 0x1), (0x14, 4, 0xFEB80000)):
        m.config_access(addr(BDF, off), False, size, value)
    return m, BDF


def test_msix_capability_id_next_pointer_and_table_offset_are_read_only():
    # PCI 6.8.2: only MSI-X Enable and Function Mask (message control bits 15:14) are writable
    m, bdf = msix_model()
    m.config_access(addr(bdf, 0x40), True, 2, 0x5005)          # id and next pointer
    m.config_access(addr(bdf, 0x44), True, 4, 0x803)           # table offset / BIR
    f = m.function(bdf)
    assert f.msix_cap() == 0x40 and f.capabilities() == [(0x40, 0x11)]
    assert f.msix_table() == Region(Space.MMIO, 0xFEB80000, 32)


def test_msix_table_size_is_read_only():
    m, bdf = msix_model()
    m.config_access(addr(bdf, 0x42), True, 2, 0x8007)          # enable, and a forged size
    f = m.function(bdf)
    assert f.msix_enabled is True
    assert f.msix_table() == Region(Space.MMIO, 0xFEB80000, 32)


def test_pciexbar_base_is_bits_35_to_28_whatever_the_reserved_high_bits():
    m = mch()
    m.config_access(addr(0, 0x64), True, 4, 0xF1)              # bits 39:36 reserved
    m.config_access(addr(0, 0x60), True, 4, 0xB0000001)
    assert m.ecam == (0x1_B0000000, 256 << 20)


def test_a_capability_at_the_end_of_the_space_reads_its_last_dword_and_nothing_past_it():
    # 0xFC..0xFF is the last dword of the 256-byte space; nothing is past 0xFF
    f = cap_function(ptr=0xF0)
    vendor_cap(f, 0xF0, 1, 0, 0x100, 0x40)          # length at 0xFC
    f.read(0x10, 4, 0xC001)
    assert f.region(1) == Region(Space.PIO, 0xC100, 0x40)
    g = cap_function(ptr=0xF4)
    vendor_cap(g, 0xF4, 1, 0, 0x100, None)          # its length would be at 0x100: unknown
    g.read(0x10, 4, 0xC001)
    assert g.virtio_cap(1) == (0xF4, 0, 0x100, None)
    assert g.region(1) == Region(Space.PIO, 0xC100, 0x38)


def test_an_access_running_past_the_end_keeps_the_space_256_bytes():
    m = PciModel()
    recreate(m, 8, 0x1044)
    m.config_access(addr(8, 0xFE), False, 4, 0x11223344)
    f = m.function(8)
    assert len(f.cfg) == 256 and len(f.known) == 256
    assert f._get(0xFE, 2) == 0x3344


def test_the_version_grows_with_every_change_and_only_then():
    f = PciFunction(BDF)
    versions = [f.version]
    f.read(0, 4, 0x1044 << 16 | 0x1AF4)
    versions.append(f.version)
    f.read(0, 4, 0x1044 << 16 | 0x1AF4)             # the same again: nothing changed
    assert f.version == versions[-1]
    size_bar(f, 0x10, 0xFFFFF000, 0xFEB80000)
    versions.append(f.version)
    size_bar(f, 0x10, 0xFFFFF000, 0xFEB80000)       # the same sizing again
    assert f.version == versions[-1]
    size_bar(f, 0x10, 0xFFFFE000, 0xFEB80000)       # another mask
    versions.append(f.version)
    f.write(0x04, 2, 0x2)
    versions.append(f.version)
    assert versions == sorted(set(versions))       # strictly growing: a cache key never repeats


def test_a_sizing_write_not_followed_by_its_mask_read_is_over_at_the_next_write():
    f = PciFunction(BDF)
    f.write(0x14, 4, 0xFFFFFFFF)
    f.write(0x14, 4, 0xFEB80000)
    f.read(0x14, 4, 0xFEB80000)                    # the address, not a mask
    assert f.bar(1) == Bar(1, False, 0xFEB80000, None)


def test_a_16_bit_write_of_a_bar_upper_half_is_taken_as_is():
    f = PciFunction(BDF)
    f.read(0x14, 4, 0xFEA00000)                    # 32-bit, not prefetchable: low bits 0
    f.write(0x16, 2, 0xFEB8)
    assert f.bar(1) == Bar(1, False, 0xFEB80000, None)


def test_only_the_host_bridge_at_00_00_0_has_the_pciexbar():
    # an MCH's ids at another address (a passed-through device, a forged one): no ECAM window,
    # whatever its register at 0x60 reads or is written
    m = PciModel()
    m.config_access(addr(8, 0), False, 4, 0x29C0 << 16 | 0x8086)
    m.config_access(addr(8, 0x60), False, 4, 0xB0000001)
    m.config_access(addr(8, 0x64), False, 4, 0)
    m.config_access(addr(8, 0x60), True, 4, 0xB0000001)
    m.config_access(addr(8, 0x04), True, 2, 0x6)
    assert m.ecam is None


def test_a_next_pointer_back_to_a_capability_with_reserved_bits_set_is_still_a_loop():
    # PCI 6.7: the two low bits of a capability pointer are reserved: 0x41 points at 0x40
    f = cap_function()
    f.read(0x40, 1, 0x11)
    f.read(0x41, 1, 0x41)
    assert f.capabilities() == [(0x40, 0x11)]
