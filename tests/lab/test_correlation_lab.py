"""Acceptance test of correlation on the lab: the agent (`run` as a subprocess, real BPF on KVM)
against what lab guests (lab/harness.py) did and measured with their own TSC.

- fault + recover (modern virtio-pci and virtio-mmio, 2 devices, 2 episodes each, the guest
  waiting 0, 5 or 50 ms before it resets): every guest episode is in the agent's episode log as
  `recovered`, and the agent's recovery time matches the guest's within max(50 us, 2 %) plus the
  guest's own uncertainty about its detecting read (see `assert_recoveries_measured`);
- legacy virtio-pci: QEMU 7.2 never shows NEEDS_RESET there (`virtio_error()` sets the bit and
  sends the config interrupt only `if (virtio_vdev_has_feature(vdev, VIRTIO_F_VERSION_1))`, and
  a legacy driver cannot negotiate VERSION_1; the device is only marked broken). So the agent has
  no episode to report, and the test asserts that truth: the guest's poll times out, QEMU printed
  the error, the agent logs no episode and counts no NEEDS_RESET, and what it does report (the
  devices, their transport, the status the guest left, the resets it wrote) equals the guest's
  own report;
- `stuck`: a `stuck` line, virtio_device_stuck 1 while the guest holds, `abandoned` at its exit;
- `fail`: the FAILED writes are counted (virtio_driver_failed_total) as the guest made them, and
  the episodes still recover (reset after FAILED is allowed);
- conformance: `bitclear` and `failreinit` give virtio_spec_violations_total{rule=...} exactly as
  many as the guest committed (computed from the guest's own status writes with the virtio
  spec's rule, "Driver Requirements: Device Status Field": "The driver MUST NOT clear a device
  status bit. If the driver sets the FAILED bit, the driver MUST later reset the device before
  attempting to re-initialize it."), and
  every clean guest of this file has all four violation counters at 0.

One agent serves the whole module. Other sessions may run VMs on this host at the same time:
every VM is named with a prefix unique to this run and everything is filtered by it. The agent
keeps an exited VM's series for --retain-exited (120 s by default), which is what lets the
tests read a VM's counters after it exited.
"""
from __future__ import annotations

import os
import time

import pytest

from agent.demo import AgentProcess, format_table, match_episodes, same_device
from agent.model import Rule
from tests.lab.scrape import samples, value, wait_until

pytestmark = [pytest.mark.kvm, pytest.mark.bpf]

RUN = f"corr{os.getpid()}-"         # VM name prefix unique to this run
STUCK_AFTER_S = 1.0
# a running guest does not fault again within milliseconds: time for the agent to install what
# it learnt (reorder window 50 ms + a tick) between bring-up / recovery and the next fault
FAULT_DELAY_MS = 300
# the rule: agent vs guest recovery time within 50 us or 2 % (whichever is larger) ...
ABS_TOL_S = 50e-6
REL_TOL = 0.02
# ... plus the guest's uncertainty about when its detecting read completed (per episode)
# The attribution window `run` uses (no flag changes it): 200 ms. A constant of
# the test, not read from the agent (docs/correlation.md): a change there must show up here.
NOTIFY_WINDOW_NS = 200_000_000

# virtio 1.x device status bits (the spec's, not the agent's constants)
ACKNOWLEDGE, DRIVER, DRIVER_OK, FEATURES_OK = 0x01, 0x02, 0x04, 0x08
NEEDS_RESET, FAILED = 0x40, 0x80
INIT_BITS = ACKNOWLEDGE | DRIVER | DRIVER_OK | FEATURES_OK
AGENT_TRANSPORT = {"modern": "pci-modern", "legacy": "pci-legacy", "mmio": "mmio"}

# (what, agent - guest s, guest read window s, allowed s) of every episode compared in the module
DIFFS: list[tuple[str, float, float, float]] = []


# -- helpers ------------------------------------------------------------------------------------

def vm_records(agent: AgentProcess, name: str) -> list[dict]:
    return [r for r in agent.records() if r["vm"] == name]


def guest_device(label: str, transport: str, result):
    """The guest's device (DeviceInfo) the agent's device label names; fails if none."""
    found = [d for d in result.devices if same_device(label, transport, d)]
    assert len(found) == 1, (label, transport, result.devices)
    return found[0]


def records_by_device(records: list[dict], result) -> dict[int, list[dict]]:
    """The agent's records per guest device index (matched by PCI address or status register
    address), in start order. Records of no guest device fail the test."""
    out: dict[int, list[dict]] = {d.idx: [] for d in result.devices}
    for r in sorted(records, key=lambda r: (r["start_ns"], r["outcome"] != "stuck")):
        out[guest_device(r["device"], r["transport"], result).idx].append(r)
    return out


def per_device(agent: AgentProcess, name: str, metric: str, result,
               text: str | None = None) -> dict[int, float]:
    """metric{vm=name} per guest device index."""
    out = {}
    for labels, v in samples(text or agent, metric, vm=name):
        info = samples(text or agent, "virtio_device_info", vm=name, device=labels["device"])
        (info_labels, _), = info
        out[guest_device(labels["device"], info_labels["transport"], result).idx] = v
    return out


def violations(agent: AgentProcess, name: str, text: str | None = None) -> dict[str, float]:
    return {labels["rule"]: v
            for labels, v in samples(text or agent, "virtio_spec_violations_total", vm=name)}


def committed_violations(result) -> dict[str, int]:
    """The driver-side rules, applied to the guest's own status writes (its report), per device:
    a write lacking an init bit the current status (the previous write) has, without a write of 0
    in between; after FAILED, a write without FAILED before a reset (that one instead)."""
    counts = dict.fromkeys(Rule.ALL, 0)
    for dev in result.devices:
        prev, failed = None, False
        for w in (w for w in result.status_writes if w.dev == dev.idx):
            if w.value == 0:
                prev, failed = 0, False
                continue
            if prev is not None:
                if failed and not w.value & FAILED:
                    counts[Rule.REINIT_AFTER_FAILED] += 1
                elif prev & INIT_BITS & ~w.value:
                    counts[Rule.BIT_CLEARED_WITHOUT_RESET] += 1
            prev, failed = w.value, bool(w.value & FAILED)
    return counts


def failed_writes(result) -> dict[int, int]:
    """Per device: status writes that newly set FAILED (the guest's report)."""
    out = {}
    for dev in result.devices:
        n, prev = 0, 0
        for w in (w for w in result.status_writes if w.dev == dev.idx):
            n += bool(w.value & FAILED and not prev & FAILED)
            prev = w.value
        out[dev.idx] = n
    return out


def resets_written(result) -> dict[int, int]:
    return {d.idx: sum(1 for w in result.status_writes if w.dev == d.idx and w.value == 0)
            for d in result.devices}


def assert_clean(agent: AgentProcess, name: str, text: str | None = None) -> None:
    """A clean guest: all four violation series of its VM exist and are 0."""
    got = violations(agent, name, text)
    assert set(got) == set(Rule.ALL), got
    assert all(v == 0 for v in got.values()), got


def assert_devices_reported(agent: AgentProcess, name: str, result, text: str) -> None:
    """The agent's device series of the VM are the guest's devices, with their transport."""
    info = samples(text or agent, "virtio_device_info", vm=name)
    named = sorted(guest_device(lb["device"], lb["transport"], result).idx for lb, _ in info)
    assert named == sorted(d.idx for d in result.devices), (info, result.devices)
    for lb, _ in info:
        if lb["device"].startswith("pci-"):     # its enumeration was seen: its type too
            assert lb["type"] == "rng", lb
    assert {lb["transport"] for lb, _ in info} == \
        {AGENT_TRANSPORT[d.transport] for d in result.devices}


def healthy(agent: AgentProcess) -> None:
    assert agent.proc.poll() is None, agent.stderr_tail()
    assert not agent.errors_logged(), agent.errors_logged()[:3]


def assert_recoveries_measured(name: str, result, records: list[dict]) -> list[str]:
    """Every guest episode is one `recovered` record of the same device, in order, and the
    agent's time matches the guest's.

    What each side measures: the guest, from its first status read showing 0x40 (TSC right after
    the value arrived) to its DRIVER_OK write (TSC right before it). The agent's
    `recovery_seconds` runs from the episode start to the DRIVER_OK write the kernel saw, and the
    start is that first 0x40 read (`evidence` status_read: start == guest_saw_ns) or, when the
    agent attributed a config interrupt to the device, that interrupt (evidence
    config_interrupt), which precedes the read by the time the guest took to look. So the
    figure compared with the guest's is the agent's guest_saw_ns -> driver_ok_ns, which is
    recovery_seconds itself for status_read episodes; for config_interrupt ones the start is
    checked to lie within the notify window before guest_saw_ns.

    Tolerance: max(50 us, 2 % of the guest's figure) + the guest's issue -> return window of its
    detecting read (Episode.needs_reset_window_ns): the kernel completed that read somewhere in
    it; it is a few tens of us, and wide when the vCPU thread was preempted around the access
    (2 shared cores)."""
    lines = []
    by_dev = records_by_device(records, result)
    for dev in result.devices:
        guest_eps = result.episodes_of(dev.idx)
        recs = by_dev[dev.idx]
        assert [r["outcome"] for r in recs] == ["recovered"] * len(guest_eps), (dev, recs)
        for g, r in zip(guest_eps, recs):
            assert g.recovery_ns is not None and g.needs_reset_status & NEEDS_RESET, g
            # which evidence: test_config_interrupt_opens_every_episode_of_a_device
            assert r["evidence"] in ("status_read", "config_interrupt"), r
            assert r["resumed"] is False and r["transport"] == AGENT_TRANSPORT[dev.transport], r
            saw, ok, start = r["guest_saw_ns"], r["driver_ok_ns"], r["start_ns"]
            assert saw is not None and ok is not None, r
            if r["evidence"] == "status_read":
                assert start == saw, r
            else:
                assert saw - NOTIFY_WINDOW_NS <= start <= saw, r
            assert r["reset_written_ns"] is not None and r["reset_done_ns"] is not None, r
            assert saw <= r["reset_written_ns"] <= r["reset_done_ns"] <= ok, r
            assert r["recovery_seconds"] == pytest.approx((ok - start) / 1e9, abs=2e-9), r
            # the delay the guest injected lies between its 0x40 read and its reset
            assert r["reset_written_ns"] - saw >= result.spec.delay_ms * 1_000_000, r

            guest_s = g.recovery_ns / 1e9
            agent_s = (ok - saw) / 1e9
            window_s = (g.needs_reset_window_ns or 0) / 1e9
            allowed = max(ABS_TOL_S, REL_TOL * guest_s) + window_s
            diff = agent_s - guest_s
            DIFFS.append((f"{name} dev{dev.idx} ep{g.ep}", diff, window_s, allowed))
            lines.append(f"  {name} dev{dev.idx} ep{g.ep} {r['evidence']:<16} agent "
                         f"{agent_s * 1e3:8.3f} ms  guest {guest_s * 1e3:8.3f} ms  diff "
                         f"{diff * 1e6:+8.1f} us  read window {window_s * 1e6:7.1f} us  "
                         f"allowed {allowed * 1e6:7.1f} us")
            assert abs(diff) <= allowed, "\n".join(lines)
    return lines


# -- fixtures ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def agent():
    """One agent for the module (`bpf`/`kvm` are function-scoped: their check is called here,
    and every test takes the fixtures too)."""
    from tests.conftest import require_bpf

    require_bpf()
    with AgentProcess(stuck_after_s=STUCK_AFTER_S) as a:
        yield a
        if DIFFS:
            worst = max(DIFFS, key=lambda d: abs(d[1]))
            excess = max(DIFFS, key=lambda d: abs(d[1]) - d[2])
            tight = max(DIFFS, key=lambda d: abs(d[1]) / d[3])
            print(f"\n{len(DIFFS)} episodes compared. max |agent - guest| = "
                  f"{abs(worst[1]) * 1e6:.1f} us ({worst[0]}: read window "
                  f"{worst[2] * 1e6:.1f} us, allowed {worst[3] * 1e6:.1f} us); max beyond the "
                  f"read window = {(abs(excess[1]) - excess[2]) * 1e6:+.1f} us ({excess[0]}); "
                  f"closest to its limit: {tight[0]} {abs(tight[1]) * 1e6:.1f} of "
                  f"{tight[3] * 1e6:.1f} us")
        assert a.stop() == 0, a.stderr_tail()
        assert not a.errors_logged(), a.errors_logged()[:3]


def named_spec(name: str, **kw):
    from lab.harness import GuestSpec

    return GuestSpec(extra_args=("-name", name), **kw)


def run_guest(name: str, **kw):
    from lab.harness import run

    return run(named_spec(name, **kw))


def settled_records(agent: AgentProcess, name: str, expected: int) -> list[dict]:
    """The VM's records once `expected` are there, and still that many after the reorder window
    and a tick (nothing more comes)."""
    wait_until(f"{expected} episode records of {name}",
               lambda: len(vm_records(agent, name)) >= expected)
    time.sleep(0.3)
    records = vm_records(agent, name)
    assert len(records) == expected, records
    return records


# -- fault + recover: recovery time agent vs guest -----------------------------------------------

@pytest.mark.parametrize("delay_ms", [0, 5, 50])
@pytest.mark.parametrize("transport", ["modern", "mmio"])
def test_recovery_time_matches_the_guest(agent, bpf, kvm, transport, delay_ms):
    name = f"{RUN}recover-{transport}-{delay_ms}ms"
    result = run_guest(name, transport=transport, scenario="recover", devices=2, repeat=2,
                       delay_ms=delay_ms, fault_delay_ms=FAULT_DELAY_MS)
    assert len(result.episodes) == result.spec.devices * result.spec.repeat
    records = settled_records(agent, name, len(result.episodes))
    print("\n" + format_table(match_episodes(name, result, records)))
    print("\n".join(assert_recoveries_measured(name, result, records)))

    text = agent.metrics_text()
    assert_devices_reported(agent, name, result, text)
    guest_eps = {d.idx: len(result.episodes_of(d.idx)) for d in result.devices}
    assert per_device(agent, name, "virtio_device_needs_reset_total", result, text) == guest_eps
    assert per_device(agent, name, "virtio_device_recoveries_total", result, text) == guest_eps
    assert per_device(agent, name, "virtio_device_resets_total", result, text) == \
        resets_written(result)
    assert per_device(agent, name, "virtio_device_status", result, text) == result.final_status
    assert not samples(text or agent, "virtio_device_unrecovered_seconds", vm=name)
    assert_clean(agent, name, text)
    healthy(agent)


@pytest.mark.parametrize("transport", ["modern", "mmio"])
def test_config_interrupt_opens_every_episode_of_a_device(agent, bpf, kvm, transport):
    """QEMU notifies every NEEDS_RESET of a VERSION_1 device (docs/correlation.md, "Config
    interrupts"). Modern: the episode starts at that interrupt, on the vector of the MSI-X entry
    the guest programmed for config changes. virtio-mmio on microvm: the line goes through
    QEMU's IOAPIC (split irqchip) to a vector no device register tells, so the interrupt is
    counted (each InterruptACK write) but not timed: the episode starts at the guest's read."""
    name = f"{RUN}notify-{transport}"
    result = run_guest(name, transport=transport, scenario="recover", devices=1, repeat=3,
                       delay_ms=5, fault_delay_ms=FAULT_DELAY_MS)
    records = settled_records(agent, name, len(result.episodes))
    print("\n".join(assert_recoveries_measured(name, result, records)))
    # An episode starts at the config interrupt only when it came on the device's exact vector
    # or line as the guest programmed it (docs/correlation.md, "Config interrupts"); when that
    # programming was not seen in time, or the line is not in any register (virtio-mmio), it
    # starts at the guest's read and has no notify phase: never a number from another interrupt.
    for r in records:
        assert r["evidence"] in ("config_interrupt", "status_read"), r
        if r["evidence"] == "config_interrupt":
            # the interrupt precedes the guest's read by the time the guest took to poll
            assert 0 < r["guest_saw_ns"] - r["start_ns"] < 5_000_000, r
        else:
            assert r["start_ns"] == r["guest_saw_ns"], r    # no notify phase
    # modern: the guest's MSI-X programming was seen (enumeration after the agent started), so
    # every episode starts at its interrupt; virtio-mmio: the line is in no register
    want = "status_read" if transport == "mmio" else "config_interrupt"
    assert {r["evidence"] for r in records} == {want}, records
    text = agent.metrics_text()
    assert per_device(agent, name, "virtio_config_interrupts_total", result, text) == {0: 3}
    assert_clean(agent, name, text)
    healthy(agent)


# -- legacy: no NEEDS_RESET in QEMU, so no episode ----------------------------------------------

@pytest.mark.parametrize("scenario", ["fault", "recover"])
def test_legacy_fault_gives_no_needs_reset_and_no_episode(agent, bpf, kvm, scenario):
    """QEMU 7.2 hw/virtio/virtio.c virtio_error(): NEEDS_RESET and the config interrupt only
    with VERSION_1, which a legacy device never has. The guest's fault breaks the device (QEMU
    prints the error) but its status keeps 0x0f; `recover` then resets and re-initialises it
    anyway when its poll times out (a watchdog-style reset), which the agent sees as a reset,
    not an episode."""
    name = f"{RUN}legacy-{scenario}"
    result = run_guest(name, transport="legacy", scenario=scenario, devices=2, detect_ms=50,
                       delay_ms=5)
    # the guest's truth: the fault happened, NEEDS_RESET never showed
    assert len(result.episodes) == 2
    assert all(e.timed_out and e.needs_reset_status is None for e in result.episodes)
    assert len(result.virtio_errors) == len(result.episodes), result.virtio_errors
    assert all(not v & NEEDS_RESET for v in result.final_status.values()), result.final_status

    # the agent saw the devices and every status write, and the VM's exit
    expected_resets = resets_written(result)
    wait_until(f"{name}'s resets on /metrics",
               lambda: per_device(agent, name, "virtio_device_resets_total", result)
               == expected_resets)
    time.sleep(0.3)                                   # reorder window + tick
    text = agent.metrics_text()
    assert_devices_reported(agent, name, result, text)
    assert per_device(agent, name, "virtio_device_resets_total", result, text) == \
        expected_resets
    assert per_device(agent, name, "virtio_device_status", result, text) == result.final_status
    zeros = {d.idx: 0 for d in result.devices}
    assert per_device(agent, name, "virtio_device_needs_reset_total", result, text) == zeros
    assert per_device(agent, name, "virtio_device_recoveries_total", result, text) == zeros
    assert per_device(agent, name, "virtio_config_interrupts_total", result, text) == zeros
    assert per_device(agent, name, "virtio_driver_failed_total", result, text) == zeros
    assert not samples(text or agent, "virtio_device_unrecovered_seconds", vm=name)
    assert vm_records(agent, name) == []
    assert_clean(agent, name, text)
    print(f"\n{name}: guest status writes {[hex(w.value) for w in result.status_writes]}, "
          f"QEMU: {result.virtio_errors}; agent: resets {expected_resets}, no episode")
    healthy(agent)


# -- stuck ----------------------------------------------------------------------------------------

def test_stuck_guest_is_reported_stuck_then_abandoned(agent, bpf, kvm):
    """The guest sees 0x40 on both devices and holds 3 s without touching them (agent:
    --stuck-after 1 s); it reads the status once more when it exits."""
    from lab.harness import LabVM

    name = f"{RUN}stuck"

    def all_stuck():
        got = samples(agent, "virtio_device_stuck", vm=name)
        return got if len(got) == 2 and all(v == 1 for _, v in got) else None

    def stuck_records():
        got = [r for r in vm_records(agent, name) if r["outcome"] == "stuck"]
        return got if len(got) == 2 else None

    vm = LabVM.start(named_spec(name, transport="modern", scenario="stuck", devices=2,
                                hold_ms=3000))
    try:
        vm.wait_for_line("needs_reset", timeout=10)
        stuck = wait_until(f"virtio_device_stuck 1 for both devices of {name}", all_stuck,
                           timeout_s=STUCK_AFTER_S + 5)
        holding = vm.proc.poll() is None
        text = agent.metrics_text()
        ages = [v for _, v in samples(text or agent, "virtio_device_unrecovered_seconds", vm=name)]
        stuck_lines = wait_until(f"{name}'s stuck lines", stuck_records, timeout_s=5)
        assert holding, "the guest stopped holding before the agent said stuck"
        assert len(stuck) == 2 and value(text or agent, "virtio_devices_stuck") >= 2
        assert len(ages) == 2 and min(ages) >= STUCK_AFTER_S, ages
        result = vm.wait(30).raise_for_error()
    finally:
        vm.kill()
    records = settled_records(agent, name, 4)
    print(f"\n{name}: {[(r['device'], r['outcome']) for r in stuck_lines]} while holding\n" +
          format_table(match_episodes(name, result, records)))

    assert all(e.needs_reset_status & NEEDS_RESET and not e.writes for e in result.episodes)
    assert all(v & NEEDS_RESET for v in result.final_status.values()), result.final_status
    for dev in result.devices:
        (g,) = result.episodes_of(dev.idx)
        recs = records_by_device(records, result)[dev.idx]
        assert [r["outcome"] for r in recs] == ["stuck", "abandoned"], recs
        first, last = recs
        for key in ("start_ns", "guest_saw_ns", "evidence", "device"):
            assert first[key] == last[key], recs
        assert last["driver_ok_ns"] is None and last["recovery_seconds"] is None
        assert last["reset_written_ns"] is None and first["guest_saw_ns"] is not None
    text = agent.metrics_text()
    assert not samples(text or agent, "virtio_device_stuck", vm=name)   # no open episode left
    ones = {d.idx: 1 for d in result.devices}
    assert per_device(agent, name, "virtio_device_needs_reset_total", result, text) == ones
    assert per_device(agent, name, "virtio_device_recoveries_total", result, text) == \
        {d.idx: 0 for d in result.devices}
    assert_clean(agent, name, text)
    healthy(agent)


# -- fail -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("transport", ["modern", "mmio"])
def test_failed_is_reported_as_the_guest_wrote_it(agent, bpf, kvm, transport):
    name = f"{RUN}fail-{transport}"
    result = run_guest(name, transport=transport, scenario="fail", devices=2, repeat=2,
                       delay_ms=5, fault_delay_ms=FAULT_DELAY_MS)
    fails = failed_writes(result)
    assert all(n == len(result.episodes_of(i)) for i, n in fails.items()), fails
    records = settled_records(agent, name, len(result.episodes))
    print("\n" + format_table(match_episodes(name, result, records)))
    # FAILED (0xcf) then a reset: allowed, and the episode still recovers at DRIVER_OK
    print("\n".join(assert_recoveries_measured(name, result, records)))
    text = agent.metrics_text()
    assert per_device(agent, name, "virtio_driver_failed_total", result, text) == fails
    assert per_device(agent, name, "virtio_device_resets_total", result, text) == \
        resets_written(result)
    assert_clean(agent, name, text)
    healthy(agent)


# -- conformance violations ---------------------------------------------------------------------

@pytest.mark.parametrize("transport", ["modern", "mmio"])
@pytest.mark.parametrize("scenario", ["bitclear", "failreinit"])
def test_scripted_violations_are_reported_exactly(agent, bpf, kvm, scenario, transport):
    """delay_ms: the guest waits after its bring-up, so the agent has discovered and watches
    the status registers before the guest misbehaves."""
    name = f"{RUN}{scenario}-{transport}"
    result = run_guest(name, transport=transport, scenario=scenario, devices=2, delay_ms=250)
    expected = committed_violations(result)
    assert sum(expected.values()) == len(result.devices), (expected, result.status_writes)
    wait_until(f"{name}'s violations", lambda: violations(agent, name) == expected)
    time.sleep(0.3)                                   # nothing more comes
    text = agent.metrics_text()
    assert violations(agent, name, text) == expected
    print(f"\n{name}: guest writes {[(w.dev, hex(w.value)) for w in result.status_writes]}"
          f" -> committed {expected}; agent {violations(agent, name, text)}")
    if scenario == "failreinit":
        # the 0x40 episode is never recovered (no reset): abandoned at exit
        assert per_device(agent, name, "virtio_driver_failed_total", result, text) == \
            failed_writes(result)
        records = settled_records(agent, name, len(result.devices))
        assert sorted(r["outcome"] for r in records) == ["abandoned"] * len(result.devices)
        assert per_device(agent, name, "virtio_device_recoveries_total", result, text) == \
            {d.idx: 0 for d in result.devices}
    else:
        assert vm_records(agent, name) == []
    assert per_device(agent, name, "virtio_device_status", result, text) == result.final_status
    healthy(agent)
