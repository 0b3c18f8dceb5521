"""Pure tests of the doctor/record command plumbing (no BPF)."""
from __future__ import annotations

import argparse

import pytest

from agent import doctor, record


def test_parse_space_addr():
    assert record.parse_space_addr("mmio:0xfebf0014") == ("mmio", 0xFEBF0014)
    assert record.parse_space_addr("pio:49170") == ("pio", 49170)
    for bad in ("0x10", "dma:0x10", "mmio:zz", "pio:-1"):
        with pytest.raises(argparse.ArgumentTypeError):
            record.parse_space_addr(bad)


def test_record_requires_output():
    p = argparse.ArgumentParser()
    record.add_arguments(p)
    with pytest.raises(SystemExit):
        p.parse_args([])
    args = p.parse_args(["-o", "x", "--watch-status", "pio:0xc012", "--pid", "5"])
    assert args.watch_status == [("pio", 0xC012)] and args.pid == [5]


def test_doctor_exit_code_and_table(monkeypatch, capsys):
    checks = [doctor.Check("BCC", doctor.FAIL, "import bcc failed", "apt-get install x", core=True),
              doctor.Check("kprobes", doctor.UNAVAILABLE, "no kprobes", "optional")]
    monkeypatch.setattr(doctor, "run_checks", lambda: checks)
    assert doctor.main(argparse.Namespace(json=False)) == 1
    out = capsys.readouterr().out
    assert "fix: apt-get install x" in out and "1 core prerequisite(s) failed" in out
    checks[0] = doctor.Check("BCC", doctor.OK, "bcc", core=True)
    assert doctor.main(argparse.Namespace(json=True)) == 0


def test_unknown_family_and_bad_sizes_are_rejected():
    from agent.capture import Capture

    with pytest.raises(ValueError, match="unknown hook families"):
        Capture(hooks={"mmio", "kprobe_everything"})
    with pytest.raises(ValueError, match="power of two"):
        Capture(ringbuf_pages=3)
