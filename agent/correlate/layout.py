"""Where virtio registers sit around a status register, per transport, and device type names.

The transport is told apart by access size, which the virtio spec fixes:
- virtio-mmio: "The driver MUST only use 32 bit wide and aligned reads and writes to access the
  control registers" (virtio 1.x 4.2.2.2), so Status (+0x70) is accessed with 4 bytes;
- virtio-pci modern: device_status is a u8 field of the common configuration structure and fields
  are accessed with their natural width, so 1 byte in memory space;
- virtio-pci legacy: the I/O BAR (port space) with Device Status at +18, 1 byte.
A virtio-mmio MagicValue read ("virt") or DeviceID read at the same base, and operator hints,
confirm or override this.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from agent.events import Register, Space
from agent.model import Transport

# virtio-mmio (virtio 1.x 4.2.2)
MMIO_MAGIC_OFFSET = 0x00
MMIO_DEVICE_ID_OFFSET = 0x08
MMIO_QUEUE_NOTIFY_OFFSET = 0x50
MMIO_INTERRUPT_STATUS_OFFSET = 0x60
MMIO_INTERRUPT_ACK_OFFSET = 0x64
MMIO_STATUS_OFFSET = 0x70
MMIO_CONFIG_GENERATION_OFFSET = 0xFC
MMIO_ALIGN = 0x200          # QEMU microvm / Firecracker place virtio-mmio windows 0x200-aligned or more
VIRTIO_MMIO_MAGIC = 0x74726976  # "virt" little-endian

# virtio-pci modern common configuration structure (virtio 1.x 4.1.4.3)
MODERN_MSIX_CONFIG_OFFSET = 0x10
MODERN_STATUS_OFFSET = 0x14
MODERN_CONFIG_GENERATION_OFFSET = 0x15
MODERN_ALIGN = 0x1000       # for pickup from a single access: QEMU and Cloud Hypervisor put
                            # the common cfg at the start of a 4 KiB-aligned BAR region
                            # (the spec only requires 4-byte alignment)

# virtio-pci legacy I/O BAR (virtio 1.x 4.1.4.8)
LEGACY_QUEUE_NOTIFY_OFFSET = 16
LEGACY_STATUS_OFFSET = 18
LEGACY_ISR_OFFSET = 19
LEGACY_CONFIG_VECTOR_OFFSET = 20
LEGACY_ALIGN = 32           # an I/O BAR is aligned to its size, at least 32 bytes here

NO_VECTOR = 0xFFFF          # VIRTIO_MSI_NO_VECTOR

RESERVED_STATUS_BITS = 0x30  # bits no virtio version defines


@dataclass(frozen=True, slots=True)
class Layout:
    """A device's register block: transport, address space and base of the structure."""

    transport: str
    space: str
    base: int

    @property
    def device_id(self) -> str:
        return f"{self.space}-0x{self.base:x}"

    @property
    def status_addr(self) -> int:
        return self.base + {
            Transport.MMIO: MMIO_STATUS_OFFSET,
            Transport.PCI_MODERN: MODERN_STATUS_OFFSET,
            Transport.PCI_LEGACY: LEGACY_STATUS_OFFSET,
        }[self.transport]

    def registers(self) -> dict[int, int]:
        """address -> events.Register of the registers worth watching for this device."""
        b = self.base
        if self.transport == Transport.MMIO:
            return {
                b + MMIO_STATUS_OFFSET: Register.STATUS,
                b + MMIO_CONFIG_GENERATION_OFFSET: Register.CONFIG_GENERATION,
                b + MMIO_INTERRUPT_STATUS_OFFSET: Register.ISR,
                b + MMIO_INTERRUPT_ACK_OFFSET: Register.INTERRUPT_ACK,
            }
        if self.transport == Transport.PCI_MODERN:
            # the ISR and notify capabilities live at offsets only PCI config space tells
            return {
                b + MODERN_STATUS_OFFSET: Register.STATUS,
                b + MODERN_CONFIG_GENERATION_OFFSET: Register.CONFIG_GENERATION,
                b + MODERN_MSIX_CONFIG_OFFSET: Register.MSIX_CONFIG,
            }
        return {
            b + LEGACY_STATUS_OFFSET: Register.STATUS,
            b + LEGACY_ISR_OFFSET: Register.ISR,
            b + LEGACY_CONFIG_VECTOR_OFFSET: Register.MSIX_CONFIG,
        }

    def aligned(self) -> bool:
        """Is the base where VMMs put it? Required only to confirm a status register from one
        access (a device initialised before the agent started), not from the 0,1,3 writes."""
        align = {Transport.MMIO: MMIO_ALIGN, Transport.PCI_MODERN: MODERN_ALIGN,
                 Transport.PCI_LEGACY: LEGACY_ALIGN}[self.transport]
        return self.base % align == 0


def layout_for(space: str, addr: int, size: int, transport: str = "") -> Optional[Layout]:
    """The layout a status register at (space, addr) accessed with `size` bytes implies.

    `transport` (from a hint) overrides the size rule. None when no transport fits.
    """
    if not transport:
        if space == Space.PIO and size == 1:
            transport = Transport.PCI_LEGACY
        elif space == Space.MMIO and size == 1:
            transport = Transport.PCI_MODERN
        elif space == Space.MMIO and size == 4:
            transport = Transport.MMIO
        else:
            return None
    offset = {Transport.MMIO: MMIO_STATUS_OFFSET, Transport.PCI_MODERN: MODERN_STATUS_OFFSET,
              Transport.PCI_LEGACY: LEGACY_STATUS_OFFSET}.get(transport)
    if offset is None or addr < offset:
        return None
    if (transport == Transport.PCI_LEGACY) != (space == Space.PIO):
        return None
    return Layout(transport, space, addr - offset)


def plausible_status(value: int) -> bool:
    """A non-zero byte with no reserved bit: something a status register can hold."""
    return 0 < value <= 0xFF and not value & RESERVED_STATUS_BITS


def looks_initialised(value: int, transport: str = "") -> bool:
    """ACKNOWLEDGE|DRIVER|DRIVER_OK all set: a running device's status, seen on pickup. A modern
    PCI driver must also have set FEATURES_OK (virtio 1.x 3.1.1)."""
    if not (plausible_status(value) and value & 0x07 == 0x07):
        return False
    return transport != Transport.PCI_MODERN or bool(value & 0x08)


# virtio device IDs (virtio 1.x 5) -> the `type` label vocabulary
DEVICE_TYPES = {
    1: "net", 2: "blk", 3: "console", 4: "rng", 5: "balloon", 8: "scsi", 9: "9p",
    16: "gpu", 18: "input", 19: "vsock", 20: "crypto", 23: "iommu", 24: "mem", 25: "sound",
    26: "fs", 27: "pmem",
}
# transitional PCI device ids 0x1000.. (virtio 1.x 4.1.2.1)
_TRANSITIONAL = {0x1000: 1, 0x1001: 2, 0x1002: 5, 0x1003: 3, 0x1004: 8, 0x1005: 4, 0x1009: 9,
                 0x1012: 19}


def type_from_virtio_id(device_id: int) -> str:
    return DEVICE_TYPES.get(device_id, "unknown")


def type_from_pci_device_id(pci_device_id: int) -> str:
    if 0x1040 <= pci_device_id <= 0x107F:
        return type_from_virtio_id(pci_device_id - 0x1040)
    return type_from_virtio_id(_TRANSITIONAL.get(pci_device_id, 0))
