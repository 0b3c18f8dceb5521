"""Shared test policy: the one way a test gives up for a missing prerequisite.

A test that needs something this host may lack (KVM, QEMU, BPF, root, a command-line tool, an
x86-64 CPU) asks for it through `missing()` — directly or through `require_kvm()`,
`require_bpf()`, `require_root()`, `require_tool()`, the `kvm` / `bpf` / `netadmin` fixtures
or the `kvm` / `bpf` markers. On a laptop without it the test skips with the reason; with
VRA_REQUIRE_KVM=1 (set by .ci/run) it FAILS, never skips: CI cannot pass by skipping.
tests/unit/test_skip_policy.py checks that no test skips any other way.
"""
from __future__ import annotations

import os
import platform
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STRICT_ENV = "VRA_REQUIRE_KVM"


def strict() -> bool:
    return os.environ.get(STRICT_ENV, "") not in ("", "0")


def missing(reason: str) -> None:
    """Skip for a missing prerequisite; under VRA_REQUIRE_KVM=1 fail instead."""
    if strict():
        pytest.fail(f"prerequisite missing and {STRICT_ENV}=1 forbids skipping: {reason}",
                    pytrace=False)
    pytest.skip(reason)


def opt_in(env: str, what: str) -> None:
    """Tests that run only when asked (`env`=1), whatever the host has: not a missing
    prerequisite, so this skips even under VRA_REQUIRE_KVM=1 (.ci/run sets the ones CI runs)."""
    if os.environ.get(env, "") in ("", "0"):
        pytest.skip(f"set {env}=1 to {what}")


def require_tool(name: str, why: str) -> str:
    """Path of a command-line tool (on PATH or in .venv/bin); `why` says what it is for and
    where it comes from."""
    path = shutil.which(name) or shutil.which(name, path=str(ROOT / ".venv" / "bin"))
    if path is None:
        missing(f"{name} is not installed ({why})")
    return path  # type: ignore[return-value]


def require_root(why: str) -> None:
    if os.geteuid() != 0:
        missing(f"needs root: {why}")


def require_x86_64(why: str) -> None:
    if platform.machine() != "x86_64":
        missing(f"needs an x86-64 host: {why}")


def kvm_problem() -> str | None:
    if not os.path.exists("/dev/kvm"):
        return "/dev/kvm does not exist"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "/dev/kvm is not readable and writable by this user"
    if shutil.which("qemu-system-x86_64") is None:
        return "qemu-system-x86_64 is not installed"
    return None


def bpf_problem() -> str | None:
    if os.geteuid() != 0:
        return "BPF tests need root"
    if not os.path.isdir("/sys/kernel/tracing/events/kvm"):
        return "tracefs with kvm events is not mounted at /sys/kernel/tracing"
    try:
        import bcc  # noqa: F401
    except Exception as exc:  # ImportError, or libbcc failing to load
        return f"bcc is not importable: {exc}"
    return None


def require_kvm() -> None:
    problem = kvm_problem()
    if problem:
        missing(problem)


def require_bpf() -> None:
    require_kvm()
    problem = bpf_problem()
    if problem:
        missing(problem)


def pytest_runtest_setup(item: pytest.Item) -> None:
    """The `kvm` and `bpf` markers (pyproject.toml) make a test require them, like the fixtures."""
    if item.get_closest_marker("bpf") is not None:
        require_bpf()
    elif item.get_closest_marker("kvm") is not None:
        require_kvm()


@pytest.fixture
def kvm() -> None:
    require_kvm()


@pytest.fixture
def bpf() -> None:
    require_bpf()


@pytest.fixture
def netadmin() -> None:
    """Root (network namespaces, taps) and KVM."""
    require_kvm()
    require_root("network namespaces and taps")


@pytest.fixture
def netns(netadmin):
    """A fresh network namespace (name, path) with IPv6 off, so the kernel sends no frames of
    its own on the interfaces (no router solicitations, no MLD reports)."""
    import subprocess
    import uuid

    from pyroute2 import netns as pr_netns

    name = f"vra-test-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    pr_netns.create(name)
    try:
        subprocess.run(["ip", "netns", "exec", name, "sysctl", "-q", "-w",
                        "net.ipv6.conf.all.disable_ipv6=1",
                        "net.ipv6.conf.default.disable_ipv6=1"], check=True)
        yield name, f"/var/run/netns/{name}"
    finally:
        pr_netns.remove(name)
