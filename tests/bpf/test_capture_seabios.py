"""Capture on a real QEMU/KVM guest that needs no lab: SeaBIOS driving a virtio-blk-pci disk does
a real virtio status handshake. QEMU's own trace (virtio_set_status) is the truth we compare to."""
from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from agent.events import Op, ProcessExit, RegisterAccess, Space

SEABIOS_TIMEOUT_S = 20


def _collapse(values):
    out = []
    for v in values:
        if not out or out[-1] != v:
            out.append(v)
    return out


def _boot_seabios(cap, tmp_path: Path):
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"\0" * 65536)
    trace = tmp_path / "qemu-trace.log"
    qemu = subprocess.Popen(
        ["qemu-system-x86_64", "-accel", "kvm", "-m", "64", "-nodefaults", "-display", "none",
         "-drive", f"file={disk},if=none,id=d0,format=raw", "-device", "virtio-blk-pci,drive=d0",
         "-trace", "virtio_set_status", "-D", str(trace)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    events = []
    try:
        deadline = time.monotonic() + SEABIOS_TIMEOUT_S
        while time.monotonic() < deadline:
            events += cap.poll(100)
            if trace.exists() and "val 15" in trace.read_text():
                break
        else:
            pytest.fail("SeaBIOS never set DRIVER_OK on the virtio-blk disk")
        events += cap.poll(200)
    finally:
        qemu.kill()
        qemu.wait()
    end = time.monotonic() + 2
    while time.monotonic() < end and not any(isinstance(e, ProcessExit) and e.pid == qemu.pid
                                             for e in events):
        events += cap.poll(100)
    qemu_writes = [int(line.split()[-1]) for line in trace.read_text().splitlines()
                   if line.startswith("virtio_set_status")]
    return qemu.pid, events, qemu_writes


def test_seabios_virtio_handshake_is_discovered(bpf, tmp_path):
    from agent.capture import Capture

    with Capture() as cap:
        status = cap.hook_status
        assert status["mmio"].attached and status["exit"].attached, status
        pid, events, qemu_writes = _boot_seabios(cap, tmp_path)
        stats = cap.stats()

    mine = [e for e in events if e.pid == pid]
    assert [e.ts_ns for e in mine] == sorted(e.ts_ns for e in mine), "not in kernel-time order"
    writes_by_addr: dict[int, list[RegisterAccess]] = {}
    for e in mine:
        if isinstance(e, RegisterAccess) and e.op == Op.WRITE and e.space == Space.MMIO:
            writes_by_addr.setdefault(e.addr, []).append(e)
    # the status register is the address whose writes replay QEMU's virtio_set_status sequence
    expected = _collapse(qemu_writes)
    matching = [a for a, ws in writes_by_addr.items()
                if _collapse([w.value for w in ws]) == expected]
    assert matching, (f"no address carried QEMU's status sequence {expected}; "
                      f"candidates {[(hex(a), [w.value for w in ws]) for a, ws in writes_by_addr.items()]}")
    status_writes = writes_by_addr[matching[0]]
    assert all(w.size == 1 for w in status_writes)
    # attributed to a vCPU thread of the QEMU process, not the main thread
    assert all(w.tid != pid for w in status_writes)
    # the process exit reaches userspace
    assert any(isinstance(e, ProcessExit) and e.pid == pid for e in events)
    assert stats.filtered["unsatisfied_read"] > 0   # reads exit twice; only the completed one counts
    assert stats.lost["ringbuf_full"] == 0 and stats.lost["decode_error"] == 0
