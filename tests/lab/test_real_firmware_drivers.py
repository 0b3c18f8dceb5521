"""Device names and types when the drivers are not ours: SeaBIOS's own virtio-blk driver and
iPXE's virtio-net driver (QEMU's bundled option ROM), under KVM, the agent (`run`) as a subprocess
started before the VM, so it sees the firmware enumerate the PCI bus.

The VM: QEMU's default BIOS (SeaBIOS), a virtio-blk-pci on a 1 MiB raw disk of zeros (SeaBIOS
initialises it to DRIVER_OK, finds no boot sector), a virtio-net-pci with its default iPXE ROM on
a `restrict=on` user backend (no traffic leaves QEMU), tried after the disk (`bootindex`), and a
virtio-rng-pci that no firmware drives. `-M pc`: SeaBIOS reaches configuration space through the
0xCF8/0xCFC ports; `-M q35`: through the ECAM window it programs in PCIEXBAR.

The truth is QEMU's: `query-pci` (which function is which device), `x-query-virtio-status`
(which devices a driver wrote status to, polled while the firmware runs) and SeaBIOS's debug port
(`found virtio-blk at bb:dd.f`). Every device the firmware drove must be exported as
`pci-0000:bb:dd.f` with its type, its `virtio_device_status` must be QEMU's, every device the agent
exports for the VM must be one of query-pci's virtio functions with the right type, and nothing
happened that is an episode or a protocol violation.

What the firmware leaves the status at: SeaBIOS leaves the disk at 15 (DRIVER_OK). iPXE resets
the NIC and writes ACKNOWLEDGE | DRIVER (3) when it probes, FEATURES_OK and DRIVER_OK when it
opens it. On hosts whose KVM cannot run iPXE's protected-mode code (a pagetable-based nested KVM,
kvm_pvm, stops the VM with "KVM internal error. Suberror: 1" at an `iret` right after the probe)
the NIC is left at 3 and the VM in runstate `internal-error`; this test accepts either, as the
names come from the enumeration, not from how far a driver got. There, iPXE's real-mode start is
slow too: 12 to 30 s from QEMU's start to its first status write on a busy 2-core host.

Other sessions may run VMs on this host at the same time: per-VM series are filtered by VM name.
"""
from __future__ import annotations

import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from lab.harness import wait_qmp
from tests.lab.scrape import samples, wait_until

pytestmark = [pytest.mark.kvm, pytest.mark.bpf]

DRIVER_OK = 0x04             # virtio device status DRIVER_OK
FIRMWARE_TIMEOUT_S = 60.0    # blk and net driven and named: 14-31 s seen on a busy host
SETTLE_TIMEOUT_S = 10.0      # then the NIC reaches DRIVER_OK or the VM stops (reported only)
AGREE_TIMEOUT_S = 15.0       # the agent's status gauge catches up with QEMU's
POLL_S = 0.1


@pytest.fixture
def agent(bpf, kvm):
    from agent.demo import AgentProcess

    with AgentProcess(stuck_after_s=60) as a:
        yield a


@dataclass
class Seen:
    """What was observed while polling, per qdev id (QEMU) or agent device name."""
    qemu_last: dict[str, int] = field(default_factory=dict)
    qemu_or: dict[str, int] = field(default_factory=dict)       # every status bit QEMU showed
    qemu_history: dict[str, list[int]] = field(default_factory=dict)
    agent_or: dict[str, int] = field(default_factory=dict)
    runstate: str = ""

    def qemu(self, qdev: str, status: int) -> None:
        self.qemu_last[qdev] = status
        self.qemu_or[qdev] = self.qemu_or.get(qdev, 0) | status
        hist = self.qemu_history.setdefault(qdev, [])
        if not hist or hist[-1] != status:
            hist.append(status)

    def agent(self, device: str, status: int) -> None:
        self.agent_or[device] = self.agent_or.get(device, 0) | status


def qemu_cmd(machine: str, name: str, disk: Path, qmp: Path, serial: Path, debug: Path) -> list:
    return ["qemu-system-x86_64", "-accel", "kvm", "-M", machine, "-m", "128",
            "-nodefaults", "-display", "none", "-name", name,
            "-qmp", f"unix:{qmp},server=on,wait=off",
            "-serial", f"file:{serial}",
            "-chardev", f"file,id=dbg,path={debug}",
            "-device", "isa-debugcon,iobase=0x402,chardev=dbg",
            "-drive", f"file={disk},if=none,id=d0,format=raw",
            "-device", "virtio-blk-pci,id=blk0,drive=d0,bootindex=1",
            "-netdev", "user,id=n0,restrict=on",
            "-device", "virtio-net-pci,id=net0,netdev=n0,bootindex=2",
            "-device", "virtio-rng-pci,id=rng0",
            "-boot", "strict=on"]


class Qemu:
    """QMP in short sessions (one per poll), so the socket stays free for the agent."""

    def __init__(self, sock: Path):
        self.sock = str(sock)
        self.paths: dict[str, str] = {}      # qdev id -> x-query-virtio path

    def session(self):
        from agent.vmm.qmp import QmpClient

        return QmpClient.connect(self.sock, timeout=5.0, budget_s=15.0)

    def poll(self, seen: Seen) -> None:
        from agent.vmm.probe import virtio_devices, virtio_status

        with self.session() as c:
            if not self.paths:
                self.paths = {d.qdev_id: d.path for d in virtio_devices(c)}
            for qdev, path in self.paths.items():
                seen.qemu(qdev, virtio_status(c, path).status)
            seen.runstate = c.execute("query-status")["status"]

    def pci(self):
        from agent.vmm.probe import pci_map

        with self.session() as c:
            return pci_map(c)

    def romfile(self, qdev: str) -> str:
        with self.session() as c:
            return c.execute("qom-get", {"path": f"/machine/peripheral/{qdev}",
                                         "property": "romfile"})


def exported(agent, name: str) -> dict[str, dict]:
    """device -> virtio_device_info labels, for this VM."""
    return {labels["device"]: labels
            for labels, _ in samples(agent, "virtio_device_info", vm=name)}


def agent_status(agent, name: str) -> dict[str, int]:
    return {labels["device"]: int(v)
            for labels, v in samples(agent, "virtio_device_status", vm=name)}


def tail(path: Path, n: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(none)"


@pytest.mark.parametrize("machine", ["pc", "q35"])
def test_firmware_drivers_devices_are_named_from_the_enumeration(agent, tmp_path, machine):
    name = f"fwdrv-{machine}-{uuid.uuid4().hex[:6]}"
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"\0" * (1 << 20))
    serial, debug, err = tmp_path / "serial.log", tmp_path / "seabios.log", tmp_path / "qemu.err"
    sockdir = tempfile.TemporaryDirectory(prefix="vra-fw-", dir="/tmp")   # short: sun_path
    qmp = Path(sockdir.name) / "qmp.sock"
    seen = Seen()
    vm = Qemu(qmp)
    with open(err, "wb") as errf:
        proc = subprocess.Popen(qemu_cmd(machine, name, disk, qmp, serial, debug),
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=errf)
    try:
        def context() -> str:
            return (f"\nQEMU status history {seen.qemu_history}, runstate {seen.runstate!r}; "
                    f"agent status bits seen {seen.agent_or}; agent exports "
                    f"{exported(agent, name)}\nqemu stderr:\n{tail(err, 8)}\n"
                    f"SeaBIOS:\n{tail(debug)}\nagent:\n{agent.stderr_tail()}")

        try:
            wait_qmp(qmp, proc, timeout=20)
        except Exception as exc:
            raise AssertionError(f"QEMU's QMP socket: {exc}; qemu exit {proc.poll()}: "
                                 f"{tail(err)}") from None
        pci = vm.pci()
        virtio = {d.qdev_id: d for d in pci if d.virtio_id is not None}
        assert {virtio[q].virtio_type for q in ("blk0", "net0", "rng0")} == {"blk", "net", "rng"}
        bdf_of = {q: d.device_key for q, d in virtio.items()}

        def firmware_drove_and_agent_named() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"QEMU exited with {proc.returncode}" + context())
            vm.poll(seen)
            for device, status in agent_status(agent, name).items():
                seen.agent(device, status)
            blk_done = (seen.qemu_or.get("blk0", 0) & DRIVER_OK
                        or seen.agent_or.get(bdf_of["blk0"], 0) & DRIVER_OK)
            net_touched = seen.qemu_or.get("net0", 0) or seen.agent_or.get(bdf_of["net0"], 0)
            names = exported(agent, name)
            return bool(blk_done and net_touched
                        and bdf_of["blk0"] in names and bdf_of["net0"] in names)

        t0 = time.monotonic()
        try:
            wait_until("SeaBIOS and iPXE to drive blk and net, and the agent to export them",
                       firmware_drove_and_agent_named, timeout_s=FIRMWARE_TIMEOUT_S,
                       every_s=POLL_S)
        except AssertionError as exc:
            raise AssertionError(str(exc) + context()) from None

        waited_s = time.monotonic() - t0

        # how far iPXE gets: DRIVER_OK, or the VM stopped (reported, not required)
        def settled() -> bool:
            vm.poll(seen)
            return bool(seen.qemu_or.get("net0", 0) & DRIVER_OK) or seen.runstate != "running"

        try:
            wait_until("iPXE's DRIVER_OK or the VM to stop", settled,
                       timeout_s=SETTLE_TIMEOUT_S, every_s=POLL_S)
        except AssertionError:
            pass

        # SeaBIOS's own driver ran on the disk query-pci puts at this address; iPXE's ROM ran
        blk = virtio["blk0"]
        seabios = debug.read_text(errors="replace")
        assert f"found virtio-blk at {blk.bus:02x}:{blk.slot:02x}.{blk.function:x}" in seabios, \
            context()
        assert "Booting from ROM" in seabios, context()
        if machine == "q35":        # SeaBIOS's 32-bit configuration accesses go through ECAM
            assert "PCIe: using q35 mmconfig at" in seabios, context()
        romfile = vm.romfile("net0")
        assert romfile, "virtio-net-pci has no option ROM: iPXE never ran"

        # every device whose status the firmware wrote: its PCI name and type
        driven = {q for q, bits in seen.qemu_or.items() if bits}
        assert {"blk0", "net0"} <= driven, context()
        assert "rng0" not in driven, context()             # no firmware has a virtio-rng driver
        names = exported(agent, name)
        for q in sorted(driven):
            dev = virtio[q]
            assert dev.device_key in names, f"{q} ({dev.bdf}) not exported" + context()
            assert names[dev.device_key]["type"] == dev.virtio_type, context()
            assert names[dev.device_key]["transport"] in ("pci-modern", "pci-legacy"), context()
        # nothing else, nothing misnamed: every exported device is a virtio function of this VM
        # with its own type (virtio-rng, enumerated but never driven, may or may not be there)
        by_key = {d.device_key: d for d in virtio.values()}
        for device, labels in names.items():
            assert device in by_key, f"{device} is not a virtio PCI function" + context()
            assert labels["type"] == by_key[device].virtio_type, context()

        # the agent's status is QEMU's for the driven devices (the last byte the guest wrote)
        def agree() -> bool:
            vm.poll(seen)
            got = agent_status(agent, name)
            return all(got.get(bdf_of[q]) == seen.qemu_last[q] for q in driven)

        try:
            wait_until("the agent's virtio_device_status to be QEMU's", agree,
                       timeout_s=AGREE_TIMEOUT_S, every_s=POLL_S)
        except AssertionError as exc:
            raise AssertionError(f"{exc}: agent {agent_status(agent, name)}, QEMU "
                                 f"{seen.qemu_last}" + context()) from None
        assert seen.qemu_last["blk0"] == 15, context()      # SeaBIOS leaves the disk running

        # firmware drivers are well behaved: no episode, no violation
        text = agent.metrics_text()
        violations = samples(text, "virtio_spec_violations_total", vm=name)
        assert violations, "the VM has no virtio_spec_violations_total series" + context()
        assert {labels["rule"]: v for labels, v in violations if v} == {}, context()
        for metric in ("virtio_device_needs_reset_total", "virtio_device_recoveries_total",
                       "virtio_driver_failed_total"):
            assert [v for _, v in samples(text, metric, vm=name) if v] == [], metric
        for metric in ("virtio_device_unrecovered_seconds", "virtio_device_stuck",
                       "virtio_device_needs_reset_suspected"):
            assert samples(text, metric, vm=name) == [], metric
        assert [r for r in agent.records() if r.get("vm") == name] == []

        pci_seen = [(q, d.bdf, d.virtio_type, d.virtio_pci) for q, d in sorted(virtio.items())]
        print(f"\n{machine}: firmware drove blk and net, agent named them after {waited_s:.1f} s;"
              f" query-pci {pci_seen}"
              f"\n  net0 romfile {romfile!r}; QEMU status history {seen.qemu_history}; "
              f"runstate {seen.runstate!r}\n  agent exports "
              f"{ {d: (l['type'], l['transport']) for d, l in sorted(names.items())} }; "
              f"agent status {agent_status(text, name)}; status bits seen {seen.agent_or}")
    finally:
        proc.kill()
        proc.wait()
        sockdir.cleanup()
