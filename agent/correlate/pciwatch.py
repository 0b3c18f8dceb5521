"""Which registers of a virtio PCI function to watch, from its model (agent.correlate.pcimodel).

Every address here comes from what the guest programmed: the common configuration, ISR and
notify structures where its virtio capabilities and BARs put them, the legacy I/O BAR of a
transitional device, the MSI-X table where its capability and BAR put it. Pure.
"""
from __future__ import annotations

from typing import Optional

from agent.events import Register, Space
from agent.model import Transport
from agent.correlate.layout import (
    LEGACY_CONFIG_VECTOR_OFFSET, LEGACY_ISR_OFFSET, LEGACY_QUEUE_NOTIFY_OFFSET,
    LEGACY_STATUS_OFFSET, MODERN_CONFIG_GENERATION_OFFSET, MODERN_MSIX_CONFIG_OFFSET,
    MODERN_STATUS_OFFSET, Layout,
)
from agent.correlate.pcimodel import VirtioPci

MODERN_QUEUE_SELECT_OFFSET = 0x16
MODERN_QUEUE_MSIX_VECTOR_OFFSET = 0x1A
LEGACY_QUEUE_SELECT_OFFSET = 14
LEGACY_QUEUE_VECTOR_OFFSET = 22
MAX_NOTIFY_WATCHES = 8      # queue notify addresses watched per device (kicks of later queues
                            # are still attributed by the notify region, through discovery)
MAX_MSIX_WATCHED = 16       # MSI-X entries whose address, data and control are followed

Plan = dict[tuple[str, int], int]   # (space, addr) -> events.Register


def needs_watch(register: int) -> bool:
    """Is a planned register asked of capture's watch map? MSI-X table writes are not: capture
    forwards them through the VM's device-BAR span (WatchDeviceBars, and the kernel's own span
    from BAR assignment), which saves 48 watch entries a device."""
    return register != Register.MSIX_TABLE


def layout_of(v: VirtioPci) -> Optional[Layout]:
    """The status register block the device is known by: the modern common configuration,
    else a transitional device's legacy I/O BAR."""
    if v.common is not None:
        return Layout(Transport.PCI_MODERN, v.common.space, v.common.addr)
    if v.legacy_io is not None:
        return Layout(Transport.PCI_LEGACY, Space.PIO, v.legacy_io)
    return None


def watch_plan(v: VirtioPci) -> Plan:
    plan: Plan = {}
    if v.common is not None:
        s, b = v.common.space, v.common.addr
        plan[(s, b + MODERN_STATUS_OFFSET)] = Register.STATUS
        plan[(s, b + MODERN_CONFIG_GENERATION_OFFSET)] = Register.CONFIG_GENERATION
        plan[(s, b + MODERN_MSIX_CONFIG_OFFSET)] = Register.MSIX_CONFIG
        plan[(s, b + MODERN_QUEUE_SELECT_OFFSET)] = Register.QUEUE_SELECT
        plan[(s, b + MODERN_QUEUE_MSIX_VECTOR_OFFSET)] = Register.QUEUE_MSIX_VECTOR
    if v.isr is not None:
        plan[(v.isr.space, v.isr.addr)] = Register.ISR
    if v.notify is not None:
        step = v.notify_multiplier or 0
        count = 1 if step == 0 else max(1, min(MAX_NOTIFY_WATCHES, v.notify.length // step))
        for q in range(count):
            plan.setdefault((v.notify.space, v.notify.addr + q * step), Register.QUEUE_NOTIFY)
    if v.legacy_io is not None:
        b = v.legacy_io
        plan[(Space.PIO, b + LEGACY_STATUS_OFFSET)] = Register.STATUS
        plan[(Space.PIO, b + LEGACY_ISR_OFFSET)] = Register.ISR
        plan[(Space.PIO, b + LEGACY_CONFIG_VECTOR_OFFSET)] = Register.MSIX_CONFIG
        plan[(Space.PIO, b + LEGACY_QUEUE_SELECT_OFFSET)] = Register.QUEUE_SELECT
        plan[(Space.PIO, b + LEGACY_QUEUE_VECTOR_OFFSET)] = Register.QUEUE_MSIX_VECTOR
        plan[(Space.PIO, b + LEGACY_QUEUE_NOTIFY_OFFSET)] = Register.QUEUE_NOTIFY
    if v.msix_table is not None:
        t = v.msix_table
        for i in range(min(MAX_MSIX_WATCHED, t.length // 16)):
            for word in (0, 8, 12):
                plan[(t.space, t.addr + 16 * i + word)] = Register.MSIX_TABLE
    return plan
