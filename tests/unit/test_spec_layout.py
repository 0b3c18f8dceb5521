"""Register layouts and device types against the virtio spec's transport chapters.

virtio 1.x 4.2.2 (virtio-mmio register layout; "The driver MUST only use 32 bit wide and
aligned reads and writes to access the control registers"), 4.1.4.3 (virtio-pci common
configuration structure: device_status is a u8 at 0x14), 4.1.4.8 (legacy interface: the I/O
BAR with Device Status at byte 18), 4.1.2.1 (PCI device ids) and 5 (device ids). The offsets
below are copied from the spec's tables, not imported from the code under test.
"""
from __future__ import annotations

import pytest

from agent.correlate.layout import (
    Layout, layout_for, looks_initialised, plausible_status, type_from_pci_device_id,
    type_from_virtio_id,
)
from agent.events import Register, Space
from agent.model import Transport

# spec tables
MMIO = {"MagicValue": 0x000, "DeviceID": 0x008, "QueueNotify": 0x050, "InterruptStatus": 0x060,
        "InterruptACK": 0x064, "Status": 0x070, "ConfigGeneration": 0x0FC}
COMMON = {"msix_config": 0x10, "device_status": 0x14, "config_generation": 0x15}
LEGACY = {"queue_notify": 16, "device_status": 18, "isr": 19, "config_msix_vector": 20}


# -- which transport a status access implies (4.2.2.2, 4.1.4.3, 4.1.4.8) ----------------

def test_a_4_byte_mmio_status_access_is_virtio_mmio_with_status_at_0x70():
    lay = layout_for(Space.MMIO, 0xFEB00E00 + MMIO["Status"], 4)
    assert lay == Layout(Transport.MMIO, Space.MMIO, 0xFEB00E00)
    assert lay.status_addr == 0xFEB00E00 + MMIO["Status"]
    assert lay.device_id == "mmio-0xfeb00e00"


def test_a_1_byte_mmio_status_access_is_modern_pci_with_device_status_at_0x14():
    lay = layout_for(Space.MMIO, 0xFE000000 + COMMON["device_status"], 1)
    assert lay == Layout(Transport.PCI_MODERN, Space.MMIO, 0xFE000000)
    assert lay.status_addr == 0xFE000014


def test_a_1_byte_port_status_access_is_legacy_pci_with_device_status_at_18():
    lay = layout_for(Space.PIO, 0xC000 + LEGACY["device_status"], 1)
    assert lay == Layout(Transport.PCI_LEGACY, Space.PIO, 0xC000)
    assert lay.status_addr == 0xC012
    assert lay.device_id == "pio-0xc000"


@pytest.mark.parametrize("space, size", [(Space.PIO, 4), (Space.PIO, 2), (Space.MMIO, 2),
                                         (Space.MMIO, 8), (Space.PCICFG, 1), (Space.PCICFG, 4)])
def test_no_transport_accesses_its_status_register_that_way(space, size):
    assert layout_for(space, 0x1000, size) is None


@pytest.mark.parametrize("space, addr, size, transport", [
    (Space.MMIO, 0x6F, 4, ""), (Space.MMIO, 0x13, 1, ""), (Space.PIO, 17, 1, ""),
    (Space.MMIO, 0x13, 4, Transport.PCI_MODERN), (Space.PIO, 17, 1, Transport.PCI_LEGACY),
])
def test_a_status_address_below_its_offset_has_no_register_block(space, addr, size, transport):
    assert layout_for(space, addr, size, transport) is None


def test_a_status_register_at_exactly_its_offset_has_base_0():
    assert layout_for(Space.MMIO, 0x70, 4) == Layout(Transport.MMIO, Space.MMIO, 0)
    assert layout_for(Space.PIO, 18, 1) == Layout(Transport.PCI_LEGACY, Space.PIO, 0)
    assert layout_for(Space.MMIO, 0x14, 1) == Layout(Transport.PCI_MODERN, Space.MMIO, 0)


def test_a_hint_names_the_transport_whatever_the_access_size():
    # a driver may access a modern device_status with a wider access than the field
    assert layout_for(Space.MMIO, 0xFE000014, 4, Transport.PCI_MODERN) == \
        Layout(Transport.PCI_MODERN, Space.MMIO, 0xFE000000)
    assert layout_for(Space.MMIO, 0xFEB00070, 1, Transport.MMIO) == \
        Layout(Transport.MMIO, Space.MMIO, 0xFEB00000)
    assert layout_for(Space.PIO, 0xC012, 2, Transport.PCI_LEGACY) == \
        Layout(Transport.PCI_LEGACY, Space.PIO, 0xC000)


@pytest.mark.parametrize("space, transport", [
    (Space.MMIO, Transport.PCI_LEGACY),      # the legacy interface lives in an I/O BAR
    (Space.PIO, Transport.PCI_MODERN),       # modern structures live in memory BARs
    (Space.PIO, Transport.MMIO),             # virtio-mmio is memory-mapped by definition
])
def test_a_hint_whose_transport_does_not_match_its_address_space_is_refused(space, transport):
    assert layout_for(space, 0xC012, 1, transport) is None
    assert layout_for(space, 0xFE000070, 4, transport) is None


@pytest.mark.parametrize("transport", [Transport.VHOST, Transport.UNKNOWN, "bogus"])
def test_a_hint_naming_no_register_transport_is_refused(transport):
    assert layout_for(Space.MMIO, 0xFE000070, 4, transport) is None


# -- the registers worth watching around the status register ---------------------------------

def test_virtio_mmio_registers_are_at_the_spec_offsets():
    b = 0xFEB00000
    assert Layout(Transport.MMIO, Space.MMIO, b).registers() == {
        b + MMIO["Status"]: Register.STATUS,
        b + MMIO["ConfigGeneration"]: Register.CONFIG_GENERATION,
        b + MMIO["InterruptStatus"]: Register.ISR,
        b + MMIO["InterruptACK"]: Register.INTERRUPT_ACK,
    }


def test_modern_common_cfg_registers_are_at_the_spec_offsets():
    b = 0xFE000000
    assert Layout(Transport.PCI_MODERN, Space.MMIO, b).registers() == {
        b + COMMON["device_status"]: Register.STATUS,
        b + COMMON["config_generation"]: Register.CONFIG_GENERATION,
        b + COMMON["msix_config"]: Register.MSIX_CONFIG,
    }


def test_legacy_io_registers_are_at_the_spec_offsets():
    b = 0xC040
    assert Layout(Transport.PCI_LEGACY, Space.PIO, b).registers() == {
        b + LEGACY["device_status"]: Register.STATUS,
        b + LEGACY["isr"]: Register.ISR,
        b + LEGACY["config_msix_vector"]: Register.MSIX_CONFIG,
    }


@pytest.mark.parametrize("transport, align", [
    (Transport.MMIO, 0x200), (Transport.PCI_MODERN, 0x1000), (Transport.PCI_LEGACY, 32)])
def test_aligned_is_the_placement_vmms_use_per_transport(transport, align):
    space = Space.PIO if transport == Transport.PCI_LEGACY else Space.MMIO
    assert Layout(transport, space, 0).aligned()
    assert Layout(transport, space, 5 * align).aligned()
    assert not Layout(transport, space, 5 * align + align // 2).aligned()
    assert not Layout(transport, space, 5 * align - 4).aligned()


# -- the status byte (2.1) ------------------------------------------------------------------

@pytest.mark.parametrize("value", [0x01, 0x03, 0x0B, 0x0F, 0x4F, 0x8F, 0xCF, 0x07, 0x40, 0x80])
def test_status_values_made_of_defined_bits_are_plausible(value):
    assert plausible_status(value)


@pytest.mark.parametrize("value", [0, 0x10, 0x20, 0x1F, 0x2F, 0x3F, 0x100, 0x10F, -1, 0xFFFFFFFF])
def test_zero_reserved_bits_or_more_than_a_byte_is_no_status(value):
    assert not plausible_status(value)


def test_0xff_is_plausible_only_without_reserved_bits():
    assert not plausible_status(0xFF)            # 0x30 set
    assert plausible_status(0xCF)                # every defined bit


@pytest.mark.parametrize("value", [0x07, 0x0F, 0x4F, 0x47, 0x87])
def test_a_legacy_or_mmio_device_is_running_with_acknowledge_driver_and_driver_ok(value):
    assert looks_initialised(value, Transport.PCI_LEGACY)
    assert looks_initialised(value, Transport.MMIO)
    assert looks_initialised(value)


@pytest.mark.parametrize("value", [0x05, 0x06, 0x03, 0x0B, 0x0D, 0x0E, 0x01, 0x04, 0x37, 0])
def test_a_device_missing_acknowledge_driver_or_driver_ok_is_not_running(value):
    for transport in (Transport.PCI_LEGACY, Transport.MMIO, Transport.PCI_MODERN, ""):
        assert not looks_initialised(value, transport)


def test_a_modern_pci_device_is_running_only_with_features_ok_too():
    # 3.1.1: a modern driver sets FEATURES_OK before DRIVER_OK; a legacy one has no such bit
    assert not looks_initialised(0x07, Transport.PCI_MODERN)
    assert looks_initialised(0x0F, Transport.PCI_MODERN)
    assert looks_initialised(0x4F, Transport.PCI_MODERN)


# -- device types (5, 4.1.2.1) ----------------------------------------------------------------

@pytest.mark.parametrize("virtio_id, name", [
    (1, "net"), (2, "blk"), (3, "console"), (4, "rng"), (5, "balloon"), (8, "scsi"), (9, "9p"),
    (16, "gpu"), (18, "input"), (19, "vsock"), (20, "crypto"), (23, "iommu"), (24, "mem"),
    (25, "sound"), (26, "fs"), (27, "pmem")])
def test_virtio_device_ids_name_the_type(virtio_id, name):
    assert type_from_virtio_id(virtio_id) == name
    assert type_from_pci_device_id(0x1040 + virtio_id) == name   # modern: 0x1040 + id


@pytest.mark.parametrize("virtio_id", [0, 6, 7, 10, 17, 63, 64, 1000, -1])
def test_reserved_or_unknown_device_ids_are_unknown(virtio_id):
    assert type_from_virtio_id(virtio_id) == "unknown"


@pytest.mark.parametrize("pci_id, name", [
    (0x1000, "net"), (0x1001, "blk"), (0x1002, "balloon"), (0x1003, "console"), (0x1004, "scsi"),
    (0x1005, "rng"), (0x1009, "9p"), (0x1012, "vsock")])
def test_transitional_pci_device_ids_name_the_type(pci_id, name):
    assert type_from_pci_device_id(pci_id) == name


@pytest.mark.parametrize("pci_id", [0x0FFF, 0x1006, 0x103F, 0x1040, 0x107F, 0x1080, 0x1110])
def test_pci_device_ids_outside_both_ranges_or_reserved_are_unknown(pci_id):
    assert type_from_pci_device_id(pci_id) == "unknown"


def test_the_modern_range_ends_at_0x107f():
    # 0x107F is id 63 (unknown); 0x1080 is no virtio id even though 0x1080 - 0x1040 = 64
    assert type_from_pci_device_id(0x1040 + 26) == "fs"
    assert type_from_pci_device_id(0x1080 + 1) == "unknown"
