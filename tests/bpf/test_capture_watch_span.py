"""The kernel skips the `watch` lookup for MMIO accesses outside every span that no pattern
(status-sized, kick-shaped) matches (mmio_outside() in bpf/capture.c). A watched register of
another shape, virtio-mmio's 32-bit InterruptStatus (+0x60) and InterruptACK (+0x64), must
still be seen: userspace keeps the span of watched MMIO addresses (real QEMU + KVM + BPF)."""
from __future__ import annotations

import ctypes

from agent.capture.capture import CFG_WATCH_HI, CFG_WATCH_LO
from agent.events import Op, Register, RegisterAccess
from lab.harness import GuestSpec

from capture_lab_support import capture_fixture, learn_devices, run_captured

cap = capture_fixture()
SPEC = GuestSpec(transport="mmio", scenario="recover")


def _span(cap) -> tuple[int, int]:
    table = cap.bpf[b"config"]
    return table[ctypes.c_int(CFG_WATCH_LO)].value, table[ctypes.c_int(CFG_WATCH_HI)].value


def test_watched_32bit_mmio_registers_outside_the_patterns_are_forwarded(cap):
    (dev,) = learn_devices(SPEC)
    isr, ack = dev.isr_addr, dev.ack_addr
    assert (isr - dev.mmio_base, ack - dev.mmio_base) == (0x60, 0x64)
    run = run_captured(cap, SPEC, watch=[dev], registers=[(dev.space, isr, Register.ISR),
                                                          (dev.space, ack, Register.INTERRUPT_ACK)])
    reads = [e for e in run.events if isinstance(e, RegisterAccess) and e.addr == isr]
    acks = [e for e in run.events if isinstance(e, RegisterAccess) and e.addr == ack]
    assert reads and all(e.register == Register.ISR and e.op == Op.READ and e.size == 4
                         for e in reads)
    # the config-change bit (1) as the guest read it on the NEEDS_RESET interrupt, then acked
    assert any(e.value & 2 for e in reads), reads
    assert any(e.op == Op.WRITE and e.value & 2 for e in acks), acks
    # the exited VM's watches are forgotten (one poll after its exit) and the span with them
    cap.poll(0)
    assert _span(cap) == (0, 0)


def test_unwatched_they_are_counted_and_not_forwarded(cap):
    (dev,) = learn_devices(SPEC)
    run = run_captured(cap, SPEC, watch=[dev])
    assert not [e for e in run.events if getattr(e, "addr", None) in (dev.isr_addr, dev.ack_addr)]
    assert run.delta("unwatched") > 0
    cap.poll(0)
    assert _span(cap) == (0, 0)


def test_the_span_covers_every_watched_mmio_address_and_shrinks_when_a_vm_goes(cap):
    from agent.model import WatchRegister

    a, b = 0x7FFFFF00, 0x7FFFFF01       # no such processes: only the maps are exercised
    cap.poll(0)
    assert _span(cap) == (0, 0)
    try:
        cap.watch_register(WatchRegister(a, "mmio", 0xFEB00060, Register.ISR))
        cap.watch_register(WatchRegister(b, "mmio", 0xC0000000, Register.ISR))
        cap.watch_register(WatchRegister(b, "pio", 0xC000, Register.STATUS))
        assert _span(cap) == (0xC0000000, 0xFEB00061)
        cap._forget(b)
        assert _span(cap) == (0xFEB00060, 0xFEB00061)
    finally:
        cap._forget(a)
        cap._forget(b)
    assert _span(cap) == (0, 0)
