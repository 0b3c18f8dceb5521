"""Hook families are independent, and the regular-tracepoint fallback captures the same thing."""
from __future__ import annotations

import shutil

from agent.events import Op, Register, RegisterAccess
from lab.harness import GuestSpec

from capture_lab_support import learn_devices, run_captured


def test_a_family_that_fails_to_compile_does_not_take_the_others_down(bpf, tmp_path, monkeypatch):
    from agent.capture import Capture, bpf_dir

    src = (bpf_dir() / "capture.c").read_text()
    marker = "#ifdef FAM_GSI\n"
    assert marker in src
    broken = src.replace(marker, marker + "this is not C;\n", 1)
    (tmp_path / "capture.c").write_text(broken)
    shutil.copymode(bpf_dir() / "capture.c", tmp_path / "capture.c")
    monkeypatch.setenv("VRA_BPF_DIR", str(tmp_path))
    with Capture(hooks={"mmio", "gsi", "exit"}) as cap:
        status = cap.hook_status
        assert not status["gsi"].attached and "compile" in status["gsi"].reason
        assert status["mmio"].attached and status["exit"].attached, status


def test_regular_tracepoints_capture_the_same_handshake(bpf):
    from agent.capture import Capture

    spec = GuestSpec(transport="modern", scenario="fault")
    (dev,) = learn_devices(spec)
    with Capture(hooks={"mmio", "pio", "msi", "apic", "exit"}, raw_tracepoints=False) as cap:
        assert {s.reason for s in cap.hook_status.values()} == {"tracepoint"}
        run = run_captured(cap, spec, watch=[dev])
    writes = [e for e in run.events if isinstance(e, RegisterAccess) and e.op == Op.WRITE
              and e.addr == dev.status_addr]
    assert [w.value for w in writes] == [w.value for w in run.result.status_writes]
    assert all(w.register == Register.STATUS for w in writes)
    (episode,) = run.result.episodes
    assert any(isinstance(e, RegisterAccess) and e.op == Op.READ
               and e.value == episode.needs_reset_status for e in run.events)
