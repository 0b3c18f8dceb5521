"""Fault tests on the real lab (QEMU + KVM + BPF, `run` as a subprocess): ring buffer overflow,
a VM SIGKILLed mid-episode, a new VM after an old one, the agent SIGKILLed and restarted while a
device sits in DEVICE_NEEDS_RESET.

The truth is the guest's own report (lab/harness.py) and the kernel's CLOCK_MONOTONIC, which
the agent's episode timestamps use too. Other sessions (even other runs of this file) may run
VMs on this host at the same time: every VM gets a name unique to this run (`-name`), and
everything is filtered by it. The agents run with `--retain-exited 0`, so an exited VM's device
series go at once (the retention itself is correlation's and export's to test).
"""
from __future__ import annotations

import json
import os
import signal
import time

import pytest

from agent.demo import AgentProcess, match_episodes
from tests.lab.scrape import samples, value, wait_until

ABS_TOL_S = 0.0005
REL_TOL = 0.02
AGE_ROUNDING_NS = 1_000_000      # the exposition's float seconds, rounding of the age
RUN = f"fault{os.getpid()}-"       # VM name prefix unique to this run
AGENT_ARGS = ["--retain-exited", "0"]


# -- helpers ------------------------------------------------------------------------------------

def open_episode_start_bounds(agent: AgentProcess, vm: str) -> tuple[int, int] | None:
    """CLOCK_MONOTONIC start of the VM's open episode, from virtio_device_unrecovered_seconds:
    the agent computes that age at some instant of the scrape, so the start lies between
    (before the scrape - age) and (after it - age), however long a busy host makes the scrape."""
    before = time.monotonic_ns()
    got = samples(agent, "virtio_device_unrecovered_seconds", vm=vm)
    after = time.monotonic_ns()
    if not got:
        return None
    age_ns = int(max(v for _, v in got) * 1e9)
    return before - age_ns - AGE_ROUNDING_NS, after - age_ns + AGE_ROUNDING_NS


def open_episode_start_ns(agent: AgentProcess, vm: str) -> int | None:
    bounds = open_episode_start_bounds(agent, vm)
    return None if bounds is None else bounds[0]


def assert_measured(name: str, result, records) -> str:
    """Every guest episode of `result` is in the agent's log as recovered, within 0.5 ms + 2% of
    the guest's own figure, widened by the guest's own uncertainty about its detecting read
    (issue -> return: wide when the vCPU was preempted; other sessions share the 2 cores)."""
    rows = match_episodes(name, result, records)
    table = "\n".join(map(str, rows))
    guest = {(e.dev, e.ep): e for e in result.episodes}
    assert len(rows) == len(result.episodes) > 0, table
    for row in rows:
        assert row.outcome == "recovered" and row.guest_s is not None, table
        window_s = (guest[(row.dev, row.ep)].needs_reset_window_ns or 0) / 1e9
        assert abs(row.agent_s - row.guest_s) <= ABS_TOL_S + REL_TOL * row.guest_s + window_s, \
            table
    return table


@pytest.fixture
def agent(bpf, kvm):
    # exited VMs' series are kept --retain-exited seconds (1 here, so "state freed" is quick)
    with AgentProcess(stuck_after_s=30, extra_args=["--retain-exited", "1"]) as a:
        yield a


def healthy(agent: AgentProcess) -> None:
    import urllib.request

    assert agent.proc.poll() is None, agent.stderr_tail()
    with urllib.request.urlopen(agent.url + "/healthz", timeout=5) as r:
        assert r.status == 200
    assert not agent.errors_logged(), agent.errors_logged()[:3]


# -- ring buffer overflow -------------------------------------------------------------------------

def test_ringbuf_overflow_is_counted_and_the_agent_recovers(agent):
    """The agent is stopped (SIGSTOP) while a watched VM runs hundreds of episodes: the kernel's
    ring buffer (64 pages) fills, the drops are counted as ringbuf_full, and after SIGCONT the
    agent catches up and measures a later episode exactly."""
    from lab.harness import GuestSpec, LabVM

    lost0 = value(agent, "virtio_agent_events_lost_total", reason="ringbuf_full")
    name = RUN + "ringbuf-flood"
    # 8 devices x 150 episodes, ~8 forwarded status changes each: ~10k records > 4681 slots
    flood = LabVM.start(GuestSpec(transport="modern", scenario="recover", devices=8,
                                  repeat=150, extra_args=("-name", name)))
    stopped = False
    try:
        # the agent must have discovered and watched the devices first (unwatched traffic is
        # rate-limited in the kernel, not queued): wait for its first recovered episode
        wait_until("the agent's first episode of the flood VM",
                   lambda: any(r["vm"] == name for r in agent.records()),
                   every_s=0.01)
        os.kill(agent.proc.pid, signal.SIGSTOP)
        stopped = True
        flood.wait(300)      # a hang guard: 1200 episodes take far longer on a busy host
    finally:
        flood.kill()
        if stopped:
            os.kill(agent.proc.pid, signal.SIGCONT)
    lost = wait_until("ringbuf_full drops on /metrics",
                      lambda: value(agent, "virtio_agent_events_lost_total",
                                    reason="ringbuf_full") - lost0)
    assert lost > 0
    # its exit record came while the ring buffer was full: the agent finds the exit in /proc,
    # and the VM's series go (--retain-exited 1) as after any exit
    wait_until("the flood VM's series gone", lambda: not samples(agent, "virtio_device_info",
                                                                  vm=name))

    # recovery: a VM after the flood is measured as well as ever
    from lab.harness import run
    after = RUN + "ringbuf-after"
    result = run(GuestSpec(transport="modern", scenario="recover", repeat=2, delay_ms=2,
                           extra_args=("-name", after)))
    wait_until("the after-flood VM's episodes in the log", lambda: len(
        [r for r in agent.records() if r["vm"] == after]) >= len(result.episodes))
    table = assert_measured(after, result, agent.records())
    print(f"\nringbuf_full drops counted: {lost:.0f}\n{table}")
    healthy(agent)


# -- VM SIGKILLed mid-episode ---------------------------------------------------------------------

def test_vm_killed_mid_episode_is_abandoned_and_its_state_freed(agent):
    from lab.harness import GuestSpec, LabVM

    name = RUN + "killed"
    ended0 = value(agent, "virtio_episodes_ended_total", outcome="abandoned")
    vm = LabVM.start(GuestSpec(transport="modern", scenario="stuck", devices=2, hold_ms=20000,
                               extra_args=("-name", name)))
    try:
        vm.wait_for_line("needs_reset", timeout=60)       # the guest saw 0x40 (both devices)
        wait_until("both open episodes on /metrics",
                   lambda: len(samples(agent, "virtio_device_unrecovered_seconds", vm=name)) == 2)
        assert len(samples(agent, "virtio_device_info", vm=name)) == 2
        vm.proc.send_signal(signal.SIGKILL)
        vm.proc.wait()
    finally:
        vm.kill()
    wait_until("the killed VM's series to go",
               lambda: not samples(agent, "virtio_device_info", vm=name))
    records = [r for r in agent.records() if r["vm"] == name]
    assert sorted(r["outcome"] for r in records) == ["abandoned", "abandoned"], records
    assert all(r["driver_ok_ns"] is None and r["guest_saw_ns"] is not None for r in records)
    assert value(agent, "virtio_episodes_ended_total", outcome="abandoned") - ended0 >= 2
    assert not samples(agent, "virtio_device_unrecovered_seconds", vm=name)
    # the agent-wide gauge agrees with the per-device series (one scrape: other VMs come and go;
    # an exited VM's devices stay in the series, not in the gauge, for --retain-exited: wait for
    # a scrape with none of those)

    def agree() -> bool:
        text = agent.metrics_text()
        return value(text, "virtio_agent_devices") == len(samples(text, "virtio_device_info"))
    wait_until("the device gauge to agree with the device series", agree)
    healthy(agent)


def test_a_new_vm_after_an_old_one_exits_gets_fresh_state(agent):
    """Same VM name, same device address: the second VM's counters start from zero and its
    episode is measured on its own (pure pid reuse is covered by correlation's unit tests:
    tests/unit/test_correlate_episodes.py, test_correlate_properties.py)."""
    # The second guest waits delay_ms before recovering, so that a scrape sees its open episode;
    # a host too busy to scrape in that time gets another attempt with a longer wait.
    delay_ms = 1500
    for attempt in range(1, RESTART_ATTEMPTS + 1):
        if _fresh_state(agent, RUN + f"fresh-{attempt}", delay_ms):
            return
        delay_ms = min(MAX_GUEST_WAIT_MS, delay_ms * 4)
    pytest.fail(f"in {RESTART_ATTEMPTS} attempts no scrape saw the second VM's open episode")


def _fresh_state(agent: AgentProcess, name: str, delay_ms: int) -> bool:
    from lab.harness import GuestSpec, LabVM

    first = LabVM.start(GuestSpec(transport="modern", scenario="stuck", hold_ms=20000,
                                  extra_args=("-name", name)))
    try:
        wait_until("the first VM's open episode",
                   lambda: samples(agent, "virtio_device_unrecovered_seconds", vm=name))
        assert value(agent, "virtio_device_needs_reset_total", vm=name) == 1
    finally:
        first.kill()
    wait_until("the first VM's series to go",
               lambda: not samples(agent, "virtio_device_info", vm=name))
    second = LabVM.start(GuestSpec(transport="modern", scenario="recover", delay_ms=delay_ms,
                                   extra_args=("-name", name)))

    def open_or_gone() -> tuple[str, str] | None:
        text = agent.metrics_text()     # scraped while the VM runs, or the VM is gone
        if samples(text, "virtio_device_unrecovered_seconds", vm=name):
            return "open", text
        return ("gone", "") if second.proc.poll() is not None else None
    try:
        seen, text = wait_until("the second VM's open episode (or its exit)", open_or_gone)
        if seen == "gone":
            print(f"\n{name}: the guest recovered ({delay_ms} ms) before a scrape; again")
            return False
        # fresh state: one NEEDS_RESET, not the old VM's plus this one
        assert value(text, "virtio_device_needs_reset_total", vm=name) == 1
        assert value(text, "virtio_device_recoveries_total", vm=name) == 0
        result = second.wait(60).raise_for_error()
    finally:
        second.kill()
    records = wait_until("both VMs' episodes in the log", lambda: (
        lambda rs: rs if len(rs) >= 2 else None)([r for r in agent.records() if r["vm"] == name]))
    assert [r["outcome"] for r in records] == ["abandoned", "recovered"], records
    assert_measured(name, result, records[1:])
    assert records[1]["start_ns"] > records[0]["start_ns"]
    healthy(agent)
    return True


# -- the agent SIGKILLed (or stopped) and restarted during NEEDS_RESET ------------------------------
#
# The agent saves what it tracks (devices, open episodes) in its state file at every tick where
# something changed, and at a clean stop. A restarted agent on the same file watches the VM's
# registers again at once and goes on with the open episode: same start, reported once.

def _restart(agent: AgentProcess, vm: str, how=signal.SIGKILL) -> AgentProcess:
    """Stop `agent` (its episode for `vm` still open) and start a new one on its state file."""
    if how == signal.SIGKILL:
        agent.proc.send_signal(signal.SIGKILL)
        agent.proc.wait()
    else:
        assert agent.stop() == 0, agent.stderr_tail()
    assert all(r["outcome"] == "stuck" for r in agent.records() if r["vm"] == vm)
    return AgentProcess(stuck_after_s=agent.stuck_after_s, extra_args=AGENT_ARGS,
                        state_file=agent.state_file).start()


def saved_open_episodes(path: str) -> int:
    """Open episodes in an agent's state file (saved at most once a second)."""
    try:
        with open(path) as f:
            state = json.load(f)["state"]
    except (OSError, ValueError):
        return 0
    return sum("episode" in d for vm in state["vms"] for d in vm["devices"])


# The restart (the new agent compiles its BPF programs with BCC: ~2 s on an idle host, 18 s seen
# beside other sessions' builds) must fit in the time the guest gives before it acts again. An
# attempt where it did not is not a verdict on the agent: it is repeated with a fresh VM that
# gives twice the restart time just measured (the baseline of this run), and each restart time
# is printed as a benchmark.
RESTART_ATTEMPTS = 4
MAX_GUEST_WAIT_MS = 120_000


def _next_wait_ms(current_ms: int, restart_s: float) -> int:
    return min(MAX_GUEST_WAIT_MS, max(current_ms, int(2 * restart_s * 1000) + 2000))


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM], ids=["sigkill", "sigterm"])
def test_agent_restart_while_the_guest_is_in_needs_reset_then_recovers(bpf, kvm, how):
    """The guest saw 0x40 and recovers 10 s later; the agent is killed (SIGKILL: no goodbye;
    SIGTERM: a rolling update) and restarted in between. The new agent measures that episode
    from its real start, within the usual tolerance of the guest's own figure, and logs it once
    (resumed); the guest's next episode is measured as usual."""
    delay_ms = 10000     # the old agent saves, stops; the new one compiles and restores
    for attempt in range(1, RESTART_ATTEMPTS + 1):
        restart_s = _restart_during_recovery(how, attempt, delay_ms)
        if restart_s is None:
            return
        delay_ms = _next_wait_ms(delay_ms, restart_s)
    pytest.fail(f"in {RESTART_ATTEMPTS} attempts the restarted agent was never watching before "
                "the guest's reset: the host was too busy throughout")


def _restart_during_recovery(how, attempt: int, delay_ms: int) -> float | None:
    """One attempt: None when done, else the restart time (s) that was too slow for the guest."""
    from lab.harness import GuestSpec, LabVM

    name = RUN + f"restart-recover-{how.name.lower()}-{attempt}"
    # not `stuck` while the guest waits: one line per episode
    old = AgentProcess(stuck_after_s=max(30, delay_ms // 1000 + 30), extra_args=AGENT_ARGS).start()
    new = None
    try:
        vm = LabVM.start(GuestSpec(transport="modern", scenario="recover", repeat=2,
                                   delay_ms=delay_ms, extra_args=("-name", name)))
        try:
            start_lo, start_hi = wait_until("the old agent's open episode",
                                            lambda: open_episode_start_bounds(old, name))
            start_ns = start_lo
            wait_until("the open episode in the old agent's state file",
                       lambda: saved_open_episodes(old.state_file))
            stop_ns = time.monotonic_ns()
            new = _restart(old, name, how)
            ready_ns = time.monotonic_ns()
            print(f"\nattempt {attempt}: agent restart took {(ready_ns - stop_ns) / 1e9:.2f} s")
            # the new agent must be watching before the guest's reset (episode start + delay)
            if ready_ns >= start_ns + delay_ms * 1_000_000 - 500_000_000:
                print(f"attempt {attempt}: restarted too late for the guest's reset "
                      f"({delay_ms} ms after the episode began); again")
                return (ready_ns - stop_ns) / 1e9
            # taken over at once: the device and its open episode, with the old start
            text = new.metrics_text()
            assert value(text, "virtio_agent_state_restored", what="episodes") >= 1
            assert len(samples(text, "virtio_device_info", vm=name)) == 1
            assert open_episode_start_ns(new, name) is not None
            result = vm.wait(60).raise_for_error()
        finally:
            vm.kill()
        records = wait_until("both episodes' final lines in the new agent's log", lambda: (
            lambda rs: rs if len([r for r in rs if r["outcome"] != "stuck"]) >= 2 else None)(
                [r for r in new.records() if r["vm"] == name]))
        print(f"new agent's log for {name}: {records}")
        assert [r["outcome"] for r in records] == ["recovered", "recovered"], records
        assert [r["resumed"] for r in records] == [True, False], records
        assert start_lo <= records[0]["start_ns"] <= start_hi, (start_lo, start_hi, records)
        table = assert_measured(name, result, records)
        print(table)
        healthy(new)
        return None
    finally:
        if new is not None:
            new.close()          # first: it uses the state file in the old one's directory
        old.close()


def test_agent_restart_while_a_stuck_guest_never_reads_again(bpf, kvm):
    """A guest that saw 0x40 and then leaves the device alone (the `stuck` scenario holds, then
    reads the status once more at exit). The old agent logged it `stuck`; after a SIGKILL and
    restart the device is on /metrics at once, still stuck, with its real age; the VM's exit
    ends the episode `abandoned` once, from its real start."""
    hold_ms = 6000
    for attempt in range(1, RESTART_ATTEMPTS + 1):
        restart_s = _restart_while_stuck(attempt, hold_ms)
        if restart_s is None:
            return
        hold_ms = _next_wait_ms(hold_ms, restart_s)
    pytest.fail(f"in {RESTART_ATTEMPTS} attempts the agent never restarted while the guest still "
                "held: the host was too busy throughout")


def _restart_while_stuck(attempt: int, hold_ms: int) -> float | None:
    """One attempt: None when done, else the restart time (s) the guest did not hold through."""
    from lab.harness import GuestSpec, LabVM

    name = RUN + f"restart-stuck-{attempt}"
    old = AgentProcess(stuck_after_s=1, extra_args=AGENT_ARGS).start()
    new = None
    try:
        vm = LabVM.start(GuestSpec(transport="modern", scenario="stuck", hold_ms=hold_ms,
                                   extra_args=("-name", name)))
        try:
            vm.wait_for_line("needs_reset", timeout=60)
            first_lo, first_hi = wait_until("the old agent's open episode",
                                            lambda: open_episode_start_bounds(old, name))
            wait_until("the old agent's stuck gauge",
                       lambda: value(old, "virtio_device_stuck", vm=name) == 1)
            old_records = wait_until("the old agent's stuck line", lambda: [
                r for r in old.records() if r["vm"] == name])
            assert [r["outcome"] for r in old_records] == ["stuck"]
            stop_ns = time.monotonic_ns()
            new = _restart(old, name)
            restart_s = (time.monotonic_ns() - stop_ns) / 1e9
            print(f"\nattempt {attempt}: agent restart took {restart_s:.2f} s")
            before_scrape = time.monotonic_ns()
            text = new.metrics_text()
            if vm.proc.poll() is not None:
                print(f"attempt {attempt}: the guest stopped holding ({hold_ms} ms) before the "
                      "restart; again")
                return restart_s
            assert value(text, "virtio_device_stuck", vm=name) == 1
            assert len(samples(text, "virtio_device_info", vm=name)) == 1
            age = value(text, "virtio_device_unrecovered_seconds", vm=name)
            # its real age: computed during the scrape, from a start no later than first_hi
            assert age * 1e9 >= before_scrape - first_hi, (age, before_scrape, first_hi)
            result = vm.wait(60).raise_for_error()
            exit_ns = time.monotonic_ns()
        finally:
            vm.kill()
        assert result.final_status[0] & 0x40                  # still in NEEDS_RESET at the end
        records = wait_until("the new agent's line for the exit", lambda: [
            r for r in new.records() if r["vm"] == name])
        print(f"old agent: {old_records}\nnew agent: {records}")
        # no second `stuck` line: the old agent's stands; the exit ends the same episode
        assert [r["outcome"] for r in records] == ["abandoned"], records
        (rec,) = records
        assert rec["start_ns"] == old_records[0]["start_ns"]
        assert first_lo <= rec["start_ns"] <= first_hi, (first_lo, first_hi, rec)
        assert rec["resumed"] is True and rec["evidence"] == old_records[0]["evidence"]
        assert rec["guest_saw_ns"] == old_records[0]["guest_saw_ns"]
        assert first_hi < exit_ns
        healthy(new)
        return None
    finally:
        if new is not None:
            new.close()          # first: it uses the state file in the old one's directory
        old.close()
