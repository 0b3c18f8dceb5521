"""QEMU's trace of a TCG run -> the agent.events KVM's tracepoints would have shown.

QEMU is started with `-msg timestamp=on -trace events=FILE,file=LOG` and the events of
TRACE_EVENTS (Debian's QEMU 7.2 has them, `-trace help`). Each log line reads

    <tid>@<sec>.<usec>:<event> <args>

and is converted as follows (docs/lab.md, "Real Linux under TCG", says what is exact):

- `memory_region_ops_{read,write}` on `pci-conf-idx` / `pci-conf-data` (ports 0xCF8 / 0xCFC-0xCFF,
  what `kvm_pio` shows) -> `RegisterAccess(space=pcicfg)`, translated from the 0xCF8 latch as
  capture does;
- the same on a virtio-pci structure (`virtio-pci-common-*`, `-isr-`, `-device-`, `-notify-`) or
  an MSI-X table / PBA -> `RegisterAccess(space=mmio)` at the absolute address QEMU traces
  (memory_region_to_absolute_addr: the guest-physical address under the BAR);
- a write to `apic-msi` that QEMU takes as an MSI (offset 0-0xF of the APIC page, or beyond it),
  and that no IOAPIC pin raised just before on that thread -> `MsiInjected` (kvm_msi_set_irq);
- `apic_deliver_irq` -> `ApicAccepted` (kvm_apic_accept_irq) with the vector, accepted by APIC
  id 0 (the guest has one CPU);
- `ioapic_set_irq` -> `IrqLine` (kvm_set_irq) with the pin as GSI.

Timestamps are TCG's (host wall clock when QEMU logged, µs): events within one µs keep the
log's order and are spread 1 ns apart. Everything else in the log is ignored.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional

from agent.events import (
    ApicAccepted, Event, IrqLine, MsiInjected, Op, RegisterAccess, Space, pcicfg_addr,
)

TRACE_EVENTS = (
    "memory_region_ops_read", "memory_region_ops_write", "apic_deliver_irq", "ioapic_set_irq",
    "virtio_set_status", "virtio_notify", "msix_write_config",
)
APIC_BASE = 0xFEE00000
APIC_PAGE = 0x1000
CONF_IDX = 0xCF8
CONF_DATA = 0xCFC
# memory regions whose accesses are device registers a KVM tracepoint would show
_MMIO_PREFIXES = ("virtio-pci-common-", "virtio-pci-isr-", "virtio-pci-device-",
                  "virtio-pci-notify-", "msix-table", "msix-pba")

_LINE = re.compile(r"^(\d+)@(\d+)\.(\d{6}):(\w+) ?(.*)$")
_MR = re.compile(r"^cpu (-?\d+) mr 0x[0-9a-f]+ addr 0x([0-9a-f]+) value 0x([0-9a-f]+) "
                 r"size (\d+) name '([^']*)'$")
_APIC = re.compile(r"^dest (\d+) dest_mode (\d+) delivery_mode (\d+) vector (\d+) "
                   r"trigger_mode (\d+)$")
_IOAPIC = re.compile(r"^vector: (\d+) level: (\d+)$")


class TraceFormatError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class TraceLine:
    tid: int
    ts_us: int
    event: str
    args: str


def parse_lines(lines: Iterable[str]) -> Iterator[TraceLine]:
    """Trace records; lines that are not `tid@sec.usec:event` (QEMU's other messages) are
    skipped. Raises TraceFormatError when no line at all has a timestamp (QEMU was not run
    with `-msg timestamp=on`)."""
    seen = untimed = 0
    for line in lines:
        m = _LINE.match(line.rstrip("\n"))
        if m is None:
            if line.split(" ", 1)[0] in TRACE_EVENTS:
                untimed += 1
                if untimed > 16 and not seen:
                    raise TraceFormatError("trace lines carry no tid@time prefix: run QEMU "
                                           "with -msg timestamp=on")
            continue
        seen += 1
        yield TraceLine(int(m[1]), int(m[2]) * 1_000_000 + int(m[3]), m[4], m[5])


def _is_msi(addr: int) -> bool:
    """QEMU's apic_mem_write: the APIC page's first 16 bytes and beyond the page are MSIs."""
    off = addr - APIC_BASE
    return off < 0x10 or off >= APIC_PAGE


def mmio_region(name: str) -> bool:
    return name.startswith(_MMIO_PREFIXES)


class Converter:
    """Stateful: the 0xCF8 latch, the last IOAPIC raise per thread, the µs tie-breaker."""

    def __init__(self, pid: int, apicid: int = 0) -> None:
        self.pid = pid
        self.apicid = apicid
        self.latch: Optional[int] = None
        self.ioapic_raise: dict[int, bool] = {}   # tid -> its previous record raised a pin
        self.last_us = -1
        self.tie = 0
        self.unknown_pcicfg = 0                   # 0xCFC accesses with the latch disabled

    def _ts(self, us: int) -> int:
        if us == self.last_us:
            self.tie = min(self.tie + 1, 999)
        else:
            self.last_us, self.tie = max(us, self.last_us), 0
        return self.last_us * 1000 + self.tie

    def convert(self, rec: TraceLine) -> Optional[Event]:
        ts = self._ts(rec.ts_us)
        raised = self.ioapic_raise.pop(rec.tid, False)
        if rec.event in ("memory_region_ops_read", "memory_region_ops_write"):
            m = _MR.match(rec.args)
            if m is None:
                raise TraceFormatError(f"unexpected {rec.event} arguments: {rec.args!r}")
            addr, value, size, name = int(m[2], 16), int(m[3], 16), int(m[4]), m[5]
            write = rec.event.endswith("write")
            op = Op.WRITE if write else Op.READ
            if name == "pci-conf-idx":
                if write and addr == CONF_IDX and size == 4:
                    self.latch = value
                return None
            if name == "pci-conf-data":
                if self.latch is None or not self.latch & 0x80000000:
                    self.unknown_pcicfg += 1
                    return None
                lt = self.latch
                reg = (lt & 0xFC) + (addr - CONF_DATA)
                cfg = pcicfg_addr((lt >> 16) & 0xFF, (lt >> 11) & 0x1F, (lt >> 8) & 0x7, reg)
                return RegisterAccess(ts, self.pid, rec.tid, Space.PCICFG, op, cfg, size, value)
            if name == "apic-msi":
                if write and _is_msi(addr) and not raised:
                    return MsiInjected(ts, self.pid, rec.tid, addr, value)
                return None
            if mmio_region(name):
                return RegisterAccess(ts, self.pid, rec.tid, Space.MMIO, op, addr, size, value)
            return None
        if rec.event == "apic_deliver_irq":
            m = _APIC.match(rec.args)
            if m is None:
                raise TraceFormatError(f"unexpected apic_deliver_irq arguments: {rec.args!r}")
            return ApicAccepted(ts, self.pid, rec.tid, self.apicid, int(m[4]), int(m[3]))
        if rec.event == "ioapic_set_irq":
            m = _IOAPIC.match(rec.args)
            if m is None:
                raise TraceFormatError(f"unexpected ioapic_set_irq arguments: {rec.args!r}")
            level = int(m[2])
            self.ioapic_raise[rec.tid] = level == 1
            return IrqLine(ts, self.pid, rec.tid, int(m[1]), level)
        return None


def convert(lines: Iterable[str], pid: int) -> Iterator[Event]:
    """Every event of a trace log (in the log's order)."""
    conv = Converter(pid)
    for rec in parse_lines(lines):
        ev = conv.convert(rec)
        if ev is not None:
            yield ev
