"""What every benchmark prints first (the machine) and the kernel.bpf_stats_enabled switch."""
from __future__ import annotations

import contextlib
import os
import platform
import shutil
import statistics
import subprocess
from pathlib import Path
from typing import Iterator, Sequence

BPF_STATS = Path("/proc/sys/kernel/bpf_stats_enabled")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def qemu_version() -> str:
    qemu = os.environ.get("VRA_QEMU") or shutil.which("qemu-system-x86_64")
    if not qemu:
        return "not installed"
    try:
        out = subprocess.run([qemu, "--version"], capture_output=True, text=True, timeout=10)
        return out.stdout.splitlines()[0].strip()
    except (OSError, subprocess.SubprocessError, IndexError):
        return "unknown"


def hypervisor() -> str:
    """Whether this host is itself a VM (the lab then runs nested)."""
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = line
                break
    except OSError:
        pass
    return "nested (host is a VM)" if " hypervisor" in flags else "bare metal"


def machine() -> str:
    load = os.getloadavg()
    return (f"machine: {cpu_model()}, {os.cpu_count()} CPUs, {hypervisor()}; "
            f"kernel {platform.release()}; {qemu_version()}; Python {platform.python_version()}; "
            f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


@contextlib.contextmanager
def bpf_stats_enabled(value: str = "1") -> Iterator[str]:
    """kernel.bpf_stats_enabled=value for the block; the previous value is restored after.
    Yields the previous value."""
    old = BPF_STATS.read_text().strip()
    BPF_STATS.write_text(value)
    try:
        yield old
    finally:
        BPF_STATS.write_text(old)


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def spread(values: Sequence[float]) -> str:
    """'min..max' of a few values, for the honesty column."""
    if not values:
        return "-"
    return f"{min(values):.3f}..{max(values):.3f}"
