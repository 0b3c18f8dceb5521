"""Harness behaviour others rely on: several VMs at once, holding the guest, QMP, the time base."""
from __future__ import annotations

import ctypes
import json
import mmap
import platform
import socket
import time

import pytest

from lab.harness import GuestSpec, LabTimeout, LabVM, run

pytestmark = pytest.mark.kvm


def test_several_vms_at_once(kvm: None) -> None:
    specs = [GuestSpec(transport=t, scenario="recover") for t in ("modern", "legacy", "mmio")]
    vms = [LabVM.start(s) for s in specs]
    try:
        assert len({vm.pid for vm in vms}) == 3
        assert len({vm.workdir for vm in vms}) == 3
        results = [vm.wait(30) for vm in vms]
    finally:
        for vm in vms:
            vm.kill()
    for spec, r in zip(specs, results):
        r.raise_for_error()
        assert r.devices[0].transport == spec.transport


def test_start_delay_holds_the_guest_before_any_device_access(kvm: None) -> None:
    vm = LabVM.start(GuestSpec(scenario="init", start_delay_ms=1500))
    try:
        found = vm.wait_for_line("found", timeout=10)
        assert vm.proc.poll() is None, "QEMU exited before the start delay elapsed"
        assert not any(line.startswith("VRA status") for line in vm.serial_text().splitlines()), \
            "status accessed before the start delay ended"
        r = vm.wait(30).raise_for_error()
    finally:
        vm.kill()
    assert int(found["status_addr"], 0) == r.device(0).status_addr
    first = min(w.ns for w in r.status_writes)
    assert first >= 1_500_000_000


def test_qmp_socket(kvm: None) -> None:
    with LabVM.start(GuestSpec(scenario="init", start_delay_ms=2000, qmp=True)) as vm:
        assert vm.qmp_path is not None
        deadline = time.monotonic() + 5
        while not vm.qmp_path.exists():
            assert time.monotonic() < deadline, "no QMP socket"
            time.sleep(0.02)
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(vm.qmp_path))
            f = s.makefile("rw")
            assert "QMP" in json.loads(f.readline())
            for cmd in ("qmp_capabilities", "query-status"):
                f.write(json.dumps({"execute": cmd}) + "\n")
                f.flush()
                reply = json.loads(f.readline())
            assert reply["return"]["status"] == "running"


def test_timeout_kills_and_keeps_partial_output(kvm: None) -> None:
    vm = LabVM.start(GuestSpec(scenario="stuck", hold_ms=20000))
    with pytest.raises(LabTimeout) as info:
        vm.wait(timeout=1.5)
    assert vm.proc.poll() is not None
    partial = info.value.partial
    assert partial is not None and partial.boot is not None and not partial.done
    assert partial.episodes and partial.episodes[0].needs_reset_status == 0x4F


def _host_rdtsc():
    """rdtsc on the host, from an executable page (x86-64 only)."""
    code = bytes.fromhex("0f31" "48c1e220" "4809d0" "c3")  # rdtsc; shl rdx,32; or rax,rdx; ret
    buf = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    buf.write(code)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    fn = ctypes.CFUNCTYPE(ctypes.c_uint64)(addr)
    fn._keep = buf  # type: ignore[attr-defined]
    return fn


def test_guest_tsc_frequency_matches_the_host_tsc(kvm: None) -> None:
    """The guest's tsc_hz (KVM's tsc_khz via CPUID 0x40000010) against the host TSC rate measured
    over CLOCK_MONOTONIC. Without TSC scaling the guest TSC is the host TSC (plus an offset)."""
    if platform.machine() != "x86_64":
        pytest.skip("host rdtsc helper is x86-64 only")
    r = run(GuestSpec(scenario="init", pit_ms=50))
    assert r.boot is not None
    assert r.boot.tsc_src == "cpuid_40000010", "give QEMU +invtsc so the timing leaf exists"
    rdtsc = _host_rdtsc()
    t0, c0 = time.monotonic_ns(), rdtsc()
    time.sleep(0.3)
    t1, c1 = time.monotonic_ns(), rdtsc()
    host_hz = (c1 - c0) * 1e9 / (t1 - t0)
    assert abs(r.boot.tsc_hz / host_hz - 1) < 2e-4, (r.boot.tsc_hz, host_hz)
    # the PIT cross-check is coarse in an emulated/nested setup; it only catches gross errors
    assert r.boot.tsc_hz_pit and abs(r.boot.tsc_hz_pit / r.boot.tsc_hz - 1) < 5e-3
