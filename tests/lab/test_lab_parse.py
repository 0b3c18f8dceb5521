"""Parsing of the guest's serial lines and QEMU's messages (pure)."""
from __future__ import annotations

import pytest

from lab.harness import GuestSpec, LabError, LabResult, parse_qemu_messages, parse_serial

HZ = 2_000_000_000  # 2 ticks per ns keeps the arithmetic readable


def _result(text: str) -> LabResult:
    r = LabResult(spec=GuestSpec(scenario="recover"), exit_code=1, wall_s=0.1)
    parse_serial(text, r)
    return r


def test_episode_timestamps_are_ns_since_guest_entry() -> None:
    base = 1_000_000
    lines = [
        f"VRA boot via=pvh tsc_hz={HZ} tsc_src=cpuid_40000010 tsc_hz_cpuid={HZ} tsc_hz_pit=0 tsc={base}",
        f"VRA status dev=0 ep=-1 value=0xf tsc={base + 100}",
        f"VRA fault dev=0 ep=0 tsc={base + 2000}",
        f"VRA needs_reset dev=0 ep=0 value=0x4f reads=3 tsc={base + 4000}",
        f"VRA status dev=0 ep=0 value=0x0 tsc={base + 6000}",
        f"VRA reset_done dev=0 ep=0 value=0x0 reads=1 tsc={base + 7000}",
        f"VRA status dev=0 ep=0 value=0x1 tsc={base + 8000}",
        f"VRA status dev=0 ep=0 value=0xf tsc={base + 10000}",
        f"VRA done scenario=recover status0=0xf tsc={base + 20000}",
    ]
    r = _result("\n".join(lines))
    assert r.done and r.final_status == {0: 0xF}
    (e,) = r.episodes
    assert (e.fault_ns, e.needs_reset_ns, e.reset_ns, e.reset_done_ns, e.driver_ok_ns) == (
        1000, 2000, 3000, 3500, 5000)
    assert e.needs_reset_status == 0x4F and e.needs_reset_reads == 3
    assert e.recovery_ns == 3000 and e.total_ns == 4000 and e.detect_latency_ns == 1000
    assert e.status_values == [0, 1, 0xF]
    assert len(r.status_writes) == 4  # the bring-up write (ep -1) is kept, not in an episode


def test_malformed_and_foreign_lines() -> None:
    r = _result("SeaBIOS says hi\nVRA wibble x=1\n")
    assert r.unparsed_lines == 2 and not r.done
    with pytest.raises(LabError, match="before its boot line"):
        _result("VRA fault dev=0 ep=0 tsc=5")
    with pytest.raises(LabError, match="malformed"):
        _result(f"VRA boot via=pvh tsc_hz={HZ}")


def test_qemu_messages_with_and_without_timestamps() -> None:
    msgs = parse_qemu_messages(
        "2026-11-28T13:09:39.228677Z qemu-system-x86_64: Guest moved used index from 0 to 9\n"
        "qemu-system-x86_64: warning: host doesn't support requested feature\n"
        "unrelated\n")
    assert [m.text for m in msgs] == [
        "Guest moved used index from 0 to 9", "warning: host doesn't support requested feature"]
    assert msgs[0].timestamp == "2026-11-28T13:09:39.228677Z" and msgs[1].timestamp is None
