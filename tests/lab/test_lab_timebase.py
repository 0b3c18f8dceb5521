"""The guest's TSC timestamps against KVM's own tracepoints (tracefs, clock x86-tsc).

Under KVM without TSC scaling the guest TSC is the host TSC plus an offset KVM may apply
(estimated from the status writes, which both sides see in the same order), so every status
access the guest stamps can be matched with the kvm_mmio / kvm_pio event of the same access. The recovery the guest reports must match what the
host saw to well within the 50 us / 2 % the agent is held to.
"""
from __future__ import annotations

import os
import re
import time
import uuid
from pathlib import Path

import pytest

from lab.harness import GuestSpec, LabResult, LabVM

pytestmark = [pytest.mark.kvm, pytest.mark.bpf]

TRACEFS = Path("/sys/kernel/tracing")
_MMIO = re.compile(r"-(\d+)\s.*?\s(\d+): kvm_mmio: mmio (\S+) len \d+ gpa 0x([0-9a-f]+) val 0x([0-9a-f]+)")
_PIO = re.compile(r"-(\d+)\s.*?\s(\d+): kvm_pio: pio_(\S+) at 0x([0-9a-f]+) size \d+ count \d+ val 0x([0-9a-f]+)")


class TraceInstance:
    """A private tracefs instance (clock x86-tsc) with some kvm events enabled. Its buffer is
    large, and `overrun()` says whether other VMs' events (other sessions share the host and the
    events) still pushed some of ours out."""

    BUFFER_KB = 8192        # per CPU

    def __init__(self, events: dict[str, str]):
        self.dir = TRACEFS / "instances" / f"vra-lab-{uuid.uuid4().hex[:8]}"
        self.events = events
        self.dir.mkdir()
        (self.dir / "buffer_size_kb").write_text(str(self.BUFFER_KB))
        (self.dir / "trace_clock").write_text("x86-tsc")
        for event, filt in events.items():
            if filt:
                (self.dir / "events" / "kvm" / event / "filter").write_text(filt)
            (self.dir / "events" / "kvm" / event / "enable").write_text("1")

    def overrun(self) -> int:
        total = 0
        for stats in (self.dir / "per_cpu").glob("cpu*/stats"):
            m = re.search(r"^overrun: (\d+)", stats.read_text(), re.M)
            total += int(m.group(1)) if m else 0
        return total

    def read_and_close(self) -> tuple[str, int]:
        """(the trace, events lost to overruns)"""
        try:
            for event in self.events:
                (self.dir / "events" / "kvm" / event / "enable").write_text("0")
            return (self.dir / "trace").read_text(), self.overrun()
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


class Disturbed(Exception):
    """This attempt's timings were disturbed by the host (not a verdict on the time base)."""


# The host's timing of a guest access is only as good as the host let it be: a vCPU preempted
# between the guest's stamp and its access (or the trace buffer overrun by other VMs' events)
# makes one attempt unusable, not wrong. Such an attempt is repeated, after a pause for the host
# to quieten; the bounds below are never widened. Structural truths (the same writes, values and
# order on both sides) are asserted in every attempt.
ATTEMPTS = 10
QUIET_S = 2.0


def _until_undisturbed(what: str, attempt) -> None:
    reasons = []
    for i in range(1, ATTEMPTS + 1):
        try:
            attempt()
            return
        except Disturbed as exc:
            print(f"{what}, attempt {i}: disturbed: {exc}")
            reasons.append(str(exc))
            time.sleep(QUIET_S)
    pytest.fail(f"{what}: no undisturbed attempt in {ATTEMPTS}: {reasons}")


def _traced_run(spec: GuestSpec, events: dict[str, str] | None = None
                ) -> tuple[LabResult, list[tuple[int, str, int]]]:
    """Runs `spec` under a trace instance; returns the result and the trace lines of its
    threads (raw) or, by default, its status accesses as (tsc, op, value)."""
    raw = events is not None
    if events is None:
        init = LabVM.start(GuestSpec(transport=spec.transport, irq=spec.irq, scenario="init"))
        addr = init.wait(120).raise_for_error().device(0).status_addr
        events = {"kvm_pio": f"port == {addr:#x}"} if spec.transport == "legacy" \
            else {"kvm_mmio": f"gpa == {addr:#x}"}
    trace = TraceInstance(events)
    try:
        vm = LabVM.start(spec)
        try:
            vm.wait_for_line("found", timeout=120)  # start_delay_ms keeps it here
            try:
                tids = {int(t) for t in os.listdir(f"/proc/{vm.pid}/task")}
            except FileNotFoundError:
                raise Disturbed("the VM had exited before its threads were listed") from None
            result = vm.wait(120).raise_for_error()
        finally:
            vm.kill()
    finally:
        text, lost = trace.read_and_close()
    if lost:
        raise Disturbed(f"{lost} trace events lost to buffer overruns")
    if raw:
        return result, [line for line in text.splitlines()
                        if (m := re.search(r"-(\d+)\s+\[", line)) and int(m.group(1)) in tids]
    return result, _host_events(text, tids)


WINDOW_SLACK_NS = 5_000          # rounding, and the offset estimate below
UNDISTURBED_LAG_NS = 50_000      # KVM read completion -> guest stamp; longer: vCPU preempted
EXIT_LATENCY_NS = 50_000         # guest stamp -> KVM's event for a write, undisturbed
AGREEMENT_ABS_NS = 50_000        # guest vs KVM recovery time: the agent's own bound,
AGREEMENT_REL = 0.02             # as constants of this test


def _tsc_offset(result: LabResult, host: list[tuple[int, str, int]]) -> int:
    """host TSC - guest TSC. KVM may offset the guest TSC (not scale it, checked elsewhere).
    Every guest status write must appear in KVM's events, same values, same order; the smallest
    host-guest gap over them is the offset plus the shortest stamp -> exit latency."""
    host_writes = [h for h in host if h[1] == "write"]
    assert [h[2] for h in host_writes] == [w.value for w in result.status_writes], \
        "KVM saw other status writes than the guest reports"
    return min(h[0] - w.tsc for h, w in zip(host_writes, result.status_writes))


@pytest.mark.parametrize("transport", ["modern", "mmio"])
def test_guest_recovery_matches_kvm_tracepoints(bpf: None, transport: str) -> None:
    _until_undisturbed(f"{transport} recovery vs KVM", lambda: _recovery_attempt(transport))


def _recovery_attempt(transport: str) -> None:
    spec = GuestSpec(transport=transport, scenario="recover", repeat=4, start_delay_ms=300)
    result, host = _traced_run(spec)
    assert result.boot is not None
    hz = result.boot.tsc_hz

    offset = _tsc_offset(result, host)

    def tsc(ns: int) -> int:  # guest ns -> host TSC
        return result.boot.tsc + offset + ns * hz // 10**9

    def ns(cycles: int) -> float:
        return cycles * 1e9 / hz

    reads = [h for h in host if h[1] == "read" and h[2] & 0x40]
    writes_ok = [h for h in host if h[1] == "write" and h[2] == 0x0F]
    assert len(writes_ok) == len([w for w in result.status_writes if w.value == 0x0F])
    matched = 0
    for e in result.episodes:
        lo, hi = tsc(e.needs_reset_issue_ns), tsc(e.needs_reset_ns)
        slack = WINDOW_SLACK_NS * hz // 10**9
        inside = [h for h in reads if lo - slack <= h[0] <= hi + slack]
        ok = tsc(e.driver_ok_ns)
        h_ok = min(writes_ok, key=lambda h: abs(h[0] - ok))
        ok_latency = ns(h_ok[0] - ok)
        if len(inside) != 1 or not 0 <= ok_latency <= EXIT_LATENCY_NS:
            # the offset estimate or this episode's accesses were held up by the host
            print(f"{transport} ep{e.ep}: {len(inside)} reads in the window, DRIVER_OK "
                  f"{ok_latency / 1e3:.1f} us after its stamp: disturbed")
            continue
        h_seen = inside[0]
        host_ns = ns(h_ok[0] - h_seen[0])
        diff = abs(host_ns - e.recovery_ns)
        # If the vCPU thread is preempted between KVM completing the read and the guest's next
        # instruction, the guest sees the value late: its own number is then honestly later.
        lag = ns(hi - h_seen[0])
        print(f"{transport} ep{e.ep}: guest {e.recovery_ns / 1e3:.1f} us, KVM {host_ns / 1e3:.1f} us,"
              f" diff {diff / 1e3:.1f} us, read window {e.needs_reset_window_ns / 1e3:.1f} us,"
              f" completion->guest {lag / 1e3:.1f} us")
        if lag <= UNDISTURBED_LAG_NS:
            matched += 1
            assert diff <= max(AGREEMENT_ABS_NS, AGREEMENT_REL * host_ns)
    if matched == 0:
        raise Disturbed("the vCPU was held up around every episode")


def test_legacy_status_writes_match_kvm_pio(bpf: None) -> None:
    _until_undisturbed("legacy writes vs KVM", _legacy_attempt)


def _legacy_attempt() -> None:
    result, host = _traced_run(GuestSpec(transport="legacy", scenario="init", start_delay_ms=300))
    hz = result.boot.tsc_hz
    assert [w.value for w in result.status_writes] == [0, 1, 3, 11, 15]
    offset = _tsc_offset(result, host)
    host_writes = [h for h in host if h[1] == "write"]
    latencies = [(h[0] - offset - w.tsc) * 1e9 / hz for w, h in zip(result.status_writes,
                                                                     host_writes)]
    assert min(latencies) == 0      # by the offset's definition: a check of the arithmetic
    print(f"legacy stamp -> KVM exit latencies (ns): {[round(x) for x in latencies]}")
    if max(latencies) >= EXIT_LATENCY_NS:
        raise Disturbed(f"a write reached KVM {max(latencies) / 1e3:.1f} us after its stamp")


@pytest.mark.parametrize("transport, irq", [("modern", "msix"), ("legacy", "msix"),
                                            ("modern", "intx"), ("mmio", "intx")])
def test_config_interrupt_is_where_the_guest_says(bpf: None, transport: str, irq: str) -> None:
    """After the fault QEMU sends the config interrupt: the MSI(-X) vector the guest programmed
    (for virtio-mmio: through the IOAPIC entry it programmed), or INTx on the GSI it reports."""
    _until_undisturbed(f"{transport}/{irq} config interrupt",
                       lambda: _config_interrupt_attempt(transport, irq))


def _config_interrupt_attempt(transport: str, irq: str) -> None:
    spec = GuestSpec(transport=transport, irq=irq, scenario="fault", start_delay_ms=300,
                     detect_ms=50)
    result, lines = _traced_run(spec, {"kvm_set_irq": "level == 1", "kvm_msi_set_irq": "",
                                       "kvm_apic_accept_irq": ""})
    (dev,) = result.devices
    (episode,) = result.episodes
    accepted = [int(m.group(1)) for ln in lines if (m := re.search(r"kvm_apic_accept_irq: apicid 0 vec (\d+)", ln))]
    raised = [int(m.group(1)) for ln in lines if (m := re.search(r"kvm_set_irq: gsi (\d+) level 1", ln))]
    if transport == "legacy":
        # no VERSION_1: virtio_error() sends no config interrupt
        assert episode.timed_out
        assert dev.msi_data_config not in accepted
    elif dev.msi_data_config is not None:
        assert dev.msi_data_config in accepted, (dev, lines[-20:])
    else:
        assert dev.irq_line is not None and dev.irq_line in raised, (dev, lines[-20:])
        assert episode.isr is not None and episode.isr & 0x2
