"""Shared test policy.

Tests that need real KVM, QEMU or BPF call `require_kvm()` / `require_bpf()` (or use the
`kvm` / `bpf` fixtures). On a laptop without them they skip with the reason; with
VRA_REQUIRE_KVM=1 (set by .ci/run) a missing prerequisite is a failure, never a skip.
"""
from __future__ import annotations

import os
import shutil

import pytest


def _strict() -> bool:
    return os.environ.get("VRA_REQUIRE_KVM", "") not in ("", "0")


def _missing(reason: str) -> None:
    if _strict():
        pytest.fail(f"prerequisite missing and VRA_REQUIRE_KVM=1 forbids skipping: {reason}")
    pytest.skip(reason)


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
        _missing(problem)


def require_bpf() -> None:
    require_kvm()
    problem = bpf_problem()
    if problem:
        _missing(problem)


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
    if os.geteuid() != 0:
        _missing("network namespace tests need root")


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
