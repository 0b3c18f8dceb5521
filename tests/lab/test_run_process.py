"""`virtio-recovery-agent run` end to end as a process, with real BPF on this host's KVM and the
real faults: kernel headers hidden in a private mount namespace, a PID namespace of its own.

- headers hidden: exit 1, one JSON error line naming the headers with libbcc's own output folded
  into it, no traceback, no raw libbcc line, the event loop never entered;
- start: /metrics answers from the first request (build info, `virtio_agent_ready 0`) and
  /healthz says "starting" while BPF compiles; ready 1 once attached;
- SIGTERM: exit 0 with the state file saved;
- not in the host PID namespace (`unshare -p -f --mount-proc`, and without its own /proc):
  `run` exits 1 naming `hostPID: true`, doctor fails the check.
The loop's poll-error back-off is unit-tested (tests/unit/test_run_startup.py): no real fault
makes BCC's ring-buffer poll fail on demand.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from agent.demo import free_port
from conftest import require_bpf, require_tool

ROOT = Path(__file__).resolve().parents[2]
AGENT = [sys.executable, "-m", "agent"]
HANG_S = 180        # a guard against a hung process, not a duration under test
HIDE_HEADERS = ('mount -t tmpfs none /lib/modules && mount -t tmpfs none /usr/src && '
                'exec "$@"')


@pytest.fixture(autouse=True)
def _real_bpf() -> None:
    require_bpf()


def _json_lines(stderr: str) -> list[dict]:
    lines = [line for line in stderr.splitlines() if line.strip()]
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except ValueError:
            raise AssertionError(f"a stderr line is not JSON: {line!r}\n{stderr}") from None
    return out


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _sample(metrics: str, name: str) -> float:
    for line in metrics.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in the scrape:\n{metrics}")


def test_hidden_kernel_headers_exit_1_with_one_line_naming_them(tmp_path):
    unshare = require_tool("unshare", "Debian package util-linux")
    state = tmp_path / "state.json"
    t0 = time.monotonic()
    proc = subprocess.run(
        [unshare, "-m", "--propagation", "private", "sh", "-c", HIDE_HEADERS, "sh",
         *AGENT, "run", "--listen", f"127.0.0.1:{free_port()}", "--state-file", str(state)],
        cwd=ROOT, capture_output=True, text=True, timeout=HANG_S)
    elapsed = time.monotonic() - t0
    print(f"headers hidden: exit {proc.returncode} after {elapsed:.2f}s")
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    records = _json_lines(proc.stderr)          # libbcc's own lines were folded in, not printed
    errors = [r for r in records if r["level"] == "error"]
    assert len(errors) == 1, proc.stderr
    error = errors[0]
    assert error["msg"].startswith("cannot start capture: kernel headers"), error["msg"]
    assert "install linux-headers-" in error["msg"]
    assert [d["check"] for d in error["diagnosis"]] == ["kernel headers / BTF"]
    said = error["libbcc_output"]
    assert any("/build" in line for line in said) and any("kernel headers" in line for line in said)
    assert error["hooks"]["mmio"].startswith("compile/load failed")
    # the capture never started: the loop never ran, so nothing was counted as lost
    assert not [r for r in records if "event loop" in r["msg"] or "poll" in r["msg"]]
    assert not state.exists(), "no state is written by an agent that never started"
    assert proc.stdout == "", "stdout is the episode log: libbcc's lines must not land there"


class Agent:
    def __init__(self, tmp_path: Path, *extra: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.state = tmp_path / "state.json"
        self.stderr_path = tmp_path / "stderr.jsonl"
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(
                [*AGENT, "run", "--listen", f"127.0.0.1:{self.port}", "--state-file",
                 str(self.state), *extra], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err,
                stdin=subprocess.DEVNULL, env=dict(os.environ, PYTHONUNBUFFERED="1"))

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def first_answer(self, path: str) -> tuple[int, str]:
        """The first HTTP answer (the server starts before BPF compiles)."""
        deadline = time.monotonic() + HANG_S
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.stderr()
            try:
                return _get(self.url + path)
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.01)
        raise AssertionError(f"no HTTP answer: {self.stderr()}")

    def wait_ready(self) -> None:
        deadline = time.monotonic() + HANG_S
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.stderr()
            code, _body = _get(self.url + "/healthz")
            if code == 200:
                return
            time.sleep(0.1)
        raise AssertionError(f"not ready: {self.stderr()}")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def test_metrics_and_healthz_while_compiling_then_ready_then_sigterm_saves_the_state(tmp_path):
    agent = Agent(tmp_path)
    try:
        t0 = time.monotonic()
        code, metrics = agent.first_answer("/metrics")
        # asked after the scrape: still starting, so the scrape was taken during the compile
        health_code, health = _get(agent.url + "/healthz")
        assert (health_code, health.strip()) == (503, "starting: compiling and attaching BPF "
                                                       "programs"), agent.stderr()
        assert code == 200
        assert _sample(metrics, "virtio_agent_ready") == 0
        assert "virtio_agent_build_info{" in metrics
        agent.wait_ready()
        print(f"ready {time.monotonic() - t0:.2f}s after the first answer")
        _code, metrics = _get(agent.url + "/metrics")
        assert _sample(metrics, "virtio_agent_ready") == 1
        for hook in ("mmio", "pio", "apic", "exit"):
            assert f'virtio_agent_hook_attached{{hook="{hook}"}} 1.0' in metrics
        assert metrics.count("# TYPE virtio_agent_build_info gauge") == 1

        agent.proc.send_signal(signal.SIGTERM)
        assert agent.proc.wait(timeout=HANG_S) == 0, agent.stderr()
    finally:
        agent.kill()
    records = _json_lines(agent.stderr())
    assert not [r for r in records if r["level"] == "error"], agent.stderr()
    assert records[-1]["msg"] == "stopped"
    saved = json.loads(agent.state.read_text())
    boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    assert saved["boot_id"] == boot_id and isinstance(saved["state"], dict)


@pytest.mark.parametrize("own_proc", [True, False], ids=["own-proc", "host-proc"])
def test_outside_the_host_pid_namespace_run_exits_1_and_doctor_fails(own_proc, tmp_path):
    unshare = require_tool("unshare", "Debian package util-linux")
    prefix = [unshare, "-p", "-f", *(["--mount-proc"] if own_proc else [])]
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    proc = subprocess.run([*prefix, *AGENT, "run", "--listen", f"127.0.0.1:{free_port()}",
                           "--state-file", str(state_dir / "state.json")],
                          cwd=ROOT, capture_output=True, text=True, timeout=HANG_S)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [r["msg"] for r in _json_lines(proc.stderr) if r["msg"].startswith("run:")]
    assert len(lines) == 1, proc.stderr
    assert "not in the host PID namespace" in lines[0] and "hostPID: true" in lines[0]
    assert not list(state_dir.iterdir())

    doctor = subprocess.run([*prefix, *AGENT, "doctor", "--json"], cwd=ROOT,
                            capture_output=True, text=True, timeout=HANG_S)
    assert doctor.returncode == 1, doctor.stderr
    checks = {c["name"]: c for c in json.loads(doctor.stdout)}
    assert checks["host PID namespace"]["status"] == "FAIL"
    assert "hostPID: true" in checks["host PID namespace"]["fix"]


def test_doctor_passes_the_host_pid_check_here():
    proc = subprocess.run([*AGENT, "doctor", "--json"], cwd=ROOT, capture_output=True,
                          text=True, timeout=HANG_S)
    checks = {c["name"]: c for c in json.loads(proc.stdout)}
    assert checks["host PID namespace"]["status"] == "ok", checks["host PID namespace"]
