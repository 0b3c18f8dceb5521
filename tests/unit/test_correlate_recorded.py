"""Replay real recordings (capture on the lab guest) and compare with the guest's own report."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent.correlate import Correlator, CorrelatorConfig
from agent.events import ProcessExit
from agent.model import Outcome, Rule
from agent.replay import parse_line, replay

FIXTURES = Path(__file__).parent / "fixtures" / "correlate"
RUNS = sorted(p.name[:-len(".jsonl")] for p in FIXTURES.glob("*.jsonl"))


def load(name):
    guest = json.loads((FIXTURES / f"{name}.guest.json").read_text())
    with open(FIXTURES / f"{name}.jsonl") as f:
        episodes, violations, snap, stats, bad = replay(f, name, CorrelatorConfig())
    assert bad == [] and stats["late_events"] == 0
    return guest, episodes, violations, snap


def before_exit(name):
    """The snapshot just before the VMM exited (after it, the VM and its devices are gone)."""
    c = Correlator(CorrelatorConfig())
    last = 0
    for line in (FIXTURES / f"{name}.jsonl").read_text().splitlines():
        ev = parse_line(line)
        if isinstance(ev, ProcessExit):
            break
        c.feed(ev)
        last = max(last, ev.ts_ns)
    c.flush()
    return c.snapshot(last)


def device_id_of(dev):
    offset = 0x14 if dev["space"] == "mmio" and dev["status_addr"] % 0x200 != 0x70 else 0x70
    if dev["space"] == "pio":
        offset = 18
    return f"{dev['space']}-0x{dev['status_addr'] - offset:x}"


def test_there_are_recordings():
    assert len(RUNS) >= 4


@pytest.mark.parametrize("name", RUNS)
def test_every_guest_device_is_discovered_with_its_transport(name):
    guest, _, _, _ = load(name)
    snap = before_exit(name)
    found = {v.device: v for v in snap.devices}
    for dev in guest["devices"]:
        assert device_id_of(dev) in found
    transport = guest["spec"]["transport"]
    want = {"modern": "pci-modern", "legacy": "pci-legacy", "mmio": "mmio"}[transport]
    assert {v.transport for v in snap.devices} == {want}
    assert all(v.vm.name == f"vra-lab-{transport}-{guest['spec']['scenario']}"
               for v in snap.devices)


@pytest.mark.parametrize("name", RUNS)
def test_episodes_are_the_guests_episodes(name):
    guest, episodes, violations, _ = load(name)
    devs = {d["idx"]: device_id_of(d) for d in guest["devices"]}
    for idx, dev_id in devs.items():
        mine = [e for e in episodes if e.device == dev_id]
        theirs = [e for e in guest["episodes"] if e["dev"] == idx and not e["timed_out"]]
        assert len(mine) == len(theirs), (dev_id, mine, theirs)
        for m, t in zip(mine, theirs):
            writes = t["status_values"]
            if 0 in writes:
                # a reset: the agent saw the same re-initialisation and calls it a recovery
                assert m.outcome == Outcome.RECOVERED
                assert m.reinit_values == writes[writes.index(0) + 1:]
                # same episode: guest TSC and host clock agree on the recovery time
                ratio = m.recovery_seconds * 1e9 / t["recovery_ns"]
                assert 0.8 < ratio < 1.25, (ratio, m, t)
                for phase, key in (("reset", "reset_latency_ns"),):
                    assert abs(m.phase_seconds()[phase] * 1e9 - t[key]) < 0.2 * t[key] + 100_000
            else:
                # re-initialised without a reset: still broken, never called recovered
                assert m.outcome == Outcome.ABANDONED and m.driver_ok_ns is None
    rules = sorted(v.rule for v in violations)
    scenario = guest["spec"]["scenario"]
    if scenario == "failreinit":
        assert rules == [Rule.REINIT_AFTER_FAILED] * len(devs)
    else:
        assert rules == []


def test_fail_counts_failed_writes():
    guest, _, _, _ = load("modern-fail-msix")
    snap = before_exit("modern-fail-msix")
    per_dev = {v.device: v for v in snap.devices}
    for dev in guest["devices"]:
        n = sum(1 for e in guest["episodes"] if e["dev"] == dev["idx"]
                for w in e["status_values"] if w & 0x80)
        assert per_dev[device_id_of(dev)].failed_total == n > 0
