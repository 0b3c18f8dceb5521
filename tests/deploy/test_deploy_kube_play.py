"""The image under `podman kube play` of the DaemonSet's own pod template (kubectl kustomize of
deploy/base): with it as it is, the agent attaches and gets ready; without the unconfined seccomp
profile (the runtime's default profile refuses bpf()) or without the host PID namespace, `run` must
exit 1 within seconds with one clear line saying why, and no traceback.

Opt-in with the image build (VRA_IMAGE_TEST=1); needs root, podman, runc, catatonit (podman's
pause process for a pod), kubectl (its kustomize), BPF and tracefs.

Where podman (4.3, Debian 12) does not read a field of the template, the test hands it to podman
the way podman reads it, and changes nothing else: the seccomp profile is taken from the pod
annotation, not from securityContext.seccompProfile, so the template's `Unconfined` becomes that
annotation; `hostPID` is ignored by `kube play` (the container gets a private PID namespace), so the
template's `hostPID: true` becomes containers.conf's `pidns = "host"` for that pod.
"""
from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from deploy_support import DEPLOY, need_tool
from image_support import built_image, podman

SECCOMP_ANNOTATION = "seccomp.security.alpha.kubernetes.io/pod"
# Bounds, not pass/fail timings: BCC's compile takes ~3 s here and much longer on a busy host.
READY_WITHIN_S = 240
EXIT_WITHIN_S = 240


@pytest.fixture(scope="module")
def image() -> str:
    return built_image()


def _containers_conf(path: Path, host_pid: bool) -> Path:
    """containers.conf for a pod: runc (crun fails on this host's cgroup layout), rlimits that can
    be set here (the defaults cannot be raised in this environment), and the PID namespace."""
    path.write_text('[containers]\ndefault_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]\n'
                    f'pidns = "{"host" if host_pid else "private"}"\n'
                    '[engine]\nruntime = "runc"\n')
    return path


def _template() -> dict:
    kubectl = need_tool("kubectl", "kubectl has kustomize built in; `kubectl kustomize` renders deploy/")
    built = subprocess.run([kubectl, "kustomize", str(DEPLOY / "base")], capture_output=True, text=True, check=True)
    daemonset = next(d for d in yaml.safe_load_all(built.stdout) if d and d["kind"] == "DaemonSet")
    return daemonset["spec"]["template"]


def _pod(name: str, image: str, state_dir: Path, seccomp_unconfined: bool = True, host_pid: bool = True) -> dict:
    """The DaemonSet's pod template as a Pod podman can play, changed only where podman differs from a
    kubelet (and the fault under test)."""
    template = _template()
    spec = template["spec"]
    container = spec["containers"][0]
    assert spec["hostPID"] is True and container["securityContext"]["seccompProfile"]["type"] == "Unconfined"
    # Scheduling fields mean nothing to podman; the probes would need curl in the image (podman runs
    # httpGet probes with it); a pod that stops must stay stopped so its exit code can be read.
    for key in ("affinity", "tolerations", "priorityClassName", "serviceAccountName"):
        spec.pop(key, None)
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        container.pop(probe)
    spec["restartPolicy"] = "Never"
    container["image"] = image
    # Not the host's /run/virtio-recovery-agent: another agent on this host may be using it.
    state = next(v for v in spec["volumes"] if v["name"] == "state")
    state["hostPath"]["path"] = str(state_dir)
    annotations = dict(template["metadata"].get("annotations") or {})
    if seccomp_unconfined:
        annotations[SECCOMP_ANNOTATION] = "unconfined"
    else:
        del container["securityContext"]["seccompProfile"]
    spec["hostPID"] = host_pid
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "labels": template["metadata"]["labels"], "annotations": annotations},
            "spec": spec}


class PlayedPod:
    def __init__(self, podman_bin: str, conf: Path, path: Path, name: str) -> None:
        self.podman, self.conf, self.path, self.name = podman_bin, conf, path, name
        self.container = f"{name}-agent"

    def _run(self, *args: str, check: bool = False, timeout: float = 120) -> subprocess.CompletedProcess:
        # the pod's own containers.conf also for inspect/logs/exec: podman reads the engine config each time
        env = dict(os.environ, CONTAINERS_CONF=str(self.conf))
        return subprocess.run([self.podman, *args], capture_output=True, text=True, env=env, check=check,
                              timeout=timeout)

    def play(self) -> None:
        result = self._run("kube", "play", "--replace", str(self.path), timeout=300)
        assert result.returncode == 0, result.stdout + result.stderr

    def down(self) -> None:
        self._run("kube", "down", str(self.path))

    def state(self) -> dict:
        out = self._run("inspect", "--format", "{{json .State}}", self.container, check=True).stdout
        return json.loads(out)

    def logs(self) -> str:
        result = self._run("logs", self.container)
        return result.stdout + result.stderr

    def exec_python(self, code: str) -> subprocess.CompletedProcess:
        return self._run("exec", self.container, "python3", "-c", code, timeout=60)

    def wait_exit(self, within_s: float) -> int:
        deadline = time.monotonic() + within_s
        while time.monotonic() < deadline:
            state = self.state()
            if not state["Running"] and state["Status"] in ("exited", "stopped"):
                return int(state["ExitCode"])
            time.sleep(1)
        pytest.fail(f"{self.container} still running after {within_s}s (it must exit):\n{self.logs()[-4000:]}")


@pytest.fixture
def played(image, tmp_path):
    """played(**faults) -> a running PlayedPod of the DaemonSet's template; torn down afterwards."""
    from conftest import require_bpf

    require_bpf()
    tool = podman()
    need_tool("catatonit", "podman's pause process for pods; apt-get install catatonit")
    pods: list[PlayedPod] = []

    def play(**faults) -> PlayedPod:
        name = f"vra-kube-{os.getpid()}-{len(pods)}"
        state_dir = tmp_path / f"state-{len(pods)}"
        state_dir.mkdir()
        path = tmp_path / f"{name}.yaml"
        manifest = _pod(name, image, state_dir, **faults)
        path.write_text(yaml.safe_dump(manifest))
        conf = _containers_conf(tmp_path / f"{name}.conf", manifest["spec"]["hostPID"])
        pod = PlayedPod(tool, conf, path, name)
        pods.append(pod)
        pod.play()
        pid_mode = pod._run("inspect", "--format", "{{.HostConfig.PidMode}}", pod.container, check=True).stdout.strip()
        assert pid_mode == ("host" if manifest["spec"]["hostPID"] else "private")
        return pod

    yield play
    for pod in pods:
        pod.down()


def _problem_lines(logs: str) -> list[str]:
    """Log lines that report a problem: JSON lines at level error/critical, and any non-JSON line
    (libbcc or a bare print would be one)."""
    out = []
    for line in logs.splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            out.append(line)
            continue
        if record.get("level") in ("error", "critical"):
            out.append(line)
    return out


def _assert_one_clear_line(pod: PlayedPod, must_say: str) -> None:
    code = pod.wait_exit(EXIT_WITHIN_S)
    logs = pod.logs()
    assert code == 1, f"exit code {code}, expected 1:\n{logs[-4000:]}"
    assert "Traceback" not in logs, logs[-4000:]
    problems = _problem_lines(logs)
    assert len(problems) == 1, "expected exactly one line saying why:\n" + "\n".join(problems)
    state = pod.state()
    print(f"\n{pod.container} exited 1 (started {state['StartedAt']}, finished {state['FinishedAt']}): {problems[0]}")
    assert must_say in problems[0].lower(), problems[0]


def test_pod_template_runs_and_gets_ready(played):
    pod = played()
    deadline = time.monotonic() + READY_WITHIN_S
    probe = ("import urllib.request as u\n"
             "print(u.urlopen('http://127.0.0.1:9477/healthz', timeout=5).status)\n"
             "print(u.urlopen('http://127.0.0.1:9477/metrics', timeout=5).read().decode())")
    result = None
    while time.monotonic() < deadline:
        state = pod.state()
        assert state["Running"], f"the agent exited ({state['ExitCode']}):\n{pod.logs()[-4000:]}"
        result = pod.exec_python(probe)
        if result.returncode == 0:
            break
        time.sleep(2)
    assert result is not None and result.returncode == 0, f"/healthz never 200:\n{result and result.stderr}\n{pod.logs()[-4000:]}"
    status, metrics = result.stdout.split("\n", 1)
    assert status == "200"
    assert "virtio_agent_ready 1.0" in metrics
    assert 'virtio_agent_hook_attached{hook="mmio"} 1.0' in metrics
    assert "Traceback" not in pod.logs()


def test_without_unconfined_seccomp_run_exits_with_one_clear_line(played):
    """The runtime's default seccomp profile refuses bpf() (without CAP_SYS_ADMIN)."""
    _assert_one_clear_line(played(seccomp_unconfined=False), "seccomp")


def test_without_host_pid_run_exits_with_one_clear_line(played):
    _assert_one_clear_line(played(host_pid=False), "hostpid: true")
