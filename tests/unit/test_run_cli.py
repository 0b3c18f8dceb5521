"""`run` flags, environment variables and its refusal to start without prerequisites."""
from __future__ import annotations

import argparse
import json
import os
import pwd
import subprocess
import sys
from pathlib import Path

import pytest

from agent import run

ROOT = Path(__file__).resolve().parents[2]


def parse(argv, env=None, monkeypatch=None):
    if monkeypatch is not None:
        for k in run.ENV.values():
            monkeypatch.delenv(k, raising=False)
        for k, v in (env or {}).items():
            monkeypatch.setenv(k, v)
    return parser().parse_args(argv)


def parser():
    # the `run` sub-command's own arguments (agent.cli mounts the same add_arguments)
    p = argparse.ArgumentParser(prog="virtio-recovery-agent run")
    run.add_arguments(p)
    return p


def test_defaults(monkeypatch):
    a = parse([], monkeypatch=monkeypatch)
    assert (a.listen, a.stuck_after, a.log_format, a.hooks, a.max_vms, a.max_devices) == \
        (":9477", 60.0, "json", "auto", 256, 4096)
    assert a.tls_cert == "" and a.tls_key == ""


def test_env_vars_set_defaults_and_flags_win(monkeypatch):
    env = {"VRA_LISTEN": "127.0.0.1:9999", "VRA_STUCK_AFTER": "2.5", "VRA_LOG_FORMAT": "text",
           "VRA_HOOKS": "mmio,pio,apic", "VRA_MAX_VMS": "8", "VRA_MAX_DEVICES": "64"}
    a = parse([], env, monkeypatch)
    assert (a.listen, a.stuck_after, a.log_format, a.hooks, a.max_vms, a.max_devices) == \
        ("127.0.0.1:9999", 2.5, "text", "mmio,pio,apic", 8, 64)
    a = parse(["--listen", ":1234", "--max-vms", "3"], env, monkeypatch)
    assert a.listen == ":1234" and a.max_vms == 3


@pytest.mark.parametrize("argv,fragment", [
    (["--listen", "9477"], "--listen"),
    (["--stuck-after", "0"], "positive"),
    (["--stuck-after", "soon"], "not a number"),
    (["--log-format", "xml"], "json, text"),
    (["--hooks", "mmio,teleport"], "unknown hook family teleport"),
    (["--max-devices", "-1"], "positive"),
    (["--hooks", "msi,apic"], "needs mmio or pio"),
    (["--max-devices", "99999999999999999999"], "'99999999999999999999' is too large"),
    (["--max-vms", "16385"], "at most 16384"),
    (["--stuck-after", "nan"], "positive number of seconds"),
    (["--stuck-after", "1e300"], "at most"),
    (["--retain-exited", "inf"], "at most"),
    (["--state-file", "/nonexistent/dir/state.json"], "directory /nonexistent/dir does not exist"),
    (["--state-file", "/tmp"], "is a directory"),
])
def test_bad_flags_exit_2_with_a_reason(argv, fragment, monkeypatch, capsys):
    with pytest.raises(SystemExit) as exc:
        parse(argv, monkeypatch=monkeypatch)
    assert exc.value.code == 2
    assert fragment in capsys.readouterr().err


def test_bad_env_var_is_reported_by_its_name_and_value(monkeypatch, capsys):
    with pytest.raises(SystemExit) as exc:
        parse([], {"VRA_MAX_VMS": "many"}, monkeypatch)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--max-vms" in err and "VRA_MAX_VMS='many'" in err and "not an integer" in err


@pytest.mark.parametrize("var,value,fragment", [
    ("VRA_MAX_DEVICES", "99999999999999999999", "too large"),
    ("VRA_STATE_FILE", "/nonexistent/dir/state.json", "/nonexistent/dir does not exist"),
    ("VRA_STUCK_AFTER", "-1", "positive number of seconds"),
])
def test_bad_env_values_name_the_variable(var, value, fragment, monkeypatch, capsys):
    with pytest.raises(SystemExit) as exc:
        parse([], {var: value}, monkeypatch)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"environment variable {var}={value!r}" in err and fragment in err


def test_a_flag_wins_over_a_bad_variable(monkeypatch):
    a = parse(["--max-devices", "10"], {"VRA_MAX_DEVICES": "99999999999999999999"}, monkeypatch)
    assert a.max_devices == 10 and type(a.max_devices) is int


def test_the_state_file_parent_is_never_created(monkeypatch, tmp_path, capsys):
    missing_dir = tmp_path / "not" / "there"
    with pytest.raises(SystemExit):
        parse(["--state-file", str(missing_dir / "state.json")], monkeypatch=monkeypatch)
    assert not (tmp_path / "not").exists()
    a = parse(["--state-file", str(tmp_path / "state.json")], monkeypatch=monkeypatch)
    assert a.state_file == str(tmp_path / "state.json")
    assert parse(["--state-file", ""], monkeypatch=monkeypatch).state_file == ""


def test_help_names_every_env_var(capsys):
    with pytest.raises(SystemExit):
        parser().parse_args(["--help"])
    out = capsys.readouterr().out
    for var in run.ENV.values():
        assert var in out


def test_auto_leaves_the_ioctl_hooks_off_without_vdpa(monkeypatch, tmp_path):
    from agent.capture import hooks

    sys_root, dev_root = tmp_path / "sys", tmp_path / "dev"
    (sys_root / "module" / "kvm").mkdir(parents=True)
    dev_root.mkdir()
    (dev_root / "vhost-net").touch()           # vhost-net alone has no status to report
    names, left_off = hooks.auto_families(str(sys_root), str(dev_root))
    assert left_off == ["ioctl"] and names == set(hooks.FAMILIES) - {"ioctl"}

    for vdpa in (sys_root / "module" / "vhost_vdpa", sys_root / "bus" / "vdpa" / "devices" / "vdpa0",
                 dev_root / "vhost-vdpa-0"):
        vdpa.mkdir(parents=True)
        assert hooks.auto_families(str(sys_root), str(dev_root)) == (set(hooks.FAMILIES), [])
        vdpa.rmdir()
    assert hooks.vdpa_present(str(sys_root), str(dev_root)) is False

    monkeypatch.setattr(hooks, "auto_families", lambda: (set(hooks.FAMILIES) - {"ioctl"}, ["ioctl"]))
    assert run.enabled_hooks("auto") == set(hooks.FAMILIES) - {"ioctl"}
    assert run.enabled_hooks("all") is None
    assert run.enabled_hooks("mmio,ioctl") == {"mmio", "ioctl"}
    assert run.core_hooks(run.enabled_hooks("auto")) == run.core_hooks(None)


def test_core_hooks_follow_enabled_families():
    assert set(run.core_hooks(None)) >= {"mmio", "pio", "apic"}
    assert run.core_hooks({"mmio", "msi"}) == ["mmio"]


def test_half_tls_config_is_refused(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "agent", "run", "--tls-cert", "x.pem"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "--tls-key" in proc.stderr


def _nobody() -> pwd.struct_passwd | None:
    try:
        return pwd.getpwnam("nobody")
    except KeyError:
        return None


def test_not_root_is_one_line_pointing_to_doctor():
    from conftest import missing, require_root, require_tool

    require_root("to run the agent as the user nobody")
    setpriv = require_tool("setpriv", "Debian package util-linux")
    nobody = _nobody()
    if nobody is None:
        missing("this host has no user `nobody` to run the agent as")
    proc = subprocess.run(
        [setpriv, f"--reuid={nobody.pw_uid}", f"--regid={nobody.pw_gid}", "--clear-groups",
         sys.executable, "-m", "agent", "run", "--listen", "127.0.0.1:0"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
        env={**os.environ, "HOME": "/tmp", "PYTHONDONTWRITEBYTECODE": "1"})
    assert proc.returncode == 1, proc.stderr
    # every stderr line is a JSON log record (a non-JSON one fails json.loads here)
    records = [json.loads(line) for line in proc.stderr.splitlines() if line.strip()]
    lines = [r["msg"] for r in records if r["msg"].startswith("run:")]
    assert len(lines) == 1, proc.stderr
    assert "root" in lines[0] and "doctor" in lines[0]


def test_port_in_use_is_a_clear_error(monkeypatch):
    if run.privilege_problem():
        from conftest import missing

        missing(f"run cannot start here: {run.privilege_problem()}")
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        proc = subprocess.run([sys.executable, "-m", "agent", "run", "--listen",
                               f"127.0.0.1:{port}"], cwd=ROOT, capture_output=True, text=True,
                              timeout=60)
    assert proc.returncode == 1
    assert f"cannot serve metrics on 127.0.0.1:{port}" in proc.stderr


# --- the loop, fed a scripted event stream (the lab end-to-end test feeds it real capture) ---

class ScriptedSource:
    """Stands where Capture stands: hands out event batches, records the watch requests."""

    def __init__(self, batches):
        from agent.capture import CaptureStats, HookStatus

        self.batches = list(batches)
        self.watches = []
        self.hook_status = {h: HookStatus(h, True, "scripted") for h in ("mmio", "pio", "apic",
                                                                          "exit")}
        self._stats = CaptureStats(forwarded=0, delivered=0, filtered={"repeat": 3}, lost={},
                                   counters={}, maps={})
        self.kernel_counters: dict[str, int] = {}
        self.closed = False

    def poll(self, timeout_ms):
        return self.batches.pop(0) if self.batches else []

    def watch_register(self, req):
        self.watches.append(req)
        return True

    watch_interrupt = watch_ecam = watch_device_bars = watch_register

    def stats(self):
        return self._stats

    def counters(self):
        return dict(self.kernel_counters)

    def close(self):
        self.closed = True


def scripted_agent(stuck_after_s=60.0):
    import io
    import time

    from agent.correlate import Correlator, CorrelatorConfig
    from agent.export.episode_log import EpisodeLog
    from tests.unit.test_correlate_guestscript import Script

    s = Script(t0=time.monotonic_ns())
    vm = s.vm(4242, "lab-vm")
    dev = vm.device(vector=0x31)
    dev.init()
    dev.needs_reset()
    dev.recover()
    stream = io.StringIO()
    correlator = Correlator(CorrelatorConfig(hints=(dev.hint(),), reorder_window_ns=0,
                                             stuck_after_ns=int(stuck_after_s * 1e9)))
    return s, dev, stream, correlator, EpisodeLog(stream)


def test_loop_correlates_logs_and_survives_a_bad_event():
    import dataclasses

    from agent.export.episode_log import read_records
    from agent.events import RegisterAccess, VmStarted

    s, dev, stream, correlator, episode_log = scripted_agent()
    events = list(s.events)
    vm_started = [e for e in events if isinstance(e, VmStarted)]
    others = [e for e in events if not isinstance(e, VmStarted)]
    # An event the correlator cannot digest (value None): must be counted, not fatal.
    bad = dataclasses.replace(others[4], value=None, ts_ns=others[4].ts_ns + 1)
    identified = []

    def identify(pid):
        identified.append(pid)
        return vm_started[0]

    source = ScriptedSource([others[:5], [bad], others[5:]])
    agent = run.Agent(source, correlator, identify, episode_log=episode_log,
                      core_hooks=["mmio", "pio", "apic"])
    for _ in range(5):
        agent.step(0)
    agent.correlator.flush()
    assert identified == [4242]          # once per pid, before its first event
    from agent.model import WatchRegister

    assert any(isinstance(w, WatchRegister) and w.addr == dev.status_addr for w in source.watches)
    assert agent.counters.correlation_errors == 1
    recs = read_records(stream.getvalue().splitlines())
    assert [r["outcome"] for r in recs] == ["recovered"]
    truth = s.episodes[0]
    assert recs[0]["start_ns"] == truth.start_ns
    assert recs[0]["driver_ok_ns"] == truth.driver_ok_ns
    stats = agent.self_stats()
    assert stats.lost["correlation_error"] == 1
    assert stats.events["access"] == sum(isinstance(e, RegisterAccess) for e in others)
    assert stats.filtered == {"repeat": 3}
    assert agent.health() == (True, "ok")


def test_health_names_missing_core_hooks():
    from agent.capture import HookStatus

    s, dev, stream, correlator, episode_log = scripted_agent()
    source = ScriptedSource([])
    source.hook_status["mmio"] = HookStatus("mmio", False, "tracepoint kvm:kvm_mmio missing")
    agent = run.Agent(source, correlator, lambda pid: None, core_hooks=["mmio", "apic"])
    ok, msg = agent.health()
    assert not ok and "kvm_mmio missing" in msg


def test_a_vm_evicted_by_correlation_keeps_its_name_when_it_comes_back():
    """max_vms=2 and three VMs: the first is evicted; when it comes back it must keep its name
    (the agent identified it once; correlation remembers evicted identities), not become
    pid-<pid>."""
    import time

    from agent.correlate import Correlator, CorrelatorConfig
    from agent.events import VmStarted
    from agent.model import Transport
    from tests.unit.test_correlate_guestscript import Script

    s = Script(t0=time.monotonic_ns())
    devs = {}
    for pid in (101, 102, 103):
        devs[pid] = s.vm(pid, f"vm{pid}").device(Transport.PCI_MODERN)
        devs[pid].init()
    first_round = len(s.events)
    devs[101].init()                      # the evicted VM comes back
    started = {e.pid: e for e in s.events if isinstance(e, VmStarted)}
    identified = []

    def identify(pid):
        identified.append(pid)
        return started[pid]

    others = [e for e in s.events if not isinstance(e, VmStarted)]
    n_first = sum(1 for e in s.events[:first_round] if not isinstance(e, VmStarted))
    correlator = Correlator(CorrelatorConfig(max_vms=2, reorder_window_ns=0))
    agent = run.Agent(ScriptedSource([others[:n_first], others[n_first:]]), correlator,
                      identify, core_hooks=["mmio"])
    for _ in range(3):
        agent.step(0)
    snap = correlator.snapshot(s.t)
    assert snap.evictions["vm"] >= 1
    assert identified == [101, 102, 103], identified
    assert "vm101" in {d.vm.name for d in snap.devices}
    assert not [d.vm.name for d in snap.devices if d.vm.name.startswith("pid-")]


def test_a_vm_whose_exit_record_was_lost_is_found_exited_in_proc(tmp_path, monkeypatch):
    """The kernel's exit record is lost when the ring buffer is full (`ringbuf_full` grows):
    the agent then checks the VMs it knows in /proc, this time and the next (the record is
    written inside the exit, before /proc shows a zombie), and ends the gone one's episode and
    watches as its exit would have. Without a loss it leaves the VM alone: the record comes."""
    import io
    import time

    from agent.correlate import Correlator, CorrelatorConfig
    from agent.export.episode_log import EpisodeLog, read_records
    from agent.model import Outcome, WatchRegister
    from agent.daemon import loop
    from tests.unit.test_correlate_guestscript import Script
    from tests.unit.test_vmident import _set_state, fake_proc

    monkeypatch.setattr(loop, "EXIT_SWEEP_NS", 0)
    s = Script(t0=time.monotonic_ns())
    vm = s.vm(4242, "lab-vm", start_time=100)
    other = s.vm(4343, "other-vm", start_time=200)
    dev = vm.device(vector=0x31)
    dev.init()
    dev.needs_reset()               # the episode is open when the VMM exits
    other.device(vector=0x32).init()
    proc = fake_proc(tmp_path, 4242, ["qemu-system-x86_64"], starttime=100)
    fake_proc(tmp_path, 4343, ["qemu-system-x86_64"], starttime=200)
    stream = io.StringIO()
    source = ScriptedSource([list(s.events)])
    correlator = Correlator(CorrelatorConfig(reorder_window_ns=0))
    agent = run.Agent(source, correlator, lambda pid: None, episode_log=EpisodeLog(stream),
                      proc_root=proc)
    agent.step(0)
    assert {i.pid for i in correlator.identities()} == {4242, 4343}

    def removals():
        return [w for w in source.watches if isinstance(w, WatchRegister) and not w.add
                and w.pid == 4242]

    _set_state(tmp_path, 4242, "Z")
    agent.step(0)                   # exited, but no record lost: its record will come
    assert {i.pid for i in correlator.identities()} == {4242, 4343} and not removals()
    _set_state(tmp_path, 4242, "S")
    source.kernel_counters["ringbuf_full"] = 7
    agent.step(0)                   # a loss: the first check finds the VMM still running
    assert {i.pid for i in correlator.identities()} == {4242, 4343}
    _set_state(tmp_path, 4242, "Z")
    agent.step(0)                   # the second check finds it exited
    assert {i.pid for i in correlator.identities()} == {4343}
    assert any(w.addr == dev.status_addr for w in removals())
    correlator.flush()
    agent.step(0)
    (rec,) = read_records(stream.getvalue().splitlines())
    assert rec["vm"] == "lab-vm" and rec["outcome"] == Outcome.ABANDONED
    # two checks per loss, then none until the next loss
    _set_state(tmp_path, 4343, "Z")
    agent.step(0)
    assert {i.pid for i in correlator.identities()} == {4343}
    source.kernel_counters["ringbuf_full"] = 8
    agent.step(0)
    assert correlator.identities() == []
