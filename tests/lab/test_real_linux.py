"""The real Linux guest (lab/linux): Debian's cloud kernel under QEMU TCG drives virtio-rng, -net
and -blk with its own drivers; the host breaks the device through QMP and the guest's RAM; QEMU's
trace, converted to agent.events and filtered as capture would, goes through the real
correlation. Four boots: a fault per device type, and one clean run through the CLI.

The truth: what the guest lists (/sys/bus/virtio/devices, /proc/interrupts), QEMU's query-pci,
its virtio_error messages and x-query-virtio-status.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import missing, require_tool

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def linux_guest():
    require_tool("qemu-system-x86_64", "QEMU runs the guest (scripts/setup-host installs it)")
    require_tool("apt-get", "the guest is built from Debian packages")
    require_tool("dpkg-deb", "the guest is built from Debian packages")
    from lab.linux.build import BuildError, ensure_guest

    try:
        return ensure_guest()
    except BuildError as exc:
        missing(f"the real Linux guest cannot be built: {exc}")


def _devices_agree(summary: dict) -> None:
    guest = {(d["pci"], d["type"]) for d in summary["guest_devices"]}
    agent = {(d["device"].removeprefix("pci-"), d["type"]) for d in summary["agent_devices"]}
    assert guest and guest == agent, summary
    assert summary["qemu_pci"] in {pci for pci, _ in guest}


@pytest.mark.parametrize("device", ["rng", "net", "blk"])
def test_fault_is_reported_with_its_evidence(linux_guest, device, tmp_path):
    from lab.linux.run import run_linux

    run = run_linux(device, fault=True, workdir=tmp_path)
    s = run.summary()
    _devices_agree(s)
    name = f"pci-{s['qemu_pci']}"
    # QEMU's own account: virtio_error() ran, the device is broken and needs a reset
    assert s["qemu_virtio_errors"], s
    assert s["vmm_status"]["broken"] is True
    assert [g["status"] for g in s["guest_status_at_end"]] == [0x4F]
    # Linux saw the config interrupt and did nothing else (/proc/interrupts)
    [config] = [ln for ln in s["guest_irqs"]["final"] if ln["name"].endswith("-config")]
    assert config["count"] == 1
    # the agent: suspected from kernel evidence, then confirmed by QEMU at that interrupt
    [suspicion] = [r for r in s["agent_needs_reset"] if r["evidence"] == "suspicion"]
    [episode] = [r for r in s["agent_needs_reset"] if r["evidence"] == "vmm"]
    assert suspicion["device"] == episode["device"] == name
    assert episode["start_ns"] == suspicion["since_ns"] and episode["type"] == device
    assert run.correlation["stats"].get("late_events", 0) == 0


def test_clean_run_through_the_cli_reports_nothing(linux_guest, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "lab", "linux", "--device", "net", "--workdir", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    s = json.loads(proc.stdout.strip().splitlines()[-1])
    _devices_agree(s)
    assert s["agent_needs_reset"] == [] and s["qemu_virtio_errors"] == []
    assert s["vmm_status"]["broken"] is False
    assert [g["status"] for g in s["guest_status_at_end"]] == [0x0F]
    assert (tmp_path / "events.jsonl").stat().st_size > 0
