"""QMP against a lab guest (lab/harness.py) that drives virtio devices and faults one of them.

The guest (scenario `stuck`, fault_dev=0) brings every virtio device to DRIVER_OK, then corrupts
device 0's avail index and kicks: QEMU calls virtio_error(), which sets `broken` and, when
VIRTIO_F_VERSION_1 was negotiated, NEEDS_RESET (0x40). The guest reports on COM1 what it saw
("VRA dev ... status_addr=...", "VRA needs_reset ... value=0x4f"); QMP must say the same.

Run as a script to record the replies used by tests/unit/test_qmp_probe.py:
    .venv/bin/python tests/lab/test_qmp_lab_guest.py --capture tests/unit/fixtures/qmp
"""
from __future__ import annotations

import json
import socket
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from agent.vmm import qmp  # noqa: E402
from agent.events import Space  # noqa: E402
from agent.vmm.probe import device_at, probe, virtio_devices, virtio_status  # noqa: E402
from lab.harness import GuestSpec, LabVM, parse_line  # noqa: E402

DRIVER_OK_STATUS = 0x0f     # ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK, as the guest writes
# A modern virtio-net next to the harness's virtio-rng devices (vrng0, vrng1), for set_link.
# romfile=: no iPXE ROM (nothing would run it, and it needs a 256 KiB ROM BAR).
NET_ARGS = ("-netdev", "hubport,id=n0,hubid=0",
            "-device", "virtio-net-pci,id=net0,netdev=n0,romfile=,disable-legacy=on")


def start(transport: str, with_net: bool) -> LabVM:
    spec = GuestSpec(transport=transport, scenario="stuck", devices=2, fault_dev=0,
                     hold_ms=30000, qmp=True, extra_args=NET_ARGS if with_net else ())
    return LabVM.start(spec)


def wait_line(vm: LabVM, what: str, timeout: float = 15.0) -> list[tuple[str, dict[str, str]]]:
    """The guest's parsed "VRA" lines so far, once a complete `what` line is among them."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            text = vm.serial_path.read_text(errors="replace")
        except FileNotFoundError:
            text = ""
        lines = [p for p in (parse_line(x) for x in text.split("\n")[:-1]) if p]
        if any(w == what for w, _ in lines):
            return lines
        if vm.proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"no 'VRA {what}' from the guest (QEMU exit {vm.proc.poll()}); "
                                 f"serial: {text[-1500:]}")
        time.sleep(0.02)


@pytest.mark.parametrize("transport", ["modern", "legacy"])
def test_faulted_device_reports_broken_and_needs_reset(kvm, transport):
    with start(transport, with_net=False) as vm:
        lines = wait_line(vm, "needs_reset" if transport == "modern" else "timeout")
        result = probe(str(vm.qmp_path))
    assert result.qemu_version is not None and result.qemu_version.at_least(7, 2)
    guest_devs = {int(kv["idx"]): kv for what, kv in lines if what == "dev"}
    assert len(guest_devs) == 2 == len(result.devices)
    assert all(d.pci is not None for d in result.devices)
    statuses = {d.pci.bdf: d.status for d in result.devices}
    pci = list(result.pci)

    for idx, g in guest_devs.items():
        # the guest's own view of where its status register is -> the same PCI device
        space = Space.MMIO if g["space"] == "mmio" else Space.PIO
        hit = device_at(pci, space, int(g["status_addr"], 0))
        assert hit is not None, g
        assert hit.device.bdf == "0000:" + g["bdf"]
        assert hit.device.device == int(g["pci_id"], 0)
        assert hit.device.virtio_id == int(g["type"])
        assert hit.device.qdev_id == f"vrng{idx}"
        assert hit.offset == (0x14 if transport == "modern" else 18)
        st = statuses[hit.device.bdf]
        assert st.device_id == int(g["type"])
        if idx == 0:
            assert st.broken is True
            assert st.status & DRIVER_OK_STATUS == DRIVER_OK_STATUS
            if transport == "modern":
                # what the guest read back equals what QEMU holds
                (seen,) = [kv for what, kv in lines if what == "needs_reset"]
                assert st.status == int(seen["value"], 0) and st.needs_reset
            else:
                # no VIRTIO_F_VERSION_1: virtio_error() marks the device broken but does not
                # set NEEDS_RESET, so only QMP can tell (the guest timed out waiting for 0x40)
                assert not st.needs_reset
        else:
            assert (st.status, st.broken) == (DRIVER_OK_STATUS, False)


def test_virtio_mmio_faulted_device(kvm):
    """microvm: no PCI to map through, but x-query-virtio-status still tells the faulted device."""
    with start("mmio", with_net=False) as vm:
        lines = wait_line(vm, "needs_reset")
        result = probe(str(vm.qmp_path))
    (seen,) = [kv for what, kv in lines if what == "needs_reset"]
    assert result.pci == () and len(result.devices) == 2
    broken = [d for d in result.devices if d.status.broken]
    healthy = [d for d in result.devices if not d.status.broken]
    assert len(broken) == 1 and broken[0].status.status == int(seen["value"], 0)
    assert broken[0].status.needs_reset and broken[0].virtio.qdev_id.startswith("vrng")
    assert healthy[0].status.status == DRIVER_OK_STATUS


def test_set_link_is_a_config_change_without_error(kvm):
    with start("modern", with_net=True) as vm:
        lines = wait_line(vm, "needs_reset")
        with qmp.QmpClient.connect(str(vm.qmp_path)) as c:
            net = [v for v in virtio_devices(c) if v.qdev_id == "net0"][0]
            before = virtio_status(c, net.path)
            assert c.execute("set_link", {"name": "net0", "up": False}) == {}
            after = virtio_status(c, net.path)
    # the guest drives every virtio device it finds, net0 included (type 1), and faults only vrng0
    assert any(kv["type"] == "1" for what, kv in lines if what == "dev")
    assert before.type == "net" and before.status == DRIVER_OK_STATUS and before.isr & 0x2 == 0
    # virtio_notify_config(): ISR config bit set, status and broken untouched
    assert after.isr & 0x2 and after.status == DRIVER_OK_STATUS and after.broken is False


# --- fixture capture ---------------------------------------------------------------------------

def capture(outdir: str) -> None:
    with start("modern", with_net=True) as vm:
        wait_line(vm, "needs_reset")
        serial = vm.serial_path.read_text()
        s = socket.socket(socket.AF_UNIX)
        s.connect(str(vm.qmp_path))
        f = s.makefile("rwb")
        f.readline()

        def raw(command: str, arguments=None) -> bytes:
            req = {"execute": command}
            if arguments:
                req["arguments"] = arguments
            f.write(json.dumps(req).encode() + b"\n")
            f.flush()
            while True:
                line = f.readline()
                if "event" not in json.loads(line):
                    return line

        raw("qmp_capabilities")
        for qid, name in (("vrng0", "lab-rng0"), ("net0", "lab-net0")):
            Path(outdir, f"x-query-virtio-status.{name}.json").write_bytes(
                raw("x-query-virtio-status", {"path": f"/machine/peripheral/{qid}/virtio-backend"}))
        Path(outdir, "query-pci.lab.json").write_bytes(raw("query-pci"))
        raw("set_link", {"name": "net0", "up": False})
        Path(outdir, "x-query-virtio-status.lab-net0-link-down.json").write_bytes(
            raw("x-query-virtio-status", {"path": "/machine/peripheral/net0/virtio-backend"}))
        s.close()
        complete = serial[:serial.rfind("\n") + 1]
        Path(outdir, "com1.lab.log").write_text(complete)
        command = " ".join(vm.command).replace(str(vm.workdir), "WORKDIR").replace(str(ROOT) + "/", "")
    Path(outdir, "CAPTURED-lab.md").write_text(
        "The *.lab* files come from tests/lab/test_qmp_lab_guest.py --capture at "
        f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}: the lab guest (lab/harness.py, "
        "scenario=stuck, transport=modern, fault_dev=0) faulted its device 0 (vrng0) and read "
        "NEEDS_RESET (com1.lab.log is its serial output up to then); then `set_link net0 down`. "
        "Command line:\n\n    " + command + "\n")


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "--capture":
        sys.exit(__doc__)
    capture(sys.argv[2])
