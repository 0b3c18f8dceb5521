"""Watched register kinds of the device model (real QEMU + KVM + BPF): a watched queue notify
address is a kick however KVM traced the write (kvm_mmio here: this KVM has no fast MMIO path),
and QUEUE_SELECT / QUEUE_MSIX_VECTOR / MSIX_TABLE go the generic watched-register way (a 16-bit
write to them is a register access, not a kick)."""
from __future__ import annotations

import pytest

from agent.events import Op, QueueNotify, Register, RegisterAccess, Space
from agent.model import WatchRegister
from lab.harness import GuestSpec

from capture_lab_support import capture_fixture, learn_devices, run_captured

INTERVAL_MS = 200

# activity discovery off: an unwatched kick is never forwarded, so every QueueNotify below
# comes from the watch
cap = capture_fixture(activity_rate=0, activity_interval_ms=INTERVAL_MS)


def test_a_watched_notify_address_written_through_kvm_mmio_is_a_folded_kick(cap):
    hold_ms, kick_ms = 1000, 2
    spec = GuestSpec(transport="modern", scenario="linux", hold_ms=hold_ms, kick_ms=kick_ms)
    (dev,) = learn_devices(spec)
    run = run_captured(cap, spec,
                       registers=[(Space.MMIO, dev.notify_addr, Register.QUEUE_NOTIFY)])
    guest = run.result
    assert guest.linux_kicks and guest.linux_kicks > 100
    at_notify = [e for e in run.events if getattr(e, "addr", None) == dev.notify_addr]
    assert not [e for e in at_notify if isinstance(e, RegisterAccess)], at_notify[:5]
    kicks = [e for e in at_notify if isinstance(e, QueueNotify)]
    assert kicks, "no kick forwarded"
    gaps = [b.ts_ns - a.ts_ns for a, b in zip(kicks, kicks[1:])]
    assert all(g >= INTERVAL_MS * 1_000_000 for g in gaps)
    assert len(kicks) <= hold_ms // INTERVAL_MS + 2
    # every kick accounted for: forwarded, carried, or still folded in the watch entry
    state = run.final_state[(Space.MMIO, dev.notify_addr)]
    assert state is not None and state.register == Register.QUEUE_NOTIFY
    total = len(kicks) + sum(k.repeats for k in kicks) + state.repeats
    assert guest.linux_kicks <= total <= guest.linux_kicks + 2
    assert run.delta("repeat") >= total - len(kicks)
    assert run.delta("activity_forwarded") == 0       # the watched path, not discovery
    print(f"\nguest kicks {guest.linux_kicks}, forwarded {len(kicks)}, accounted {total}")


def test_queue_select_and_queue_msix_vector_are_register_accesses(cap):
    spec = GuestSpec(transport="modern", scenario="init")
    (dev,) = learn_devices(spec)
    common = dev.msix_config_addr - 0x10
    qsel, qmsix = common + 0x16, common + 0x1A
    run = run_captured(cap, spec, registers=[(Space.MMIO, qsel, Register.QUEUE_SELECT),
                                             (Space.MMIO, qmsix, Register.QUEUE_MSIX_VECTOR)])
    # 16-bit writes: unwatched they would be taken for kicks
    assert not [e for e in run.events if isinstance(e, QueueNotify) and e.addr in (qsel, qmsix)]
    sel = [e for e in run.events if isinstance(e, RegisterAccess) and e.addr == qsel]
    vec = [e for e in run.events if isinstance(e, RegisterAccess) and e.addr == qmsix]
    assert sel and all(e.register == Register.QUEUE_SELECT and e.size == 2 for e in sel)
    assert vec and all(e.register == Register.QUEUE_MSIX_VECTOR and e.size == 2 for e in vec)
    assert (Op.WRITE, 0) in [(e.op, e.value) for e in sel]
    assert (Op.WRITE, dev.msix_queue) in [(e.op, e.value) for e in vec]
    assert (Op.READ, dev.msix_queue) in [(e.op, e.value) for e in vec]


def test_every_register_kind_is_accepted_and_pci_config_space_is_not_watched(cap):
    pid = 0x7FFFFFF0        # no such process: only the maps are exercised
    try:
        for kind in Register.NAMES:
            addr = 0xFEB00000 + 4 * kind
            assert cap.watch_register(WatchRegister(pid, Space.MMIO, addr, kind))
            assert cap.register_state(pid, Space.MMIO, addr).register == kind
        with pytest.raises(ValueError, match="configuration space"):
            cap.watch_register(WatchRegister(pid, Space.PCICFG, 0, Register.UNKNOWN))
    finally:
        for kind in Register.NAMES:
            cap.watch_register(WatchRegister(pid, Space.MMIO, 0xFEB00000 + 4 * kind, kind,
                                             add=False))
