"""Keep, of a converted trace, what the agent's capture would have forwarded (docs/capture.md).

The converted trace has every access a KVM tracepoint would have shown; the kernel program
forwards a small part of it, steered by what correlation asks it to watch. This runs a
Correlator beside the filter and applies its WatchRegister / WatchInterrupt / WatchDeviceBars
outputs as capture's maps would, so the result is what `record` would have written:

- PCI configuration space: a change of (op, value) at an address; identical accesses fold;
- a watched register: status on every change; other registers on change, an identical access
  again once per interval; a watched queue notify address: a `QueueNotify`, at most one per
  address per interval (the kicks in between are its `repeats`);
- an unwatched 16-bit MMIO write: a `QueueNotify` likewise (modern virtio-pci kicks);
  an unwatched 2- or 4-byte write in the VM's virtio BAR span: forwarded with its value
  (MSI-X table programming); an unwatched 1-byte access with a status-like value (no bit
  0x10/0x20): a discovery candidate, on change;
- an MSI on a watched vector: always; on another vector: one per vector per interval
  (activity discovery); an APIC delivery: on a watched vector, or the first delivery within
  1 ms of an MSI activity discovery forwarded; a GSI level change: on a watched GSI.

Not modelled: the token buckets (a run here stays far below their rates) and map capacities.
"""
from __future__ import annotations

from typing import Iterable, Iterator, Optional

from agent.events import (
    ApicAccepted, Event, IrqLine, MsiInjected, Op, ProcessExit, QueueNotify, Register,
    RegisterAccess, Space, VmStarted,
)
from agent.correlate import Correlator, CorrelatorConfig
from agent.model import WatchDeviceBars, WatchInterrupt, WatchRegister

INTERVAL_NS = 200_000_000        # capture's activity_interval_ms default
APIC_PENDING_NS = 1_000_000      # a discovered MSI's delivery is forwarded within this


class CaptureFilter:
    def __init__(self, interval_ns: int = INTERVAL_NS) -> None:
        self.interval_ns = interval_ns
        self.watched: dict[tuple[str, int], int] = {}
        self.irqs: set[tuple[str, int]] = set()
        self.bars: Optional[tuple[int, int]] = None
        self.last: dict[tuple[str, int], tuple[str, int, int]] = {}   # -> (op, value, ts)
        self.kicks: dict[int, tuple[int, int]] = {}    # addr -> (last forwarded ts, folded)
        self.msi_seen: dict[int, int] = {}             # vector -> last forwarded ts
        self.apic_pending: dict[int, int] = {}         # vector -> ts of the discovered MSI
        self.dropped = 0

    def apply(self, outputs: Iterable) -> None:
        for o in outputs:
            if isinstance(o, WatchRegister):
                if o.add:
                    self.watched[(o.space, o.addr)] = o.register
                else:
                    self.watched.pop((o.space, o.addr), None)
            elif isinstance(o, WatchInterrupt):
                key = ("vector", o.vector) if o.vector is not None else ("gsi", o.gsi)
                if o.add:
                    self.irqs.add(key)
                else:
                    self.irqs.discard(key)
            elif isinstance(o, WatchDeviceBars):
                self.bars = (o.base, o.size) if o.add else None

    def _kick(self, ev: RegisterAccess) -> Optional[Event]:
        prev = self.kicks.get(ev.addr)
        if prev is not None and ev.ts_ns - prev[0] < self.interval_ns:
            self.kicks[ev.addr] = (prev[0], prev[1] + 1)
            return None
        self.kicks[ev.addr] = (ev.ts_ns, 0)
        return QueueNotify(ev.ts_ns, ev.pid, ev.tid, ev.addr, prev[1] if prev else 0)

    def _changed(self, ev: RegisterAccess, again_after: Optional[int]) -> bool:
        key = (ev.space, ev.addr)
        prev = self.last.get(key)
        if prev is not None and prev[0] == ev.op and prev[1] == ev.value and (
                again_after is None or ev.ts_ns - prev[2] < again_after):
            return False
        self.last[key] = (ev.op, ev.value, ev.ts_ns)
        return True

    def forward(self, ev: Event) -> Optional[Event]:
        if isinstance(ev, (VmStarted, ProcessExit)):
            return ev
        if isinstance(ev, RegisterAccess):
            return self._access(ev)
        if isinstance(ev, MsiInjected):
            vector = ev.data & 0xFF
            if ("vector", vector) in self.irqs:
                return ev
            seen = self.msi_seen.get(vector)
            if seen is not None and ev.ts_ns - seen < self.interval_ns:
                return None
            self.msi_seen[vector] = ev.ts_ns
            self.apic_pending[vector] = ev.ts_ns
            return ev
        if isinstance(ev, ApicAccepted):
            if ("vector", ev.vector) in self.irqs:
                return ev
            pending = self.apic_pending.pop(ev.vector, None)
            if pending is not None and ev.ts_ns - pending <= APIC_PENDING_NS:
                return ev
            return None
        if isinstance(ev, IrqLine):
            return ev if ("gsi", ev.gsi) in self.irqs else None
        return ev

    def _access(self, ev: RegisterAccess) -> Optional[Event]:
        if ev.space == Space.PCICFG:
            return ev if self._changed(ev, None) else None
        reg = self.watched.get((ev.space, ev.addr))
        if reg is not None:
            if reg == Register.QUEUE_NOTIFY and ev.op == Op.WRITE:
                return self._kick(ev)
            again = None if reg == Register.STATUS else self.interval_ns
            if not self._changed(ev, again):
                return None
            return RegisterAccess(ev.ts_ns, ev.pid, ev.tid, ev.space, ev.op, ev.addr, ev.size,
                                  ev.value, reg)
        if ev.space == Space.MMIO and ev.op == Op.WRITE:
            in_bars = self.bars is not None and 0 <= ev.addr - self.bars[0] < self.bars[1]
            if in_bars and ev.size in (2, 4):
                return ev if self._changed(ev, None) else None
            if ev.size == 2:
                return self._kick(ev)
        if ev.size == 1 and ev.value <= 0xFF and not ev.value & 0x30:
            return ev if self._changed(ev, None) else None
        return None


def forwarded(events: Iterable[Event], config: CorrelatorConfig | None = None) -> Iterator[Event]:
    """The events capture would have forwarded, in order, with a Correlator steering it."""
    flt = CaptureFilter()
    corr = Correlator(config or CorrelatorConfig())
    for ev in events:
        out = flt.forward(ev)
        if out is None:
            flt.dropped += 1
            continue
        flt.apply(corr.feed(out))
        yield out
    flt.apply(corr.flush())
