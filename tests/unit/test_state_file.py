"""agent.state_file on a fixture /proc, and the run loop handing an open episode over a restart."""
from __future__ import annotations

from agent.correlate.checkpoint import VERSION
import io
import json
import time
from pathlib import Path

import pytest

from agent import run
from agent.model import VmIdentity
from agent.state_file import StateFile, process_alive

STAT = "{pid} (qemu-system-x86) S 1 {pid} {pid} 0 -1 4194560 100 0 0 0 5 3 0 0 20 0 4 0 {start} 1000 200"


def fake_proc(tmp_path: Path, boot: str = "boot-1", procs=((4242, 777),)) -> str:
    root = tmp_path / "proc"
    (root / "sys/kernel/random").mkdir(parents=True)
    (root / "sys/kernel/random/boot_id").write_text(boot + "\n")
    for pid, start in procs:
        (root / str(pid)).mkdir()
        (root / str(pid) / "stat").write_text(STAT.format(pid=pid, start=start))
    return str(root)


def test_save_load_round_trip_and_other_boots_are_ignored(tmp_path):
    proc = fake_proc(tmp_path)
    path = str(tmp_path / "state" / "state.json")
    sf = StateFile(path, proc_root=proc)
    assert sf.acquire() is None
    assert sf.load() is None                      # no file yet
    sf.save({"version": VERSION, "vms": []})
    assert sf.load() == {"version": VERSION, "vms": []}
    assert oct(Path(path).stat().st_mode & 0o777) == "0o600"
    assert not Path(path + ".tmp").exists()
    other = StateFile(path, proc_root=fake_proc(tmp_path / "b", boot="boot-2"))
    assert other.load() is None
    sf.close()


def test_a_second_agent_cannot_take_a_file_in_use(tmp_path):
    proc = fake_proc(tmp_path)
    path = str(tmp_path / "state.json")
    first, second = StateFile(path, proc_root=proc), StateFile(path, proc_root=proc)
    assert first.acquire() is None
    assert "in use by another agent" in second.acquire()
    first.close()
    assert second.acquire() is None
    second.close()


def test_unusable_files_are_ignored_with_a_reason(tmp_path, caplog):
    proc = fake_proc(tmp_path)
    path = tmp_path / "state.json"
    sf = StateFile(str(path), proc_root=proc)
    path.write_text("{not json")
    assert sf.load() is None
    path.write_text(json.dumps([1, 2]))
    assert sf.load() is None
    assert "ignoring state file" in caplog.text
    blocked = tmp_path / "file"
    blocked.write_text("")
    assert "cannot create" in StateFile(str(blocked / "state.json"), proc_root=proc).acquire()


def test_process_alive_needs_the_same_start_time(tmp_path):
    proc = fake_proc(tmp_path, procs=((4242, 777),))
    assert process_alive(VmIdentity(4242, 777, "a"), proc)
    assert not process_alive(VmIdentity(4242, 778, "a"), proc)    # pid reused
    assert not process_alive(VmIdentity(4243, 777, "a"), proc)    # gone
    # a fallback identity has only its pid, which may have been reused: not the same process
    assert not process_alive(VmIdentity(4242, 0, "pid-4242"), proc)


class Scripted:
    """One VM whose device needs a reset and recovers (the guest script records the truth),
    and agents on one state file over a fixture /proc that each see a slice of its events."""

    def __init__(self, tmp_path):
        from agent.correlate import CorrelatorConfig
        from agent.events import VmStarted
        from tests.unit.test_correlate_guestscript import Script

        s = Script(t0=time.monotonic_ns())
        self.dev = s.vm(4242, "lab-vm", start_time=777).device(vector=0x31)
        self.dev.init()
        self.truth = self.dev.needs_reset()
        at_reset = len(s.events)
        self.dev.recover()
        # what capture sees (the agent identifies the VM itself); events[:split]: up to the
        # NEEDS_RESET
        self.events = [e for e in s.events if not isinstance(e, VmStarted)]
        self.split = sum(not isinstance(e, VmStarted) for e in s.events[:at_reset])
        self.started = next(e for e in s.events if isinstance(e, VmStarted))
        self.cfg = CorrelatorConfig(hints=(self.dev.hint(),), reorder_window_ns=0)
        self.proc = Path(fake_proc(tmp_path, procs=((4242, 777),)))
        self.path = str(tmp_path / "state.json")

    def agent(self, events, stream):
        """An agent on the state file (restored from it) whose capture yields `events`."""
        from agent.correlate import Correlator
        from agent.export.episode_log import EpisodeLog
        from tests.unit.test_run_cli import ScriptedSource

        sf = StateFile(self.path, proc_root=str(self.proc))
        assert sf.acquire() is None
        source = ScriptedSource([list(events)])
        agent = run.Agent(source, Correlator(self.cfg), lambda pid: self.started,
                          episode_log=EpisodeLog(stream), state_file=sf)
        agent.restore()
        return agent, source, sf


def test_the_loop_hands_an_open_episode_to_the_next_agent(tmp_path):
    """Agent 1 sees the NEEDS_RESET and stops (save_state, as at SIGTERM); agent 2 starts from
    the file and sees the recovery: one `recovered` line, with agent 1's start."""
    from agent.export.episode_log import read_records

    sc = Scripted(tmp_path)
    dev, truth, path = sc.dev, sc.truth, sc.path
    log1, log2 = io.StringIO(), io.StringIO()
    a1, _, sf1 = sc.agent(sc.events[:sc.split], log1)
    a1.step(0)
    a1.save_state()
    sf1.close()
    a2, source2, sf2 = sc.agent(sc.events[sc.split:], log2)
    assert a2.restored == {"vms": 1, "devices": 1, "episodes": 1}
    assert any(w.addr == dev.status_addr for w in source2.watches)   # watched before any event
    a2.step(0)
    a2.save_state()
    sf2.close()
    assert read_records(log1.getvalue().splitlines()) == []
    (rec,) = read_records(log2.getvalue().splitlines())
    assert rec["outcome"] == "recovered" and rec["resumed"] is True
    assert (rec["start_ns"], rec["driver_ok_ns"]) == (truth.start_ns, truth.driver_ok_ns)
    stats = a2.self_stats()              # saved at its tick (changes) and at the stop
    assert stats.state_saves == {"ok": 2} and stats.state_restored["episodes"] == 1
    # what agent 2 left: the device, no open episode
    saved = json.loads(Path(path).read_text())["state"]
    assert [d.get("episode") for v in saved["vms"] for d in v["devices"]] == [None]


def test_a_state_that_cannot_be_restored_leaves_a_fresh_correlator(tmp_path, caplog):
    from agent.correlate import Correlator
    from tests.unit.test_run_cli import ScriptedSource

    proc = fake_proc(tmp_path, procs=((4242, 777),))
    path = tmp_path / "state.json"
    sf = StateFile(str(path), proc_root=proc)
    assert sf.acquire() is None
    good_vm = {"identity": {"pid": 4242, "start_time": 777, "name": "a", "namespace": "",
                            "uuid": "", "vmm": "qemu"}, "fallback": False, "devices": []}
    sf.save({"version": VERSION, "vms": [good_vm, {"identity": {"pid": 1}}]})   # second one broken
    agent = run.Agent(ScriptedSource([]), Correlator(), lambda pid: None, state_file=sf)
    agent.restore()
    assert "ignoring state file" in caplog.text
    assert agent.correlator.snapshot(0).vms == 0         # the good VM was not half-restored
    assert agent.restored == {"vms": 0, "devices": 0, "episodes": 0}
    sf.close()


def _killed_agent(tmp_path, cut: str):
    """Agent 1 sees the events up to `cut` ("needs_reset" or "recovered") and is killed after
    its step (no save_state). Returns the script (for the next agents) and agent 1's log."""
    sc = Scripted(tmp_path)
    log1 = io.StringIO()
    a1, _, sf1 = sc.agent(sc.events[:sc.split] if cut == "needs_reset" else sc.events, log1)
    a1.step(0)
    sf1.close()
    return sc, log1


def test_an_episode_logged_before_a_kill_is_not_reported_again(tmp_path):
    from agent.export.episode_log import read_records

    sc, log1 = _killed_agent(tmp_path, "recovered")
    (rec,) = read_records(log1.getvalue().splitlines())
    assert rec["outcome"] == "recovered"
    log2 = io.StringIO()
    a2, _, sf2 = sc.agent([], log2)     # the state saved before agent 1 wrote its line
    assert a2.restored["episodes"] == 0
    a2.step(0)
    a2.save_state()
    sf2.close()
    assert read_records(log2.getvalue().splitlines()) == []


def test_a_restored_vm_that_exits_before_any_event_ends_its_episode(tmp_path):
    """BPF reports exits of VMMs it forwarded events of; a restored VM that exits quietly is
    found gone in /proc."""
    import shutil

    from agent.export.episode_log import read_records

    sc, log1 = _killed_agent(tmp_path, "needs_reset")
    assert read_records(log1.getvalue().splitlines()) == []
    log2 = io.StringIO()
    a2, _, sf2 = sc.agent([], log2)
    assert a2.restored["episodes"] == 1
    shutil.rmtree(sc.proc / "4242")        # the VM exits without another event
    a2.step(0)
    sf2.close()
    (rec,) = read_records(log2.getvalue().splitlines())
    assert rec["outcome"] == "abandoned" and rec["resumed"] is True
    assert a2.correlator.snapshot(time.monotonic_ns()).vms == 0


def test_hostile_state_files_are_ignored(tmp_path, caplog):
    from agent.correlate import Correlator
    from agent.correlate.checkpoint import StateError, restore
    from tests.unit.test_run_cli import ScriptedSource

    proc = fake_proc(tmp_path, procs=((4242, 777),))
    path = tmp_path / "state.json"
    sf = StateFile(str(path), proc_root=proc)
    path.write_text("[" * 200_000)                       # RecursionError in json
    assert sf.load() is None
    vm = {"identity": {"pid": 4242, "start_time": 777, "name": "a", "namespace": "", "uuid": "",
                       "vmm": "qemu"}, "fallback": False, "devices": []}
    for bad in ({**vm, "identity": {**vm["identity"], "start_time": "777"}},
                {**vm, "identity": {**vm["identity"], "pid": True}}):
        with pytest.raises(StateError):
            restore(Correlator(), {"version": VERSION, "vms": [bad]}, lambda i: True, 0)
    with pytest.raises(StateError, match="twice"):
        restore(Correlator(), {"version": VERSION, "vms": [vm, vm]}, lambda i: True, 0)
    assert sf.acquire() is None
    sf.save({"version": VERSION, "vms": [vm]})
    agent = run.Agent(ScriptedSource([]), Correlator(), lambda pid: None, state_file=sf)
    agent.restore()
    assert agent.restored["vms"] == 1


def test_episodes_ended_at_the_restore_are_saved_ended_before_their_lines(tmp_path):
    import shutil

    from agent.export.episode_log import read_records

    sc, _ = _killed_agent(tmp_path, "needs_reset")
    shutil.rmtree(sc.proc / "4242")        # the VM exited while no agent ran
    log2 = io.StringIO()
    a2, _, sf2 = sc.agent([], log2)
    sf2.close()
    (rec,) = read_records(log2.getvalue().splitlines())
    assert rec["outcome"] == "abandoned"
    saved = json.loads((tmp_path / "state.json").read_text())["state"]
    assert saved["vms"] == []
