"""Start the real Linux guest under QEMU TCG and read what it reports.

One virtio device (rng, net or blk) with qdev id `dev0`, guest RAM in a shared file on
/dev/shm (the fault is written there), a QMP socket, QEMU's trace (lab/linux/trace.py) and the
serial console in the work directory. `ioeventfd=off`: QEMU's ioeventfd emulation under TCG
bypasses the memory-region trace, so kicks would be invisible (under KVM a kick is a
kvm_mmio / kvm_fast_mmio event either way).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from lab.linux.build import ensure_guest
from lab.linux.trace import TRACE_EVENTS

DEVICES = ("rng", "net", "blk")
QDEV_ID = "dev0"
QOM_PATH = f"/machine/peripheral/{QDEV_ID}/virtio-backend"
RAM_MB = 256
DISK_BYTES = 1 << 20
VIRTIO_IDS = {1: "net", 2: "blk", 4: "rng"}
_LINE = re.compile(r"VRA-LINUX (\w+) ?(.*)")


class LinuxVmError(RuntimeError):
    pass


@dataclass(frozen=True, slots=True)
class GuestDevice:
    """A /sys/bus/virtio/devices entry as the guest listed it."""

    name: str
    virtio_id: int
    status: int
    driver: str
    pci: str

    @property
    def type(self) -> str:
        return VIRTIO_IDS.get(self.virtio_id, "unknown")


@dataclass(frozen=True, slots=True)
class GuestIrq:
    """A virtio line of the guest's /proc/interrupts (one CPU)."""

    irq: int
    count: int
    chip: str        # "PCI-MSI"
    hwirq: int       # PCI-MSI: bdf << 11 | MSI-X entry
    name: str        # virtio0-config, virtio1-input.0, ...

    @property
    def bdf(self) -> int:
        return self.hwirq >> 11

    @property
    def msix_entry(self) -> int:
        return self.hwirq & 0x7FF


@dataclass
class GuestReport:
    phases: list[str] = field(default_factory=list)
    devices: dict[str, list[GuestDevice]] = field(default_factory=dict)  # phase -> devices
    irqs: dict[str, list[GuestIrq]] = field(default_factory=dict)        # phase -> lines
    errors: list[str] = field(default_factory=list)


def parse_irq(text: str) -> Optional[GuestIrq]:
    """`24: 0 PCI-MSI 32768-edge virtio0-config` (the shell squeezed the blanks)."""
    m = re.match(r"(\d+): (\d+) (\S+) (\d+)-\w+ (\S+)$", text.strip())
    if m is None:
        return None
    return GuestIrq(int(m[1]), int(m[2]), m[3], int(m[4]), m[5])


def parse_serial(text: str) -> GuestReport:
    rep = GuestReport()
    phase = "boot"
    for line in text.splitlines():
        m = _LINE.search(line)
        if m is None:
            continue
        what, rest = m[1], m[2].strip()
        if what == "phase":
            phase = rest
            rep.phases.append(rest)
        elif what == "dev":
            kv = dict(p.split("=", 1) for p in rest.split() if "=" in p)
            try:
                dev = GuestDevice(kv["name"], int(kv["id"], 0), int(kv["status"], 0),
                                  kv["driver"], kv["pci"])
            except (KeyError, ValueError):
                rep.errors.append(f"bad dev line: {rest}")
                continue
            rep.devices.setdefault(phase, []).append(dev)
        elif what == "irq":
            irq = parse_irq(rest)
            if irq is not None:
                rep.irqs.setdefault(phase, []).append(irq)
        elif what == "error":
            rep.errors.append(rest)
    return rep


def device_args(device: str, workdir: Path) -> list[str]:
    if device == "rng":
        return ["-device", f"virtio-rng-pci,id={QDEV_ID},ioeventfd=off"]
    if device == "net":
        return ["-netdev", "user,id=n0",
                "-device", f"virtio-net-pci,id={QDEV_ID},netdev=n0,ioeventfd=off,romfile="]
    if device == "blk":
        disk = workdir / "disk.img"
        with open(disk, "wb") as f:
            f.truncate(DISK_BYTES)
        return ["-drive", f"if=none,id=d0,file={disk},format=raw",
                "-device", f"virtio-blk-pci,id={QDEV_ID},drive=d0,ioeventfd=off"]
    raise ValueError(f"device must be one of {', '.join(DEVICES)}, not {device!r}")


class LinuxVM:
    """A running guest. Use as a context manager: the QEMU process and the RAM file go away."""

    def __init__(self, device: str, workdir: Path, rounds: int = 6, name: str = "") -> None:
        if device not in DEVICES:
            raise ValueError(f"device must be one of {', '.join(DEVICES)}, not {device!r}")
        if not 1 <= rounds <= 60:
            raise ValueError("rounds must be 1..60")
        if shutil.which("qemu-system-x86_64") is None:
            raise LinuxVmError("qemu-system-x86_64 is not installed")
        self.device = device
        self.workdir = workdir
        self.name = name or f"vra-linux-{device}-{uuid.uuid4().hex[:6]}"
        self.ram = Path("/dev/shm") / f"{self.name}.ram"
        self.serial = workdir / "serial.log"
        self.trace = workdir / "trace.log"
        self.stderr = workdir / "qemu.log"
        self.qmp = workdir / "qmp.sock"
        kernel, initrd = ensure_guest()
        events = workdir / "trace-events"
        events.write_text("\n".join(TRACE_EVENTS) + "\n")
        self.cmd = [
            "qemu-system-x86_64", "-accel", "tcg", "-cpu", "max", "-smp", "1",
            "-m", f"{RAM_MB}", "-M", "pc", "-nodefaults", "-display", "none", "-no-reboot",
            "-name", self.name,
            "-object", f"memory-backend-file,id=ram,size={RAM_MB}M,mem-path={self.ram},share=on",
            "-machine", "memory-backend=ram",
            "-kernel", str(kernel), "-initrd", str(initrd),
            "-append", f"console=ttyS0 panic=-1 quiet nokaslr vra.rounds={rounds}",
            "-serial", f"file:{self.serial}", "-msg", "timestamp=on",
            "-trace", f"events={events},file={self.trace}",
            "-qmp", f"unix:{self.qmp},server=on,wait=off",
        ] + device_args(device, workdir)
        self.proc: Optional[subprocess.Popen] = None

    def start(self) -> "LinuxVM":
        with open(self.stderr, "wb") as err:
            self.proc = subprocess.Popen(self.cmd, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=err)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def serial_text(self) -> str:
        try:
            return self.serial.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def qemu_log(self) -> str:
        try:
            return self.stderr.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_phase(self, phase: str, timeout: float) -> GuestReport:
        """Wait until the guest printed `VRA-LINUX phase <phase>`."""
        deadline = time.monotonic() + timeout
        while True:
            rep = parse_serial(self.serial_text())
            if phase in rep.phases:
                return rep
            if self.proc is not None and self.proc.poll() is not None:
                raise LinuxVmError(f"QEMU exited ({self.proc.returncode}) before phase "
                                   f"{phase!r}; last phases {rep.phases[-3:]}; "
                                   f"qemu: {self.qemu_log().strip()[-300:]}")
            if time.monotonic() > deadline:
                raise LinuxVmError(f"no phase {phase!r} within {timeout:.0f} s "
                                   f"(phases so far: {rep.phases})")
            time.sleep(0.05)

    def wait_exit(self, timeout: float) -> int:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise LinuxVmError(f"QEMU did not exit within {timeout:.0f} s") from None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        try:
            os.unlink(self.ram)
        except FileNotFoundError:
            pass

    def __enter__(self) -> "LinuxVM":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.kill()
