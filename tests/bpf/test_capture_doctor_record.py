"""`doctor` and `record` on this machine: real BCC, real KVM, the lab guest."""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from agent.events import Op, ProcessExit, RegisterAccess, VmStarted, from_json
from lab.harness import GuestSpec, LabVM, run
from tests.lab.scrape import wait_until

ROOT = Path(__file__).resolve().parents[2]


def test_doctor_matches_the_machine(bpf, capsys):
    from agent import doctor
    from agent.capture.hooks import kallsyms_has, kprobes_problem

    checks = {c.name: c for c in doctor.run_checks()}
    core = [c for c in checks.values() if c.core]
    assert core and all(c.status == doctor.OK for c in core), [c for c in core if c.status != "ok"]
    # optional features: what doctor says must agree with what the kernel offers
    kprobes_ok = kprobes_problem() is None
    assert (checks["kprobes"].status == doctor.OK) == kprobes_ok
    vhost_here = any(os.path.isdir(f"/sys/module/{m}") for m in ("vhost", "vhost_vdpa"))
    assert (checks["vhost"].status == doctor.OK) == vhost_here
    expect_vdpa_hook = kprobes_ok and bool(kallsyms_has(("vdpa_set_status",)))
    assert (checks["hook vhost_kprobe"].status == doctor.OK) == expect_vdpa_hook
    for c in checks.values():
        if c.status in (doctor.FAIL, doctor.UNAVAILABLE):
            assert c.fix and c.detail, c
    assert doctor.main(argparse.Namespace(json=False)) == 0
    out = capsys.readouterr().out
    assert "all core prerequisites OK" in out and "hook mmio" in out


def test_record_writes_the_guest_handshake_as_json_lines(bpf, tmp_path):
    from agent import record

    spec = GuestSpec(transport="modern", scenario="fault")
    (dev,) = run(GuestSpec(transport="modern", scenario="init")).devices
    out = tmp_path / "events.jsonl"
    parser = argparse.ArgumentParser()
    record.add_arguments(parser)
    args = parser.parse_args(["-o", str(out), "--duration", "6",
                              "--watch-status", f"{dev.space}:{dev.status_addr:#x}",
                              "--watch-vector", str(dev.msi_data_config & 0xFF)])
    rc: list[int] = []
    t = threading.Thread(target=lambda: rc.append(record.main(args)))
    t.start()
    deadline = time.monotonic() + 30
    while not out.exists() and t.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert out.exists(), "record never opened its output"
    vm = LabVM.start(spec)
    try:
        result = vm.wait(timeout=30).raise_for_error()
    finally:
        vm.kill()
    t.join(60)
    assert rc == [0]

    events = [from_json(line) for line in out.read_text().splitlines()]
    mine = [e for e in events if e.pid == vm.pid]
    assert isinstance(mine[0], VmStarted), "the VMM's identity must precede its events"
    assert mine[0].name == f"vra-lab-{spec.transport}-{spec.scenario}"
    assert not any(isinstance(e, VmStarted) for e in mine[1:])
    assert any(isinstance(e, ProcessExit) for e in mine)
    writes = [e for e in mine if isinstance(e, RegisterAccess) and e.op == Op.WRITE
              and e.addr == dev.status_addr]
    assert [w.value for w in writes] == [w.value for w in result.status_writes]
    (episode,) = result.episodes
    assert any(isinstance(e, RegisterAccess) and e.op == Op.READ
               and e.value == episode.needs_reset_status for e in mine)


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_record_stops_on_a_signal_even_with_sigint_ignored_at_start(bpf, tmp_path, stop):
    """A shell without job control starts background commands with SIGINT ignored, and a
    KeyboardInterrupt raised in BCC's ring-buffer callback would be swallowed by ctypes: the
    recorder must stop on the signal itself, drain, and print its summary."""
    out, err = tmp_path / "events.jsonl", tmp_path / "record.err"
    with open(err, "wb") as errf:
        proc = subprocess.Popen(
            [sys.executable, "-m", "agent", "record", "-o", str(out), "--pid", "1"],
            cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=errf,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        wait_until("the recorder's hooks", lambda: "hook mmio: attached" in err.read_text(),
                   timeout_s=120, every_s=0.1)
        proc.send_signal(stop)
        assert proc.wait(timeout=60) == 0, err.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert [ln for ln in err.read_text().splitlines() if ln.startswith("record: ")], \
        err.read_text()
