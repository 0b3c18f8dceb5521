"""The guest's TSC timestamps against KVM's own tracepoints (tracefs, clock x86-tsc).

Under KVM without TSC scaling the guest TSC is the host TSC (plus an offset KVM may apply; we
measure it as the median gap), so every status access the guest stamps can be matched with the
kvm_mmio / kvm_pio event of the same access. The recovery the guest reports must match what the
host saw to well within the 50 us / 2 % the agent is held to.
"""
from __future__ import annotations

import os
import re
import statistics
import uuid
from pathlib import Path

import pytest

from lab.harness import GuestSpec, LabResult, LabVM

pytestmark = [pytest.mark.kvm, pytest.mark.bpf]

TRACEFS = Path("/sys/kernel/tracing")
_MMIO = re.compile(r"-(\d+)\s.*?\s(\d+): kvm_mmio: mmio (\S+) len \d+ gpa 0x([0-9a-f]+) val 0x([0-9a-f]+)")
_PIO = re.compile(r"-(\d+)\s.*?\s(\d+): kvm_pio: pio_(\S+) at 0x([0-9a-f]+) size \d+ count \d+ val 0x([0-9a-f]+)")


class TraceInstance:
    def __init__(self, event: str, filt: str):
        self.dir = TRACEFS / "instances" / f"vra-lab-{uuid.uuid4().hex[:8]}"
        self.event = event
        self.dir.mkdir()
        (self.dir / "trace_clock").write_text("x86-tsc")
        (self.dir / "events" / "kvm" / event / "filter").write_text(filt)
        (self.dir / "events" / "kvm" / event / "enable").write_text("1")

    def read_and_close(self) -> str:
        try:
            (self.dir / "events" / "kvm" / self.event / "enable").write_text("0")
            return (self.dir / "trace").read_text()
        finally:
            os.rmdir(self.dir)


def _host_events(text: str, tids: set[int]) -> list[tuple[int, str, int]]:
    out = []
    for line in text.splitlines():
        m = _MMIO.search(line) or _PIO.search(line)
        if m and int(m.group(1)) in tids:
            op = {"in": "read", "out": "write"}.get(m.group(3), m.group(3))
            out.append((int(m.group(2)), op, int(m.group(5), 16)))
    return out


def _traced_run(spec: GuestSpec) -> tuple[LabResult, list[tuple[int, str, int]]]:
    init = LabVM.start(GuestSpec(transport=spec.transport, scenario="init"))
    addr = init.wait(30).raise_for_error().device(0).status_addr
    trace = TraceInstance("kvm_pio", f"port == {addr:#x}") if spec.transport == "legacy" \
        else TraceInstance("kvm_mmio", f"gpa == {addr:#x}")
    try:
        vm = LabVM.start(spec)
        try:
            vm.wait_for_line("found", timeout=10)  # start_delay_ms keeps it here
            tids = {int(t) for t in os.listdir(f"/proc/{vm.pid}/task")}
            result = vm.wait(30).raise_for_error()
        finally:
            vm.kill()
    finally:
        text = trace.read_and_close()
    return result, _host_events(text, tids)


@pytest.mark.parametrize("transport", ["modern", "mmio"])
def test_guest_recovery_matches_kvm_tracepoints(bpf: None, transport: str) -> None:
    spec = GuestSpec(transport=transport, scenario="recover", repeat=3, start_delay_ms=300)
    result, host = _traced_run(spec)
    assert result.boot is not None
    hz = result.boot.tsc_hz
    reads = [h for h in host if h[1] == "read" and h[2] & 0x40]
    writes_ok = [h for h in host if h[1] == "write" and h[2] & 0x04]
    assert len(reads) >= 3, host
    for e in result.episodes:
        # guest stamps (absolute TSC) of the two ends of the recovery
        seen_tsc = result.boot.tsc + e.needs_reset_ns * hz // 10**9
        ok_tsc = result.boot.tsc + e.driver_ok_ns * hz // 10**9
        h_seen = min(reads, key=lambda h: abs(h[0] - seen_tsc))
        h_ok = min(writes_ok, key=lambda h: abs(h[0] - ok_tsc))
        print("seen gap", (h_seen[0] - seen_tsc) * 1e6 / hz, "ok gap", (h_ok[0] - ok_tsc) * 1e6 / hz)
        host_ns = (h_ok[0] - h_seen[0]) * 10**9 / hz
        guest_ns = e.recovery_ns
        diff = abs(host_ns - guest_ns)
        print(f"{transport} ep{e.ep}: guest {guest_ns / 1e3:.1f} us, KVM {host_ns / 1e3:.1f} us, "
              f"diff {diff / 1e3:.1f} us")
        assert diff <= max(50_000, 0.02 * host_ns)
    gaps = [h_tsc - w.tsc for w in result.status_writes
            for h_tsc, op, v in host if op == "write" and v == w.value
            and abs(h_tsc - w.tsc) < hz // 1000]
    assert gaps, "no guest status write matched a KVM event within 1 ms"
    print(f"{transport}: KVM write event - guest stamp, median {statistics.median(gaps) * 1e6 / hz:.1f} us")


def test_legacy_status_writes_match_kvm_pio(bpf: None) -> None:
    result, host = _traced_run(GuestSpec(transport="legacy", scenario="init", start_delay_ms=300))
    hz = result.boot.tsc_hz
    writes = [w for w in result.status_writes]
    assert [w.value for w in writes] == [0, 1, 3, 11, 15]
    host_writes = [h for h in host if h[1] == "write"]
    assert [h[2] for h in host_writes] == [0, 1, 3, 11, 15]
    for w, h in zip(writes, host_writes):
        assert 0 <= (h[0] - w.tsc) * 1e9 / hz < 50_000, (w, h)
