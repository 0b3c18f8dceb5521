"""`run`'s start and its failures, in-process: libbcc's stderr captured, the JSON log line with
fields, the host-PID check over real /proc-like trees, the loop's poll-error back-off and
readiness. The same behaviours as a real process (real BPF, real namespaces):
tests/lab/test_run_process.py."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

from agent.daemon import native_output
from agent.daemon.logs import JsonFormatter, TextFormatter
from agent.daemon.loop import POLL_RETRY_FIRST_S, POLL_RETRY_MAX_S, Agent
from agent.daemon.readiness import STARTING, Readiness
from agent.doctor import HOST_PID_NS_INODE, diagnose_bcc_output, host_pid_problem
from tests.unit.test_run_cli import ScriptedSource


def test_native_writes_to_fds_1_and_2_are_captured_in_order_and_the_fds_restored():
    before = [os.fstat(fd) for fd in (1, 2)]
    with native_output.native_output_captured() as out:
        os.write(1, b"Unable to find kernel headers.\n")      # libbcc prints this on stdout
        os.write(2, b"chdir(/lib/modules/x/build): No such file or directory\n")
        # a child process inherits the fds, as the shell libbcc runs modprobe in does
        subprocess.run(["sh", "-c", "echo 'sh: 1: modprobe: not found' >&2"], check=True)
    assert out.lines() == ["Unable to find kernel headers.",
                           "chdir(/lib/modules/x/build): No such file or directory",
                           "sh: 1: modprobe: not found"]
    assert not out.truncated
    after = [os.fstat(fd) for fd in (1, 2)]
    assert [(s.st_dev, s.st_ino) for s in after] == [(s.st_dev, s.st_ino) for s in before]


def test_captured_text_is_bounded_to_its_end():
    with native_output.native_output_captured(max_bytes=1000) as out:
        for i in range(2000):
            os.write(2, f"clang error {i}\n".encode())
    assert out.truncated
    assert len(out.text.encode()) <= 1000
    assert out.lines()[-1] == "clang error 1999"


def _record(fields) -> logging.LogRecord:
    r = logging.LogRecord("agent.run", logging.ERROR, __file__, 1, "cannot start capture: %s",
                          ("kernel headers",), None)
    r.fields = fields
    return r


def test_a_json_log_line_carries_the_fields_and_is_one_line():
    fields = {"diagnosis": [{"check": "kernel headers / BTF", "fix": "install linux-headers"}],
              "libbcc_output": ["line one", "line two"]}
    line = JsonFormatter().format(_record(fields))
    assert "\n" not in line
    d = json.loads(line)
    assert d["msg"] == "cannot start capture: kernel headers" and d["level"] == "error"
    assert d["diagnosis"] == fields["diagnosis"] and d["libbcc_output"] == ["line one", "line two"]
    # a field cannot overwrite the line's own keys
    assert json.loads(JsonFormatter().format(_record({"msg": "x"})))["msg"].startswith("cannot")
    assert "libbcc_output: ['line one', 'line two']" in TextFormatter().format(_record(fields))


def test_host_pid_namespace_check_over_proc_like_trees(tmp_path):
    host = tmp_path / "host"
    (host / str(os.getpid()) / "ns").mkdir(parents=True)
    os.symlink(f"pid:[{HOST_PID_NS_INODE}]", host / str(os.getpid()) / "ns" / "pid")
    os.symlink(str(os.getpid()), host / "self")
    assert host_pid_problem(str(host)) is None

    container = tmp_path / "container"
    (container / "1" / "ns").mkdir(parents=True)
    os.symlink("pid:[4026532301]", container / "1" / "ns" / "pid")
    os.symlink("1", container / "self")
    problem = host_pid_problem(str(container))
    assert problem is not None and "not in the host PID namespace" in problem
    assert "pid:[4026532301]" in problem

    # in the host namespace, but /proc mounted for another one: /proc/self is not this process
    other_proc = tmp_path / "other"
    (other_proc / "7" / "ns").mkdir(parents=True)
    os.symlink(f"pid:[{HOST_PID_NS_INODE}]", other_proc / "7" / "ns" / "pid")
    os.symlink("7", other_proc / "self")
    problem = host_pid_problem(str(other_proc))
    assert problem is not None and "mounted for another PID namespace" in problem

    assert "cannot read" in host_pid_problem(str(tmp_path / "no-proc"))


def test_bcc_output_is_diagnosed():
    headers = diagnose_bcc_output("sh: 1: modprobe: not found\nchdir(/lib/modules/6.1/build): "
                                  "No such file or directory\n")
    assert headers.name == "kernel headers / BTF" and "linux-headers-" in headers.fix
    seccomp = diagnose_bcc_output("Failed to load BPF program b'rtp_kvm_mmio': "
                                  "Operation not permitted")
    assert "seccomp" in seccomp.fix
    assert diagnose_bcc_output("").name == "hooks"


class FailingPolls(ScriptedSource):
    """A capture whose poll fails `failures` times, then works."""

    def __init__(self, failures: int) -> None:
        super().__init__([])
        self.failures = failures

    def poll(self, timeout_ms):
        if self.failures:
            self.failures -= 1
            raise OSError(4, "ring buffer poll failed")
        return super().poll(timeout_ms)


class CountedStop:
    """Stands for the loop's threading.Event: records the back-off waits instead of sleeping,
    checks readiness at each, and stops once the loop has come round `after_recovery` times
    with the capture working again."""

    def __init__(self, after_recovery: int) -> None:
        self.agent: Agent | None = None
        self.left = after_recovery
        self.waits: list[float] = []
        self.health_while_failing: list[tuple[bool, str]] = []

    def is_set(self) -> bool:
        if self.agent.capture.failures == 0 and self.agent.counters.failing_polls == 0:
            self.left -= 1
        return self.left < 0

    def wait(self, seconds: float) -> bool:
        self.waits.append(seconds)
        self.health_while_failing.append(self.agent.health())
        return False


def test_poll_errors_back_off_count_and_make_the_agent_unready_until_it_works(caplog):
    from agent.correlate import Correlator

    source = FailingPolls(failures=12)
    agent = Agent(source, Correlator(), lambda pid: None, core_hooks=["mmio"])
    stop = CountedStop(after_recovery=2)
    stop.agent = agent
    with caplog.at_level(logging.INFO, logger="agent.run"):
        agent.run(stop)
    assert agent.counters.poll_errors == 12
    assert stop.waits[:7] == [POLL_RETRY_FIRST_S * 2 ** i for i in range(6)] + [POLL_RETRY_MAX_S]
    assert stop.waits[7:] == [POLL_RETRY_MAX_S] * 5
    assert all(not ok and "capture failing" in msg and "ring buffer poll failed" in msg
               for ok, msg in stop.health_while_failing)
    assert agent.health() == (True, "ok")
    tracebacks = [r for r in caplog.records if r.exc_info]
    assert len(tracebacks) == 1, "one traceback per streak of failures, not one per poll"
    assert any("works again after 12 failed polls" in r.getMessage() for r in caplog.records)


def test_readiness_before_and_after_the_agent():
    from agent.correlate import Correlator

    r = Readiness()
    assert r.health() == (False, STARTING) and r.ready() is False
    assert list(r.collect()) == []
    r.agent = Agent(ScriptedSource([]), Correlator(), lambda pid: None, core_hooks=["mmio"])
    assert r.health() == (True, "ok") and r.ready() is True
    assert "virtio_agent_devices" in {m.name for m in r.collect()}


def test_run_help_still_names_every_variable():
    proc = subprocess.run([sys.executable, "-m", "agent", "run", "--help"], capture_output=True,
                          text=True, timeout=60, cwd=os.path.dirname(os.path.dirname(
                              os.path.dirname(os.path.abspath(__file__)))))
    assert proc.returncode == 0
    assert "VRA_STATE_FILE" in proc.stdout and "<= 65536" in proc.stdout
