"""agent.vmm.qmp and agent.vmm.probe against a real QEMU (no guest kernel: SeaBIOS programs the BARs).

qboot is not used here: it leaves PCI BARs unprogrammed (query-pci reports address -1), SeaBIOS
programs them within ~0.3 s. The virtio-net device gets romfile= (no iPXE ROM): with the ROM,
SeaBIOS under this nested KVM dies with an emulation failure.

Run as a script to refresh the recorded replies used by tests/unit/test_qmp_probe.py:
    .venv/bin/python tests/lab/test_qmp_live.py --capture tests/unit/fixtures/qmp
"""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from agent.vmm import qmp  # noqa: E402
from agent.events import Space  # noqa: E402
from agent.vmm.probe import (  # noqa: E402
    device_at, pci_device_for, pci_map, probe, virtio_devices, virtio_status,
)
from lab.harness import wait_qmp  # noqa: E402

# What the command line asks for: (-device driver, id, extra properties, virtio type, PCI kind).
# Kind follows QEMU's rule: transitional on the conventional root bus unless disable-legacy=on,
# modern-only behind a PCIe root port.
DEVICES = [
    ("virtio-rng-pci", "rng0", "", "rng", "transitional"),
    ("virtio-net-pci", "net0", ",netdev=n0,disable-legacy=on,romfile=", "net", "modern"),
    ("virtio-rng-pci", "rng1", ",bus=rp1", "rng", "modern"),
]
ANON_DEVICE = ("virtio-balloon-pci", "balloon", "transitional")   # no id=: peripheral-anon


def qemu_argv(sock: str) -> list[str]:
    argv = [
        "qemu-system-x86_64", "-accel", "kvm", "-M", "q35", "-m", "64", "-nodefaults",
        "-display", "none", "-serial", "none",
        "-qmp", f"unix:{sock},server=on,wait=off",
        "-netdev", "hubport,id=n0,hubid=0",
        "-device", "pcie-root-port,id=rp1,chassis=1",
    ]
    for driver, dev_id, extra, _, _ in DEVICES:
        argv += ["-device", f"{driver},id={dev_id}{extra}"]
    argv += ["-device", ANON_DEVICE[0]]
    return argv


class Qemu:
    def __init__(self, workdir: str):
        self.sock = os.path.join(workdir, "qmp.sock")
        self.argv = qemu_argv(self.sock)
        self.log = open(os.path.join(workdir, "qemu.log"), "w+")
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=self.log,
                                     stderr=subprocess.STDOUT)
        try:
            wait_qmp(self.sock, self.proc)
        except qmp.QmpError as exc:
            self.stop()
            raise RuntimeError(f"QEMU's QMP socket is not usable ({exc}): {self.output()}")

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()[-2000:]

    def wait_bars_programmed(self, timeout: float = 10.0) -> list:
        """Poll query-pci until the firmware has programmed every virtio BAR 0-5."""
        deadline = time.monotonic() + timeout
        while True:
            devs = [d for d in qmp_pci(self.sock) if d.virtio_id is not None]
            if devs and all(b.address is not None for d in devs for b in d.bars if b.index < 6):
                return devs
            if time.monotonic() > deadline:
                raise RuntimeError(f"BARs not programmed after {timeout}s: {self.output()}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def qmp_pci(sock: str):
    with qmp.QmpClient.connect(sock) as c:
        return pci_map(c)


@pytest.fixture(scope="module")
def vm():
    from conftest import require_kvm
    require_kvm()
    workdir = tempfile.mkdtemp(prefix="vra-qmp-")
    q = Qemu(workdir)
    try:
        q.wait_bars_programmed()
        yield q
    finally:
        q.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def test_greeting_reports_qemu_version(vm):
    with qmp.QmpClient.connect(vm.sock) as c:
        assert c.version is not None
        info = c.execute("query-version")
    assert (c.version.major, c.version.minor, c.version.micro) == (
        info["qemu"]["major"], info["qemu"]["minor"], info["qemu"]["micro"])
    assert c.version.at_least(7, 2), "x-query-virtio-status needs QEMU >= 7.2"


def test_x_query_virtio_lists_the_command_line_devices(vm):
    with qmp.QmpClient.connect(vm.sock) as c:
        devs = virtio_devices(c)
    by_id = {d.qdev_id: d for d in devs if d.qdev_id}
    for driver, dev_id, _, vtype, _ in DEVICES:
        assert dev_id in by_id, f"{dev_id} missing from {devs}"
        assert by_id[dev_id].name == driver.removesuffix("-pci")
        assert by_id[dev_id].path == f"/machine/peripheral/{dev_id}/virtio-backend"
    anon = [d for d in devs if not d.qdev_id]
    assert [d.name for d in anon] == [ANON_DEVICE[0].removesuffix("-pci")]
    assert anon[0].path.startswith("/machine/peripheral-anon/")
    assert len(devs) == len(DEVICES) + 1


def test_x_query_virtio_status_before_any_driver(vm):
    with qmp.QmpClient.connect(vm.sock) as c:
        statuses = [virtio_status(c, d.path) for d in virtio_devices(c)]
    expected_types = {dev_id: vtype for _, dev_id, _, vtype, _ in DEVICES}
    for st in statuses:
        assert st.status == 0, st          # firmware without virtio drivers: nobody wrote status
        assert st.broken is False and st.needs_reset is False
        assert st.vm_running is True
        dev_id = st.path.split("/")[3]
        assert st.type == expected_types.get(dev_id, ANON_DEVICE[1])


def test_x_query_virtio_status_bad_path_is_a_typed_error(vm):
    with qmp.QmpClient.connect(vm.sock) as c:
        with pytest.raises(qmp.QmpCommandError) as ei:
            virtio_status(c, "/machine/peripheral/rp1")
        # the session survives an error reply
        assert c.execute("query-status")["running"] is True
    assert ei.value.error_class == "GenericError"
    assert "not a VirtIODevice" in ei.value.desc


def test_query_pci_ids_and_bars_match_the_command_line(vm):
    devs = qmp_pci(vm.sock)
    by_id = {d.qdev_id: d for d in devs if d.qdev_id}
    for _, dev_id, _, vtype, kind in DEVICES:
        d = by_id[dev_id]
        assert d.virtio_type == vtype and d.virtio_pci == kind, d
        io_bars = [b for b in d.bars if b.space == Space.PIO]
        # a transitional device keeps the legacy I/O BAR 0, a modern-only one has none
        assert [b.index for b in io_bars] == ([0] if kind == "transitional" else [])
        assert 4 in [b.index for b in d.bars if b.space == Space.MMIO and b.mem64]
    assert by_id["rng1"].bus != 0, "rng1 sits behind the root port: parse must descend bridges"
    anon = [d for d in devs if d.virtio_id is not None and not d.qdev_id]
    assert [d.virtio_type for d in anon] == [ANON_DEVICE[1]]


def _mtree_regions(sock: str) -> list[tuple[int, int, str]]:
    with qmp.QmpClient.connect(sock) as c:
        text = c.execute("human-monitor-command", {"command-line": "info mtree -f"})
    out = []
    for m in re.finditer(r"^\s*([0-9a-f]+)-([0-9a-f]+) \(prio [-0-9]+, i/o\): (virtio-pci\S*)\r?$",
                         text, re.M):
        out.append((int(m.group(1), 16), int(m.group(2), 16), m.group(3)))
    return out


def test_device_at_agrees_with_qemus_memory_map(vm):
    """QEMU's own flat memory map (HMP info mtree -f) names each virtio-pci region; the status
    register (common cfg +0x14, legacy I/O +18) must map back to the right device and BAR."""
    devs = qmp_pci(vm.sock)
    regions = _mtree_regions(vm.sock)
    common = [(s, n.removeprefix("virtio-pci-common-virtio-")) for s, _, n in regions
              if n.startswith("virtio-pci-common-")]
    assert len(common) == len(DEVICES) + 1, regions
    for start, vtype in common:
        hit = device_at(devs, Space.MMIO, start + 0x14)
        assert hit is not None, hex(start)
        assert hit.device.virtio_type == vtype
        assert hit.bar.index == 4 and hit.offset == 0x14   # QEMU puts common cfg at BAR 4 + 0
    legacy = [(s, e) for s, e, n in regions if n == "virtio-pci"]   # legacy I/O BARs
    transitional = [d for d in devs if d.virtio_pci == "transitional"]
    assert len(legacy) == len(transitional)
    for start, end in legacy:
        hit = device_at(devs, Space.PIO, start + 18)
        assert hit is not None and hit.device in transitional and hit.bar.index == 0
        assert hit.bar.size == end - start + 1
    assert device_at(devs, Space.MMIO, 0x10) is None     # guest RAM is no BAR


def test_virtio_device_links_to_its_pci_proxy(vm):
    with qmp.QmpClient.connect(vm.sock) as c:
        vdevs = virtio_devices(c)
        pdevs = pci_map(c)
        for v in vdevs:
            p = pci_device_for(pdevs, v)
            if not v.qdev_id:
                assert p is None
                continue
            st = virtio_status(c, v.path)
            assert p is not None and p.virtio_id == st.device_id


def test_set_link_on_the_net_device(vm):
    with qmp.QmpClient.connect(vm.sock) as c:
        assert c.execute("set_link", {"name": "net0", "up": False}) == {}
        assert c.execute("set_link", {"name": "net0", "up": True}) == {}
        with pytest.raises(qmp.QmpCommandError) as ei:
            c.execute("set_link", {"name": "no-such-nic", "up": False})
    assert ei.value.error_class == "DeviceNotFound"


def test_events_are_skipped_and_kept(vm):
    with qmp.QmpClient.connect(vm.sock) as c:
        assert c.execute("stop") == {}
        assert c.execute("cont") == {}
        assert c.execute("query-status")["running"] is True
    names = [e["event"] for e in c.events]
    assert names == ["STOP", "RESUME"]
    assert c.events_dropped == 0


def test_event_buffer_is_bounded(vm):
    with qmp.QmpClient.connect(vm.sock, max_events=2) as c:
        for _ in range(3):
            c.execute("stop")
            c.execute("cont")
        c.execute("query-status")       # drains any event still in flight
    assert len(c.events) == 2 and c.events_dropped == 4
    assert [e["event"] for e in c.events] == ["STOP", "RESUME"]


def test_a_held_monitor_makes_a_second_client_time_out(vm):
    """Why the agent connects per query: QEMU serves one QMP client per socket; a second one
    (the agent, next to libvirt) connects but gets no greeting until the first leaves."""
    holder = qmp.QmpClient.connect(vm.sock)
    try:
        t0 = time.monotonic()
        with pytest.raises(qmp.QmpTimeout):      # without the timeout: a wait forever
            qmp.QmpClient.connect(vm.sock, timeout=0.5, budget_s=None)
        print(f"second client gave up after {time.monotonic() - t0:.2f} s (timeout 0.5 s)")
    finally:
        holder.close()
    deadline = time.monotonic() + 60      # a condition wait; the limit only stops a hang
    while True:     # QEMU notices the close on its next main-loop iteration
        try:
            with qmp.QmpClient.connect(vm.sock, timeout=1) as c:
                assert c.execute("query-status")["running"] is True
            break
        except qmp.QmpTimeout:
            assert time.monotonic() < deadline


def test_long_proc_root_path_connects(vm):
    """The agent reaches QEMU's socket through /proc/PID/root/...; such paths may exceed
    sun_path (108 bytes) and are connected through an O_PATH descriptor."""
    sock = qmp.QmpSocket(vm.sock, "-qmp")
    path = qmp.reachable_path(sock, vm.proc.pid)
    deep = tempfile.mkdtemp(prefix="vra-" + "x" * 60 + "-")
    try:
        long_link = os.path.join(deep, "y" * 40, "qmp.sock")
        os.makedirs(os.path.dirname(long_link))
        os.symlink(path, long_link)
        assert len(long_link) > 108
        assert qmp.query(long_link, "query-status")["running"] is True
    finally:
        shutil.rmtree(deep, ignore_errors=True)


def test_socket_found_in_the_real_cmdline(vm):
    with open(f"/proc/{vm.proc.pid}/cmdline", "rb") as f:
        argv = [a.decode() for a in f.read().split(b"\0") if a]
    socks = qmp.qmp_sockets_from_cmdline(argv)
    assert socks == [qmp.QmpSocket(vm.sock, "-qmp")]
    assert qmp.query(qmp.reachable_path(socks[0], vm.proc.pid), "query-status")["running"]


def test_chardev_and_mon_form(kvm, tmp_path):
    sock = str(tmp_path / "mon.sock")
    argv = ["qemu-system-x86_64", "-accel", "kvm", "-M", "q35", "-nodefaults", "-display", "none",
            "-S", "-chardev", f"socket,id=qmp0,path={sock},server=on,wait=off",
            "-mon", "chardev=qmp0,mode=control", "-device", "virtio-rng-pci,id=rng0"]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_qmp(sock, proc)
        with open(f"/proc/{proc.pid}/cmdline", "rb") as f:
            found = qmp.qmp_sockets_from_cmdline([a.decode() for a in f.read().split(b"\0") if a])
        assert found == [qmp.QmpSocket(sock, "-chardev", "qmp0")]
        with qmp.QmpClient.connect(qmp.reachable_path(found[0], proc.pid)) as c:
            assert c.execute("query-status")["status"] == "prelaunch"
            (dev,) = virtio_devices(c)
            assert virtio_status(c, dev.path).vm_running is False
    finally:
        proc.terminate()
        proc.wait(5)


def test_relative_and_abstract_sockets(kvm, tmp_path):
    """A relative path resolves through /proc/PID/cwd; an abstract socket is "\\0name"."""
    name = f"vra-qmp-test-{os.getpid()}"
    argv = ["qemu-system-x86_64", "-accel", "kvm", "-M", "q35", "-nodefaults", "-display", "none", "-S",
            "-qmp", "unix:rel.sock,server=on,wait=off",
            "-qmp", f"unix:{name},server=on,wait=off,abstract=on"]
    proc = subprocess.Popen(argv, cwd=tmp_path, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        wait_qmp(str(tmp_path / "rel.sock"), proc)
        with open(f"/proc/{proc.pid}/cmdline", "rb") as f:
            found = qmp.qmp_sockets_from_cmdline([a.decode() for a in f.read().split(b"\0") if a])
        assert found == [qmp.QmpSocket("rel.sock", "-qmp"),
                         qmp.QmpSocket(name, "-qmp", abstract=True)]
        for sock in found:
            path = qmp.reachable_path(sock, proc.pid)
            assert qmp.query(path, "query-status")["status"] == "prelaunch"
    finally:
        proc.terminate()
        proc.wait(5)


MICROVM = ["qemu-system-x86_64", "-accel", "kvm", "-M", "microvm", "-m", "64", "-nodefaults",
           "-display", "none", "-S", "-device", "virtio-rng-device,id=rng0", "-device",
           "virtio-net-device,netdev=n0", "-netdev", "hubport,id=n0,hubid=0"]


def start_microvm(sock: str) -> subprocess.Popen:
    proc = subprocess.Popen(MICROVM + ["-qmp", f"unix:{sock},server=on,wait=off"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_qmp(sock, proc)
    return proc


def test_microvm_virtio_mmio_devices(kvm, tmp_path):
    """virtio-mmio devices are VirtIODevices themselves: path /machine/peripheral/ID, no PCI."""
    sock = str(tmp_path / "m.sock")
    proc = start_microvm(sock)
    try:
        result = probe(sock)
    finally:
        proc.terminate()
        proc.wait(5)
    assert result.pci == ()
    by_name = {d.virtio.name: d for d in result.devices}
    assert set(by_name) == {"virtio-rng", "virtio-net"}
    assert by_name["virtio-rng"].virtio.path == "/machine/peripheral/rng0"
    assert by_name["virtio-rng"].virtio.qdev_id == "rng0"
    assert by_name["virtio-net"].virtio.qdev_id == ""
    for d in result.devices:
        assert d.pci is None
        assert d.status.status == 0 and d.status.vm_running is False     # -S: not started
        assert d.status.type == d.virtio.name.removeprefix("virtio-")


# --- fixture capture ---------------------------------------------------------------------------

def capture(outdir: str) -> None:
    """Record raw QMP reply lines (exactly as QEMU sent them) for the unit tests."""
    os.makedirs(outdir, exist_ok=True)
    workdir = tempfile.mkdtemp(prefix="vra-qmp-capture-")
    q = Qemu(workdir)
    try:
        q.wait_bars_programmed()
        s = socket.socket(socket.AF_UNIX)
        s.connect(q.sock)
        f = s.makefile("rwb")

        def raw(name: str, command: str, arguments=None) -> dict:
            req = {"execute": command}
            if arguments:
                req["arguments"] = arguments
            f.write(json.dumps(req).encode() + b"\n")
            f.flush()
            while True:
                line = f.readline()
                msg = json.loads(line)
                if name == "events" or "event" not in msg:
                    break
            Path(outdir, f"{name}.json").write_bytes(line)
            return msg

        Path(outdir, "greeting.json").write_bytes(f.readline())
        raw("qmp_capabilities", "qmp_capabilities")
        devs = raw("x-query-virtio", "x-query-virtio")["return"]
        for d in devs:
            tag = d["path"].split("/")[3] if "/peripheral/" in d["path"] else "anon"
            raw(f"x-query-virtio-status.{tag}", "x-query-virtio-status", {"path": d["path"]})
        raw("x-query-virtio-status.error", "x-query-virtio-status", {"path": "/machine/peripheral/rp1"})
        raw("query-pci", "query-pci")
        raw("set_link.error", "set_link", {"name": "no-such-nic", "up": False})
        raw("events", "stop")           # the first line after `stop` is the STOP event
        f.readline()                    # and the {"return": {}}
        raw("cont", "cont")
        mtree = raw("mtree", "human-monitor-command", {"command-line": "info mtree -f"})
        assert "return" in mtree
        version = json.loads(Path(outdir, "greeting.json").read_bytes())["QMP"]["version"]
        Path(outdir, "CAPTURED.md").write_text(
            "Raw QMP reply lines recorded by tests/lab/test_qmp_live.py --capture from\n"
            f"QEMU {version['qemu']['major']}.{version['qemu']['minor']}.{version['qemu']['micro']}"
            f" ({version['package']}) at {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())},"
            " started as:\n\n    " + " ".join(q.argv).replace(q.sock, "QMP.sock") + "\n\n"
            "after SeaBIOS had programmed the BARs (no guest OS, no virtio driver).\n")
        s.close()
    finally:
        q.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    sock = tempfile.mktemp(prefix="vra-microvm-", suffix=".sock")
    proc = start_microvm(sock)
    try:
        with socket.socket(socket.AF_UNIX) as s, s.makefile("rwb") as f:
            s.connect(sock)
            f.readline()
            for req in (b'{"execute": "qmp_capabilities"}\n', b'{"execute": "x-query-virtio"}\n'):
                f.write(req)
                f.flush()
                line = f.readline()
            Path(outdir, "x-query-virtio.microvm.json").write_bytes(line)
        with open(Path(outdir, "CAPTURED.md"), "a") as out:
            out.write("\nx-query-virtio.microvm.json: the same QEMU started as\n\n    "
                      + " ".join(MICROVM) + " -qmp unix:QMP.sock,server=on,wait=off\n")
    finally:
        proc.terminate()
        proc.wait(5)
        if os.path.exists(sock):
            os.unlink(sock)


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "--capture":
        sys.exit(__doc__)
    capture(sys.argv[2])
