"""Decoding of the kernel's `struct event` (bpf/capture.c) into agent.events dataclasses.

Pure: bytes in, dataclass out, no BCC. The layout and the numeric codes must match bpf/capture.c.
"""
from __future__ import annotations

import struct

from agent.events import (
    ApicAccepted, Event, IrqLine, MsiInjected, Op, ProcessExit, QueueNotify, RegisterAccess,
    Space, VhostStatus,
)

# struct event: ts, addr, value, tgid, tid, repeats, size, type, op, space, reg, pad
EVENT_STRUCT = struct.Struct("<QQQIIIIBBBBI")
EVENT_SIZE = EVENT_STRUCT.size  # 48

EV_ACCESS = 1
EV_FAST_MMIO = 2
EV_MSI = 3
EV_IRQ = 4
EV_APIC = 5
EV_VHOST_STATUS = 6
EV_EXIT = 7

SPACE_PCICFG = 3   # (2 is the C side's candidates-map key space of queue notify addresses)
SPACES = {0: Space.MMIO, 1: Space.PIO, SPACE_PCICFG: Space.PCICFG}
SPACE_CODES = {v: k for k, v in SPACES.items()}
OPS = {0: Op.READ, 1: Op.WRITE}

# per-CPU counter slots of bpf/capture.c, by index
COUNTERS = (
    "forwarded", "repeat", "unwatched", "uninteresting_irq", "rate_limited", "ringbuf_full",
    "unsatisfied_read", "candidate_map_full", "vhost_ioctl", "kvm_signal_msi", "kvm_irqfd",
    "kvm_ioeventfd", "kvm_set_gsi_routing", "user_read_error", "inflight_full",
    "kernel_read_error", "activity_forwarded", "activity_folded", "config_forwarded",
    "config_rate_limited", "watched_rate_limited", "irq_rate_limited",
)

IRQ_KIND_VECTOR = 0
IRQ_KIND_GSI = 1


class DecodeError(ValueError):
    pass


def _signed32(v: int) -> int:
    v &= 0xFFFFFFFF
    return v - (1 << 32) if v & 0x80000000 else v


def decode(data: bytes) -> Event:
    """One ring-buffer record -> one event. Raises DecodeError on a malformed record."""
    if len(data) < EVENT_SIZE:
        raise DecodeError(f"record of {len(data)} bytes, expected {EVENT_SIZE}")
    (ts, addr, value, tgid, tid, repeats, size, etype, op, space, reg,
     _pad) = EVENT_STRUCT.unpack_from(data)
    if etype == EV_ACCESS:
        if space not in SPACES or op not in OPS:
            raise DecodeError(f"access with space {space} op {op}")
        if size not in (1, 2, 4, 8):
            raise DecodeError(f"access of size {size}")
        return RegisterAccess(ts_ns=ts, pid=tgid, tid=tid, space=SPACES[space], op=OPS[op],
                              addr=addr, size=size, value=value, register=reg, repeats=repeats)
    if etype == EV_FAST_MMIO:
        return QueueNotify(ts_ns=ts, pid=tgid, tid=tid, addr=addr, repeats=repeats)
    if etype == EV_MSI:
        return MsiInjected(ts_ns=ts, pid=tgid, tid=tid, address=addr, data=value)
    if etype == EV_IRQ:
        return IrqLine(ts_ns=ts, pid=tgid, tid=tid, gsi=addr, level=_signed32(value))
    if etype == EV_APIC:
        return ApicAccepted(ts_ns=ts, pid=tgid, tid=tid, apicid=addr, vector=value & 0xFF,
                            delivery_mode=size)
    if etype == EV_VHOST_STATUS:
        if op not in OPS:
            raise DecodeError(f"vhost status with op {op}")
        fd = addr - (1 << 64) if addr >= (1 << 63) else addr
        return VhostStatus(ts_ns=ts, pid=tgid, tid=tid, op=OPS[op], fd=fd, value=value & 0xFF)
    if etype == EV_EXIT:
        return ProcessExit(ts_ns=ts, pid=tgid)
    raise DecodeError(f"unknown event type {etype}")


def encode(*, ts: int, addr: int = 0, value: int = 0, tgid: int = 0, tid: int = 0,
           repeats: int = 0, size: int = 0, etype: int, op: int = 0, space: int = 0,
           reg: int = 0) -> bytes:
    """The bytes the kernel would write (used by tests and benchmarks)."""
    return EVENT_STRUCT.pack(ts, addr & (2**64 - 1), value & (2**64 - 1), tgid, tid, repeats,
                             size, etype, op, space, reg, 0)
