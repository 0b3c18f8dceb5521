"""`make demo` (python -m agent.demo) end to end: real agent, real KVM guests."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_demo_runs_and_every_guest_episode_has_the_agents_figure(bpf, kvm):
    from agent.demo import demo_specs

    proc = subprocess.run([sys.executable, "-m", "agent.demo"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:] + proc.stderr[-2000:]
    assert "agent exit code on SIGTERM: 0" in out
    table = out[out.index("== episodes"):out.index("\nagent ms:")]
    rows = [line.split() for line in table.splitlines()[2:] if line.strip()]
    recover, (stuck_name, _) = demo_specs()
    expected = {name: spec.devices * spec.repeat for name, spec in recover}
    seen = {name: sum(1 for r in rows if r[0] == name and r[5] == "recovered") for name in expected}
    assert seen == expected, table
    assert [r[5] for r in rows if r[0] == stuck_name] == ["abandoned"], table
    # agent and guest agree on what both measured (columns agent ms, guest ms): within
    # max(50 us, 2 %) plus the guest's own uncertainty, the time its detecting read spent in the
    # host (the "read window" column, wide when its vCPU was preempted there)
    for r in rows:
        if r[5] == "recovered":
            agent_ms, guest_ms, window_ms = float(r[6]), float(r[7]), float(r[13])
            assert abs(agent_ms - guest_ms) <= max(0.05, 0.02 * guest_ms) + window_ms, r
    assert re.search(r'virtio_devices_stuck(\{[^}]*\})? 1', out), "stuck gauge never shown"
    # every device of every demo VM named and typed as QEMU's query-pci has it
    checks = out[out.index("== devices"):out.index("\ndevice check:")]
    devs = [line.split() for line in checks.splitlines()[2:] if line.strip()]
    pci = [r for r in devs if r[1].startswith("pci-")]
    assert len(pci) == sum(s.devices + bool(s.extra) for _, s in recover
                           if s.transport != "mmio") + 1, checks            # + demo-stuck's
    assert all(r[2] == r[3] and r[4] == "ok" for r in pci), checks
    assert {r[2] for r in pci} == {"rng", "blk"}, checks
    # virtio-mmio: named by its window; its type is QEMU's, or unknown (capture does not
    # forward the DeviceID read): reported as not checked, never as another type
    mmio = [r for r in devs if r[1].startswith("mmio-")]
    assert len(mmio) == sum(s.devices for _, s in recover if s.transport == "mmio"), checks
    assert all((r[2], r[4]) in (("rng", "ok"), ("unknown", "unchecked")) for r in mmio), checks
    assert "device check: " in out and " 0 mismatch(es)" in out, checks


def test_device_check_flags_every_wrong_name_or_type() -> None:
    """The demo's check (agent.demo.check_devices), on what QEMU and the agent could say."""
    from agent.demo import check_devices

    qemu = {"pci-0000:00:02.0": "rng", "pci-0000:00:03.0": "blk"}
    ok = check_devices("vm", qemu, {"pci-0000:00:02.0": "rng", "pci-0000:00:03.0": "blk"})
    assert [(c.device, c.verdict) for c in ok] == [("pci-0000:00:02.0", "ok"),
                                                  ("pci-0000:00:03.0", "ok")]
    # a wrong type, a device missing, a PCI device named by its registers
    bad = check_devices("vm", qemu, {"pci-0000:00:02.0": "net", "mmio-0xc0004000": "unknown"})
    assert [(c.device, c.agent_type, c.qemu_type, c.verdict) for c in bad] == [
        ("pci-0000:00:02.0", "net", "rng", "MISMATCH"),
        ("pci-0000:00:03.0", None, "blk", "MISMATCH"),
        ("mmio-0xc0004000", "unknown", None, "MISMATCH")]
    assert all(c.mismatch for c in bad)
    # virtio-mmio (no PCI): QEMU's type, or unknown (not checked); never another, never more
    mmio = {"qdev:vrng0": "rng"}
    assert [c.verdict for c in check_devices("vm", mmio, {"mmio-0xfeb02e00": "rng"})] == ["ok"]
    assert [c.verdict for c in check_devices("vm", mmio, {"mmio-0xfeb02e00": "unknown"})] == [
        "unchecked"]
    assert [c.verdict for c in check_devices("vm", mmio, {"mmio-0xfeb02e00": "blk"})] == [
        "MISMATCH"]
    extra = check_devices("vm", mmio, {"mmio-0xfeb02e00": "rng", "mmio-0xfeb02c00": "rng"})
    assert [c.verdict for c in extra][-1] == "MISMATCH"
    assert [c.verdict for c in check_devices("vm", mmio, {})] == ["MISMATCH"]
