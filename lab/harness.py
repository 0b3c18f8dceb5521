"""Run the freestanding lab guest (lab/guest) under QEMU + KVM and parse what it reports.

The guest is a scripted virtio driver: it finds its virtio devices (virtio-rngs, and whatever
extra_args add; virtio-pci modern, legacy, or virtio-mmio on microvm; on pc or q35, under qboot
or SeaBIOS), brings them to DRIVER_OK, runs a scenario (fault, recover, ...) on them, and
prints one `VRA <what> key=value ...` line per fact on COM1, with its own TSC timestamps.
`GuestSpec.extra` adds a net or blk device it only brings up and never faults.
This module starts QEMU, waits for it, and turns the serial output and QEMU's messages into
typed results. It does not depend on `agent`.

    spec = GuestSpec(transport="modern", scenario="recover", devices=2)
    vm = LabVM.start(spec)          # non-blocking; vm.pid is QEMU's pid
    result = vm.wait(timeout=30)    # LabResult
    # or: result = run(spec)
"""
from __future__ import annotations

import fcntl
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

LAB_DIR = Path(__file__).resolve().parent
GUEST_DIR = LAB_DIR / "guest"
GUEST_ELF = GUEST_DIR / "build" / "guest.elf"
GUEST_MULTIBOOT_ELF = GUEST_DIR / "build" / "guest-multiboot.elf"
QBOOT = Path("/usr/share/qemu/qboot.rom")

TRANSPORTS = ("modern", "legacy", "mmio")
SCENARIOS = (
    "init", "fault", "recover", "stuck", "fail", "readstorm", "writestorm", "bitclear",
    "failreinit", "linux", "netkvm",
)
IRQ_MODES = ("msix", "intx")
BOOT_PROTOCOLS = ("pvh", "multiboot")
MACHINES = ("pc", "q35", "microvm")
FIRMWARES = ("qboot", "seabios")
IRQCHIPS = ("on", "split")
EXTRAS = ("", "net", "blk")
VIRTIO_TYPES = {"net": 1, "blk": 2, "rng": 4}
PCI_CFG_MECHANISMS = ("cf8", "ecam")
MAX_DEVICES = 8  # the guest's table size
EXTRA_IMAGE = "extra-blk.img"     # extra="blk": a raw image in the VM's workdir
EXTRA_IMAGE_BYTES = 64 * 1024
# scenarios that do the pre-fault queue I/O (GuestSpec.prefault)
PREFAULT_SCENARIOS = ("fault", "stuck", "recover", "fail")

# QEMU's -cpu host fails on some nested hosts (MSR 0x10a, IA32_ARCH_CAPABILITIES); invtsc makes
# QEMU publish KVM's TSC frequency in CPUID 0x40000010, the guest's time base.
DEFAULT_CPU = os.environ.get("VRA_LAB_CPU", "host,migratable=no,+invtsc,-arch-capabilities")

# isa-debug-exit: QEMU exits with (code << 1) | 1
GUEST_OK_EXIT = 1
GUEST_FATAL_EXIT = 5

STATUS_DRIVER_OK = 0x04
STATUS_NEEDS_RESET = 0x40
STATUS_FAILED = 0x80


class LabError(RuntimeError):
    """The lab could not run a scenario as asked (bad spec, build failure, guest error)."""


class LabTimeout(LabError):
    """QEMU did not exit in time; it has been killed. `partial` holds what was parsed."""

    def __init__(self, message: str, partial: "LabResult | None" = None):
        super().__init__(message)
        self.partial = partial


@dataclass(frozen=True)
class GuestSpec:
    transport: str = "modern"
    scenario: str = "init"
    devices: int = 1                 # virtio-rng devices in the VM
    irq: str = "msix"                # PCI only: msix, or intx (device without MSI-X)
    repeat: int = 1                  # episodes (recover, fail, netkvm)
    delay_ms: int = 0                # extra delay before reacting to NEEDS_RESET
    hold_ms: int = 0                 # stuck/fault: stay alive this long; linux: run this long
    fault_dev: int | None = None     # index of the device that faults; None = all of them
    reads: int = 100000              # readstorm
    writes: int = 100000             # writestorm
    period_ms: int = 10              # netkvm status check period
    kick_ms: int = 5                 # linux: kick period
    start_delay_ms: int = 0          # busy-wait after boot, before touching any device
    fault_delay_ms: int = 0          # fault/stuck/recover/fail: busy-wait before each fault
    detect_ms: int = 2000            # give up waiting for NEEDS_RESET after this long (a busy host
                                     # can hold QEMU off for a while)
    pit_ms: int = 0                  # also measure the TSC against the PIT (cross-check)
    qmp: bool = False                # expose a QMP unix socket (vm.qmp_path)
    boot: str | None = None          # pvh or multiboot; None: multiboot under SeaBIOS, else pvh
    # Before each fault (fault, stuck, recover, fail), as a running driver: read
    # config_generation and device config, have the device complete one queue request and take
    # its interrupt (MSI-X: the queue vector; INTx / mmio: the line, ISR bit 0), then wait
    # queue_gap_ms and fault. The guest logs it as `VRA queue` (Episode.queue_*).
    prefault: bool = True
    queue_gap_ms: int = 2
    machine: str | None = None       # pc | q35 (PCI transports), microvm (mmio); None: pc / microvm
    firmware: str = "qboot"          # qboot (-bios qboot.rom) | seabios (QEMU's default BIOS)
    irqchip: str | None = None       # on | split (-machine kernel-irqchip=); None: machine default
    # "", "net", "blk": one more device (qdev id extra0), brought up, never faulted; the guest
    # treats every device of that type so (devices added with extra_args of another type are
    # the scenario's, as before: faulted with fault_dev=None, no pre-fault queue request)
    extra: str = ""
    extra_transitional: bool = False  # the extra device legacy-capable (id 0x1000/0x1001)
    pcicfg: str = "cf8"              # the guest's config accesses: cf8 (0xCF8/0xCFC) | ecam (q35)
    # False: every virtio device with ioeventfd=off (QEMU then handles each kick in the vCPU
    # thread that made it, not through an eventfd in its main loop)
    ioeventfd: bool = True
    cpu: str = DEFAULT_CPU
    memory_mb: int = 32
    trace: tuple[str, ...] = ()      # QEMU -trace patterns, logged to the -D file
    extra_args: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        def bad(msg: str) -> None:
            raise ValueError(f"GuestSpec: {msg}")

        if self.transport not in TRANSPORTS:
            bad(f"transport {self.transport!r} not in {TRANSPORTS}")
        if self.scenario not in SCENARIOS:
            bad(f"scenario {self.scenario!r} not in {SCENARIOS}")
        if self.irq not in IRQ_MODES:
            bad(f"irq {self.irq!r} not in {IRQ_MODES}")
        if self.boot is not None and self.boot not in BOOT_PROTOCOLS:
            bad(f"boot {self.boot!r} not in {BOOT_PROTOCOLS}")
        if self.machine is not None and self.machine not in MACHINES:
            bad(f"machine {self.machine!r} not in {MACHINES}")
        if (self.effective_machine == "microvm") != (self.transport == "mmio"):
            bad(f"machine {self.effective_machine!r} does not fit transport {self.transport!r} "
                "(pc or q35 for virtio-pci, microvm for virtio-mmio)")
        if self.firmware not in FIRMWARES:
            bad(f"firmware {self.firmware!r} not in {FIRMWARES}")
        if self.firmware == "seabios" and self.effective_machine == "microvm":
            bad("firmware 'seabios' is for pc and q35 (microvm boots its own qboot)")
        if (self.effective_machine, self.firmware, self.extra) == ("q35", "qboot", "net"):
            # measured with QEMU 7.2's qboot.rom: with any NIC on q35 (virtio-net, e1000e) it
            # halts before it loads the guest
            bad("extra 'net' on q35 needs firmware 'seabios' (qboot halts on q35 with a NIC)")
        if self.pcicfg not in PCI_CFG_MECHANISMS:
            bad(f"pcicfg {self.pcicfg!r} not in {PCI_CFG_MECHANISMS}")
        if self.pcicfg == "ecam" and self.effective_machine != "q35":
            bad("pcicfg 'ecam' needs machine 'q35' (the MCH's PCIEXBAR)")
        if self.irqchip is not None and self.irqchip not in IRQCHIPS:
            bad(f"irqchip {self.irqchip!r} not in {IRQCHIPS}")
        if self.extra not in EXTRAS:
            bad(f"extra {self.extra!r} not in {EXTRAS}")
        if self.extra_transitional and (not self.extra or self.transport == "mmio"):
            bad("extra_transitional needs extra=net|blk on a PCI transport")
        if self.devices + bool(self.extra) > MAX_DEVICES:
            bad(f"devices + extra must be <= {MAX_DEVICES}")
        if not 1 <= self.devices <= MAX_DEVICES:
            bad(f"devices must be 1..{MAX_DEVICES}, got {self.devices}")
        if self.fault_dev is not None and not 0 <= self.fault_dev < self.devices:
            bad(f"fault_dev {self.fault_dev} out of range for {self.devices} device(s)")
        for name in ("repeat", "delay_ms", "hold_ms", "reads", "writes", "period_ms", "kick_ms",
                     "start_delay_ms", "fault_delay_ms", "detect_ms", "pit_ms", "memory_mb",
                     "queue_gap_ms"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 0 or v >= 2**31:
                bad(f"{name} must be a non-negative int, got {v!r}")
        if self.repeat < 1:
            bad("repeat must be >= 1")
        if self.pit_ms > 54:
            bad("pit_ms must be <= 54 (16-bit PIT counter)")
        if self.memory_mb < 16:
            bad("memory_mb must be >= 16")

    @property
    def effective_irq(self) -> str:
        """virtio-mmio has no MSI-X: its interrupt is always a line."""
        return "intx" if self.transport == "mmio" else self.irq

    @property
    def effective_machine(self) -> str:
        if self.machine is not None:
            return self.machine
        return "microvm" if self.transport == "mmio" else "pc"

    @property
    def effective_boot(self) -> str:
        if self.boot is not None:
            return self.boot
        return "multiboot" if self.firmware == "seabios" else "pvh"

    @property
    def does_prefault(self) -> bool:
        """Whether the guest does the pre-fault queue I/O in this scenario."""
        return self.prefault and self.scenario in PREFAULT_SCENARIOS

    def cmdline(self) -> str:
        parts = {
            "scenario": self.scenario, "transport": self.transport, "irq": self.effective_irq,
            "repeat": self.repeat, "delay_ms": self.delay_ms, "hold_ms": self.hold_ms,
            "fault_dev": "all" if self.fault_dev is None else self.fault_dev,
            "reads": self.reads, "writes": self.writes, "period_ms": self.period_ms,
            "kick_ms": self.kick_ms, "start_delay_ms": self.start_delay_ms,
            "fault_delay_ms": self.fault_delay_ms,
            "detect_ms": self.detect_ms, "pit_ms": self.pit_ms,
            "prefault": int(self.prefault), "queue_gap_ms": self.queue_gap_ms,
        }
        if self.pcicfg != "cf8":
            parts["pcicfg"] = self.pcicfg
        if self.extra:
            # devices of this virtio type are not the scenario's (others, e.g. from extra_args,
            # still are: every virtio device the guest finds is, unless told otherwise)
            parts["extra_type"] = VIRTIO_TYPES[self.extra]
        return " ".join(f"{k}={v}" for k, v in parts.items())


def qemu_binary() -> str:
    path = os.environ.get("VRA_QEMU") or shutil.which("qemu-system-x86_64")
    if not path:
        raise LabError("qemu-system-x86_64 not found (set VRA_QEMU)")
    return path


def _pci_flavour(spec: GuestSpec, transitional: bool = False) -> str:
    if transitional:
        flavour = ",disable-legacy=off,disable-modern=off"
    elif spec.transport == "modern":
        flavour = ",disable-legacy=on,disable-modern=off"
    else:
        flavour = ",disable-legacy=off,disable-modern=on"
    if spec.irq == "intx":
        flavour += ",vectors=0"  # no MSI-X capability at all
    return flavour + _ioeventfd(spec)


def _ioeventfd(spec: GuestSpec) -> str:
    return "" if spec.ioeventfd else ",ioeventfd=off"


def device_args(spec: GuestSpec, workdir: Path | None = None) -> list[str]:
    """The virtio-rngs (vrng0...), then the extra device (qdev id `extra0`): after them on the
    command line, so on the bus too. extra=blk needs `workdir` for its image."""
    args: list[str] = []
    for i in range(spec.devices):
        if spec.transport == "mmio":
            dev = f"virtio-rng-device,id=vrng{i}"
        else:
            dev = f"virtio-rng-pci,id=vrng{i}" + _pci_flavour(spec)
        args += ["-device", dev]
    if spec.extra:
        bus = "device" if spec.transport == "mmio" else "pci"
        if spec.extra == "net":
            # hubport: a backend without host networking; romfile=: no iPXE option ROM
            args += ["-netdev", "hubport,id=extranet0,hubid=0"]
            dev = f"virtio-net-{bus},id=extra0,netdev=extranet0"
        else:
            image = (workdir or Path(".")) / EXTRA_IMAGE
            args += ["-drive", f"file={image},format=raw,if=none,id=extrablk0"]
            dev = f"virtio-blk-{bus},id=extra0,drive=extrablk0"
        if bus == "pci":
            dev += ",romfile=" + _pci_flavour(spec, spec.extra_transitional)
        args += ["-device", dev]
    return args


def prepare_workdir(spec: GuestSpec, workdir: Path) -> None:
    """Files the command line refers to: the extra blk device's raw image."""
    if spec.extra == "blk":
        image = workdir / EXTRA_IMAGE
        if not image.exists() or image.stat().st_size != EXTRA_IMAGE_BYTES:
            image.write_bytes(bytes(EXTRA_IMAGE_BYTES))


def qemu_command(spec: GuestSpec, workdir: Path, kernel: Path | None = None) -> list[str]:
    """The full QEMU command line for `spec`, with all files inside `workdir`."""
    kernel = kernel or (GUEST_ELF if spec.effective_boot == "pvh" else GUEST_MULTIBOOT_ELF)
    cmd = [qemu_binary(), "-name", f"vra-lab-{spec.transport}-{spec.scenario}",
           "-accel", "kvm", "-cpu", spec.cpu, "-smp", "1", "-m", str(spec.memory_mb)]
    machine = spec.effective_machine
    if machine == "microvm":
        cmd += ["-M", "microvm", "-global", "virtio-mmio.force-legacy=false"]
        if not spec.ioeventfd:
            cmd += ["-global", "virtio-mmio.ioeventfd=off"]   # a transport property there
    else:
        cmd += ["-M", machine]
        if spec.firmware == "qboot":
            cmd += ["-bios", str(QBOOT)]
    if spec.irqchip is not None:
        cmd += ["-machine", f"kernel-irqchip={spec.irqchip}"]
    cmd += ["-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            "-msg", "timestamp=on",
            "-serial", f"file:{workdir / 'serial.log'}",
            "-D", str(workdir / "qemu.log"), "-d", "guest_errors",
            "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"]
    for pattern in spec.trace:
        cmd += ["-trace", pattern]
    if spec.qmp:
        cmd += ["-qmp", f"unix:{workdir / 'qmp.sock'},server=on,wait=off"]
    cmd += device_args(spec, workdir)
    cmd += ["-kernel", str(kernel), "-append", spec.cmdline()]
    cmd += list(spec.extra_args)
    return cmd


def ensure_guest() -> Path:
    """Builds lab/guest if needed (make decides); serialised between processes with a lock."""
    with open(GUEST_DIR / "Makefile", "rb") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        proc = subprocess.run(["make", "-s", "-C", str(GUEST_DIR)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise LabError(f"building the lab guest failed:\n{proc.stdout}{proc.stderr}")
    return GUEST_ELF


# ---------------------------------------------------------------- results


@dataclass(frozen=True)
class BootInfo:
    via: str
    tsc_hz: int
    tsc_src: str
    tsc_hz_cpuid: int
    tsc_hz_pit: int
    tsc: int                     # guest TSC at entry: the origin of every *_ns below


@dataclass(frozen=True)
class DeviceInfo:
    idx: int
    transport: str
    type: int                    # virtio device type (4 = entropy)
    space: str                   # "mmio" or "pio": where the registers below live
    status_addr: int
    status_size: int
    irq: str                     # "msix" or "intx"
    qsize: int
    features: int
    bdf: str | None = None
    pci_id: int | None = None
    mmio_base: int | None = None
    mmio_version: int | None = None
    gen_addr: int | None = None
    msix_config_addr: int | None = None
    isr_addr: int | None = None
    ack_addr: int | None = None
    notify_addr: int | None = None
    msix_config: int | None = None   # virtio config vector (MSI-X table entry)
    msix_queue: int | None = None
    msi_addr: int | None = None
    msi_data_config: int | None = None   # the APIC vector the config MSI carries
    msi_data_queue: int | None = None
    irq_line: int | None = None
    devcfg_addr: int | None = None       # device-specific configuration
    line_vector: int | None = None       # INTx / mmio: the vector of the IOAPIC entry it programmed
    extra: bool = False                  # not a virtio-rng (GuestSpec.extra): never faulted

    @property
    def type_name(self) -> str:
        return {v: k for k, v in VIRTIO_TYPES.items()}.get(self.type, str(self.type))


@dataclass(frozen=True)
class StatusWrite:
    dev: int
    ep: int                      # -1: initial bring-up
    value: int
    tsc: int
    ns: int                      # since guest entry


@dataclass
class Episode:
    """One fault of one device and what the guest did about it (times in ns since entry)."""

    dev: int
    ep: int
    fault_ns: int | None = None
    needs_reset_ns: int | None = None      # the read that first returned NEEDS_RESET (after it)
    needs_reset_issue_ns: int | None = None    # ... stamped just before that read was issued
    needs_reset_status: int | None = None
    needs_reset_reads: int | None = None
    timed_out: bool = False                # NEEDS_RESET never seen within detect_ms
    isr: int | None = None                 # INTx: the ISR value read after detection
    failed_ns: int | None = None           # write with FAILED set
    reset_ns: int | None = None            # write of 0
    reset_done_ns: int | None = None       # first read of 0 after it (after the read)
    reset_done_issue_ns: int | None = None
    driver_ok_ns: int | None = None        # write with DRIVER_OK
    writes: list[StatusWrite] = field(default_factory=list)
    # the pre-fault queue request (GuestSpec.prefault): kicked at queue_kick_ns, its interrupt
    # taken at queue_irq_ns (via "msix": queue_vector is the queue's MSI-X vector; "line": the
    # INTx / mmio line's IOAPIC vector, queue_isr its ISR with bit 0; "poll": no interrupt
    # routed, the guest polled the used ring, then read the ISR)
    queue_kick_ns: int | None = None
    queue_irq_ns: int | None = None
    queue_via: str | None = None
    queue_vector: int | None = None
    queue_isr: int | None = None
    queue_used: int | None = None
    queue_gen: int | None = None           # config_generation read before it

    @staticmethod
    def _diff(a: int | None, b: int | None) -> int | None:
        return None if a is None or b is None else b - a

    @property
    def needs_reset_window_ns(self) -> int | None:
        """Issue -> return of the detecting read. The host completed the access inside this
        window; a wide one means the vCPU was held up (preempted, or QEMU busy)."""
        return self._diff(self.needs_reset_issue_ns, self.needs_reset_ns)

    @property
    def detect_latency_ns(self) -> int | None:
        return self._diff(self.fault_ns, self.needs_reset_ns)

    @property
    def reaction_ns(self) -> int | None:
        return self._diff(self.needs_reset_ns, self.reset_ns)

    @property
    def reset_latency_ns(self) -> int | None:
        return self._diff(self.reset_ns, self.reset_done_ns)

    @property
    def reinit_ns(self) -> int | None:
        return self._diff(self.reset_ns, self.driver_ok_ns)

    @property
    def recovery_ns(self) -> int | None:
        """NEEDS_RESET first seen -> DRIVER_OK written."""
        return self._diff(self.needs_reset_ns, self.driver_ok_ns)

    @property
    def total_ns(self) -> int | None:
        """Fault injected -> DRIVER_OK written."""
        return self._diff(self.fault_ns, self.driver_ok_ns)

    @property
    def queue_to_fault_ns(self) -> int | None:
        """Queue interrupt taken -> fault injected."""
        return self._diff(self.queue_irq_ns, self.fault_ns)

    @property
    def status_values(self) -> list[int]:
        return [w.value for w in self.writes]


@dataclass(frozen=True)
class Storm:
    dev: int
    op: str
    n: int
    value: int
    differing: int               # reads that returned another value
    duration_ns: int


@dataclass(frozen=True)
class QemuMessage:
    text: str
    timestamp: str | None        # from -msg timestamp=on


@dataclass
class LabResult:
    spec: GuestSpec
    exit_code: int               # QEMU's
    wall_s: float                # QEMU start -> exit
    boot: BootInfo | None = None
    devices: list[DeviceInfo] = field(default_factory=list)
    status_writes: list[StatusWrite] = field(default_factory=list)
    episodes: list[Episode] = field(default_factory=list)
    storms: list[Storm] = field(default_factory=list)
    final_status: dict[int, int] = field(default_factory=dict)
    done: bool = False
    guest_errors: list[str] = field(default_factory=list)
    qemu_messages: list[QemuMessage] = field(default_factory=list)
    serial_lines: list[str] = field(default_factory=list)
    unparsed_lines: int = 0
    log_dropped: int = 0
    linux_kicks: int | None = None
    done_ns: int | None = None
    pci_cfg: str = "cf8"             # how the guest reached PCI configuration space
    ecam_base: int | None = None     # pcicfg=ecam: the window (PCIEXBAR)...
    ecam_enabled_by: str | None = None   # ... enabled by "firmware" (SeaBIOS, qboot) or "guest"
    workdir: Path | None = None

    @property
    def ok(self) -> bool:
        return self.done and self.exit_code == GUEST_OK_EXIT and not self.guest_errors

    @property
    def virtio_errors(self) -> list[str]:
        """QEMU's error messages (virtio_error and friends), warnings left out."""
        return [m.text for m in self.qemu_messages
                if not m.text.startswith("warning:") and "terminating on signal" not in m.text]

    def device(self, idx: int) -> DeviceInfo:
        for d in self.devices:
            if d.idx == idx:
                return d
        raise KeyError(f"no device {idx}; devices: {[d.idx for d in self.devices]}")

    def episodes_of(self, dev: int) -> list[Episode]:
        return [e for e in self.episodes if e.dev == dev]

    def raise_for_error(self) -> "LabResult":
        if not self.ok:
            tail = "\n".join(self.serial_lines[-15:])
            msgs = "\n".join(m.text for m in self.qemu_messages[-10:])
            raise LabError(
                f"lab run failed (exit {self.exit_code}, done={self.done}, guest errors "
                f"{self.guest_errors}); serial tail:\n{tail}\nQEMU messages:\n{msgs}")
        return self


# ---------------------------------------------------------------- parsing

_KV = re.compile(r"(\w+)=(\S*)")
_QEMU_MSG = re.compile(r"^(?:(\d{4}-\d\d-\d\dT[\d:.]+Z) )?qemu-system-\w+: (.*)$")


def _num(v: str) -> int:
    return int(v, 0)


def parse_line(line: str) -> tuple[str, dict[str, str]] | None:
    """`VRA what k=v ...` -> (what, {k: v}); None for other lines."""
    if not line.startswith("VRA "):
        return None
    head, _, rest = line[4:].partition(" ")
    if head == "cmdline":
        return head, {"text": rest}
    return head, dict(_KV.findall(rest))


def parse_qemu_messages(text: str) -> list[QemuMessage]:
    out = []
    for line in text.splitlines():
        m = _QEMU_MSG.match(line.strip())
        if m:
            out.append(QemuMessage(text=m.group(2), timestamp=m.group(1)))
    return out


_DEVICE_STR_FIELDS = {"transport", "space", "irq", "bdf"}
_DEVICE_INT_FIELDS = {f.name for f in fields(DeviceInfo)} - _DEVICE_STR_FIELDS - {"extra"}


def parse_serial(text: str, result: LabResult) -> None:
    """Fills `result` from the guest's serial output."""
    boot: BootInfo | None = None
    episodes: dict[tuple[int, int], Episode] = {}

    def ns(tsc: int) -> int:
        if boot is None or not boot.tsc_hz:
            raise LabError("guest reported a timestamp before its boot line")
        return (tsc - boot.tsc) * 1_000_000_000 // boot.tsc_hz

    def episode(kv: dict[str, str]) -> Episode | None:
        dev, ep = int(kv["dev"]), int(kv["ep"])
        if ep < 0:
            return None
        key = (dev, ep)
        if key not in episodes:
            episodes[key] = Episode(dev=dev, ep=ep)
        return episodes[key]

    for line in text.splitlines():
        result.serial_lines.append(line)
        parsed = parse_line(line)
        if parsed is None:
            if line.strip():
                result.unparsed_lines += 1
            continue
        what, kv = parsed
        try:
            if what == "boot":
                boot = BootInfo(via=kv["via"], tsc_hz=int(kv["tsc_hz"]), tsc_src=kv["tsc_src"],
                                tsc_hz_cpuid=int(kv["tsc_hz_cpuid"]),
                                tsc_hz_pit=int(kv["tsc_hz_pit"]), tsc=int(kv["tsc"]))
                result.boot = boot
            elif what == "dev":
                args: dict[str, Any] = {}
                for k, v in kv.items():
                    if k in _DEVICE_INT_FIELDS:
                        args[k] = _num(v)
                    elif k in _DEVICE_STR_FIELDS:
                        args[k] = v
                    elif k == "extra":
                        args[k] = bool(_num(v))
                result.devices.append(DeviceInfo(**args))
            elif what == "status":
                w = StatusWrite(dev=int(kv["dev"]), ep=int(kv["ep"]), value=_num(kv["value"]),
                                tsc=int(kv["tsc"]), ns=ns(int(kv["tsc"])))
                result.status_writes.append(w)
                e = episode(kv)
                if e is not None:
                    e.writes.append(w)
                    if w.value == 0:
                        if e.reset_ns is None:
                            e.reset_ns = w.ns
                    elif w.value & STATUS_FAILED:
                        e.failed_ns = w.ns
                    elif w.value & STATUS_DRIVER_OK:
                        e.driver_ok_ns = w.ns
            elif what == "fault":
                e = episode(kv)
                assert e is not None
                e.fault_ns = ns(int(kv["tsc"]))
            elif what == "needs_reset":
                e = episode(kv)
                assert e is not None
                e.needs_reset_ns = ns(int(kv["tsc"]))
                if "tsc_issue" in kv:
                    e.needs_reset_issue_ns = ns(int(kv["tsc_issue"]))
                e.needs_reset_status = _num(kv["value"])
                e.needs_reset_reads = int(kv["reads"])
            elif what == "timeout":
                e = episode(kv)
                if e is not None and kv.get("what") == "needs_reset":
                    e.timed_out = True
                elif kv.get("what") == "reset_done":
                    result.guest_errors.append(f"reset never completed: {line}")
                elif kv.get("what") == "queue":
                    result.guest_errors.append(f"no queue interrupt: {line}")
            elif what == "queue":
                e = episode(kv)
                assert e is not None
                e.queue_kick_ns = ns(int(kv["tsc_kick"]))
                e.queue_irq_ns = ns(int(kv["tsc"]))
                e.queue_via = kv["via"]
                e.queue_vector = _num(kv["vector"])
                e.queue_isr = _num(kv["isr"]) if "isr" in kv else None
                e.queue_used = int(kv["used"])
                e.queue_gen = _num(kv["gen"])
            elif what == "reset_done":
                e = episode(kv)
                if e is not None and e.reset_done_ns is None:
                    e.reset_done_ns = ns(int(kv["tsc"]))
                    if "tsc_issue" in kv:
                        e.reset_done_issue_ns = ns(int(kv["tsc_issue"]))
            elif what == "isr":
                e = episode(kv)
                if e is not None:
                    e.isr = _num(kv["value"])
            elif what == "storm":
                result.storms.append(Storm(
                    dev=int(kv["dev"]), op=kv["op"], n=int(kv["n"]), value=_num(kv["value"]),
                    differing=int(kv["differing"]),
                    duration_ns=ns(int(kv["tsc_end"])) - ns(int(kv["tsc_start"]))))
            elif what == "linux":
                result.linux_kicks = int(kv["kicks"])
            elif what == "pci":
                result.pci_cfg = kv["cfg"]
                result.ecam_base = _num(kv["ecam_base"])
                result.ecam_enabled_by = kv["enabled_by"]
            elif what == "log_dropped":
                result.log_dropped += int(kv["n"])
            elif what == "error":
                result.guest_errors.append(line)
            elif what == "done":
                result.done = True
                result.done_ns = ns(int(kv["tsc"]))
                for k, v in kv.items():
                    if k.startswith("status") and k[6:].isdigit():
                        result.final_status[int(k[6:])] = _num(v)
            elif what in ("cmdline", "started", "found"):
                pass
            else:
                result.unparsed_lines += 1
        except (KeyError, ValueError, AssertionError) as exc:
            raise LabError(f"malformed guest line {line!r}: {exc!r}") from exc
    result.episodes = [episodes[k] for k in sorted(episodes)]


# ---------------------------------------------------------------- running


class LabVM:
    """One running QEMU with the lab guest. Several may run at once (own temp dir each)."""

    def __init__(self, spec: GuestSpec, proc: subprocess.Popen, workdir: Path,
                 command: list[str], keep_workdir: bool):
        self.spec = spec
        self.proc = proc
        self.workdir = workdir
        self.command = command
        self._keep = keep_workdir
        self._t0 = time.monotonic()
        self.result: LabResult | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def qmp_path(self) -> Path | None:
        return self.workdir / "qmp.sock" if self.spec.qmp else None

    @property
    def serial_path(self) -> Path:
        return self.workdir / "serial.log"

    @property
    def log_path(self) -> Path:
        return self.workdir / "qemu.log"

    @classmethod
    def start(cls, spec: GuestSpec, workdir: Path | None = None,
              keep_workdir: bool | None = None) -> "LabVM":
        ensure_guest()
        if workdir is None:
            workdir = Path(tempfile.mkdtemp(prefix="vra-lab-"))
            keep = bool(keep_workdir) if keep_workdir is not None else False
        else:
            workdir.mkdir(parents=True, exist_ok=True)
            keep = True if keep_workdir is None else keep_workdir
        command = qemu_command(spec, workdir)
        prepare_workdir(spec, workdir)
        (workdir / "serial.log").write_bytes(b"")  # readable (and empty) before QEMU opens it
        stderr = open(workdir / "stderr.log", "wb")
        try:
            proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=stderr,
                                    stderr=stderr, cwd=workdir)
        finally:
            stderr.close()
        return cls(spec, proc, workdir, command, keep)

    def serial_text(self) -> str:
        """What the guest has printed so far (complete lines only)."""
        text = _read(self.serial_path)
        return text[:text.rfind("\n") + 1]

    def wait_for_line(self, what: str, timeout: float = 10.0) -> dict[str, str]:
        """Blocks until the guest printed `VRA <what> ...`; returns its key=value fields.
        Raises LabError if QEMU exits first, LabTimeout (QEMU left running) on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            for line in self.serial_text().splitlines():
                parsed = parse_line(line)
                if parsed and parsed[0] == what:
                    return parsed[1]
            if self.proc.poll() is not None:
                raise LabError(f"QEMU exited ({self.proc.returncode}) before 'VRA {what}'")
            if time.monotonic() > deadline:
                raise LabTimeout(f"no 'VRA {what}' line within {timeout}s")
            time.sleep(0.01)

    def wait(self, timeout: float = 30.0) -> LabResult:
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            partial = self._collect(self.proc.returncode)
            raise LabTimeout(f"QEMU (pid {self.pid}) still running after {timeout}s; killed. "
                             f"Serial tail: {partial.serial_lines[-5:]}", partial) from None
        return self._collect(code)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def _collect(self, code: int) -> LabResult:
        wall = time.monotonic() - self._t0
        result = LabResult(spec=self.spec, exit_code=code, wall_s=wall,
                           workdir=self.workdir if self._keep else None)
        serial = _read(self.serial_path)
        messages = _read(self.workdir / "stderr.log") + "\n" + _read(self.log_path)
        result.qemu_messages = parse_qemu_messages(messages)
        parse_serial(serial, result)
        if not self._keep:
            shutil.rmtree(self.workdir, ignore_errors=True)
        self.result = result
        return result

    def __enter__(self) -> "LabVM":
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()
        if not self._keep:
            shutil.rmtree(self.workdir, ignore_errors=True)


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


def wait_qmp(path: str | Path, proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """Until QEMU accepts QMP on `path`: the socket file appears at bind(), before listen(),
    and a connect in between is refused (a busy host widens that window)."""
    from agent.vmm import qmp

    deadline = time.monotonic() + timeout
    while True:
        try:
            qmp.query(str(path), "query-status", timeout=2)
            return
        except (qmp.QmpConnectError, qmp.QmpProtocolError):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def run(spec: GuestSpec, timeout: float = 30.0, check: bool = True) -> LabResult:
    """Start a VM for `spec`, wait for it, and (check=True) raise LabError unless it succeeded."""
    vm = LabVM.start(spec)
    try:
        result = vm.wait(timeout)
    finally:
        vm.kill()
    return result.raise_for_error() if check else result
