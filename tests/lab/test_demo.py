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
