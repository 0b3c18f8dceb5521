"""agent.vmm.confirm against a fake QEMU (a unix-socket QMP server answering from the replies recorded
from QEMU 7.2, tests/unit/fixtures/qmp): the probe's time and work bounds, which socket is used,
virtio-mmio matching, and answers for VMs that exited while their query ran."""
from __future__ import annotations

import json
import os
import queue
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Optional

import pytest

from agent.vmm import qmp
from agent.vmm.confirm import (
    _device_space_addr,
    PciTyper, VmmConfirmer, match, qmp_socket_for, qmp_socket_for_pid, qmp_socket_path,
)
from agent.model import NeedsResetSuspected, VmIdentity
from agent.vmm.probe import (
    MAX_PROBED_DEVICES, ProbedDevice, VirtioDevice, VmProbe, parse_pci, parse_virtio_status,
    probe, virtio_at,
)

FIXTURES = Path(__file__).parent / "fixtures" / "qmp"
RNG0_CFG = 0xC0004000      # the lab guest's vrng0 common cfg (com1.lab.log); vrng0 is broken
NET0_CFG = 0xC0014000      # net0 common cfg; healthy
PID = 7


def ret(name: str):
    return json.loads((FIXTURES / f"{name}.json").read_bytes())["return"]


def lab_status(path: str):
    """x-query-virtio-status of the lab guest: vrng0 broken, every other device healthy."""
    return ret("x-query-virtio-status.lab-rng0" if "/vrng0" in path else
               "x-query-virtio-status.lab-net0")


def lab_list(extra_anon: int = 0) -> list[dict]:
    devs = [{"name": "virtio-rng", "path": "/machine/peripheral/vrng0/virtio-backend"},
            {"name": "virtio-rng", "path": "/machine/peripheral/vrng1/virtio-backend"},
            {"name": "virtio-net", "path": "/machine/peripheral/net0/virtio-backend"}]
    devs += [{"name": "virtio-rng", "path": f"/machine/peripheral-anon/device[{i}]/virtio-backend"}
             for i in range(extra_anon)]
    return devs


class FakeQemu:
    """A QMP server on a unix socket, one client at a time (like QEMU): the recorded greeting,
    then `answer(command, arguments)` -> the "return" value, after `delay(command)` seconds."""

    def __init__(self, path: str, answer: Callable[[str, dict], object],
                 delay: Callable[[str], float] = lambda cmd: 0.0):
        self.path = path
        self.requests: list[dict] = []
        self._answer = answer
        self._delay = delay
        self._srv = socket.socket(socket.AF_UNIX)
        self._srv.bind(path)
        self._srv.listen(4)
        self._stop = False
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def commands(self, name: Optional[str] = None) -> list[dict]:
        return [r for r in self.requests if name is None or r["execute"] == name]

    def _serve(self) -> None:
        while not self._stop:
            try:
                conn, _ = self._srv.accept()
            except OSError:
                return
            try:
                with conn, conn.makefile("rb") as f:
                    conn.sendall((FIXTURES / "greeting.json").read_bytes())
                    for line in f:
                        req = json.loads(line)
                        self.requests.append(req)
                        time.sleep(self._delay(req["execute"]))
                        if req["execute"] == "qmp_capabilities":
                            value: object = {}
                        else:
                            value = self._answer(req["execute"], req.get("arguments", {}))
                        conn.sendall(json.dumps({"return": value, "id": req["id"]}).encode()
                                     + b"\r\n")
            except OSError:
                continue        # the client hung up (e.g. its session time ran out)

    def close(self) -> None:
        self._stop = True
        self._srv.close()


def lab_answer(extra_anon: int = 0, listed: Optional[list[dict]] = None):
    def answer(cmd: str, args: dict):
        if cmd == "query-pci":
            return ret("query-pci.lab")
        if cmd == "x-query-virtio":
            return listed if listed is not None else lab_list(extra_anon)
        if cmd == "x-query-virtio-status":
            return lab_status(args["path"])
        raise AssertionError(cmd)
    return answer


@pytest.fixture
def sock_path(tmp_path):
    return str(tmp_path / "qmp.sock")


def suspicion(device: str, pid: int = PID, start_time: int = 100) -> NeedsResetSuspected:
    return NeedsResetSuspected(0, VmIdentity(pid=pid, start_time=start_time, name=f"vm{pid}"),
                               device, 0)


# Condition waits return as soon as the condition holds; the limit only stops a hung test, so it
# is far beyond what a loaded host needs (docs/testing.md, "Wall-clock policy").
WAIT_S = 60.0
TIMER_SLACK_S = 0.01    # socket timeouts are rounded to the poll() millisecond


def worker_idle(worker) -> bool:
    """The worker thread is back in its queue's get() with nothing queued: every job it was
    given has finished, its bookkeeping (the `finally` under the lock) included."""
    frame = sys._current_frames().get(worker._thread.ident) if worker._thread else None
    while frame is not None:
        if frame.f_code is queue.Queue.get.__code__:
            return worker._jobs.empty()
        frame = frame.f_back
    return False


def wait_for(what: Callable[[], object], timeout_s: float = WAIT_S):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = what()
        if got:
            return got
        time.sleep(0.01)
    return what()


def verdicts(c, n: int, timeout_s: float = WAIT_S) -> list:
    got: list = []
    deadline = time.monotonic() + timeout_s
    while len(got) < n and time.monotonic() < deadline:
        got += c.poll()
        time.sleep(0.01)
    return got


# --- 1. bounded probes ------------------------------------------------------------------------

def test_probe_asks_only_about_the_suspected_device(sock_path):
    """100 devices listed, one suspected: one x-query-virtio-status, for that device."""
    qemu = FakeQemu(sock_path, lab_answer(extra_anon=97))
    result = probe(sock_path, targets=[("mmio", RNG0_CFG)])
    assert [r["arguments"]["path"] for r in qemu.commands("x-query-virtio-status")] == [
        "/machine/peripheral/vrng0/virtio-backend"]
    assert len(result.virtio) == 100 and len(result.devices) == 1
    d = match(result, f"mmio-0x{RNG0_CFG:x}")
    assert d is not None and d.status.needs_reset and d.status.type == "rng"
    qemu.close()


def test_a_device_named_by_its_pci_address_is_probed_and_matched(sock_path):
    """Correlation names a device whose enumeration it saw by PCI address: the probe asks about
    that function's virtio device only, and the answer matches it."""
    qemu = FakeQemu(sock_path, lab_answer(extra_anon=3))
    listing = probe(sock_path, targets=[("mmio", RNG0_CFG)])
    [rng0] = [d for d in listing.pci if d.qdev_id == "vrng0"]
    asked = len(qemu.commands("x-query-virtio-status"))
    device = f"pci-{rng0.bdf}"
    result = probe(sock_path, targets=[_device_space_addr(device)])
    assert len(qemu.commands("x-query-virtio-status")) == asked + 1
    assert qemu.commands("x-query-virtio-status")[-1]["arguments"]["path"] == \
        "/machine/peripheral/vrng0/virtio-backend"
    d = match(result, device)
    assert d is not None and d.status.type == "rng"
    assert match(result, "pci-0000:00:1f.7") is None and _device_space_addr("pci-0000:zz") is None
    qemu.close()


def test_untargeted_probe_is_capped(sock_path):
    qemu = FakeQemu(sock_path, lab_answer(extra_anon=200))
    result = probe(sock_path)
    assert len(qemu.commands("x-query-virtio-status")) == MAX_PROBED_DEVICES
    assert len(result.devices) == MAX_PROBED_DEVICES and len(result.virtio) == 203
    qemu.close()


def test_slow_qemu_cannot_hold_a_probe_past_its_budget(sock_path):
    """Each command well within its own timeout, but many of them: the session limit stops it."""
    qemu = FakeQemu(sock_path, lab_answer(extra_anon=30),
                    delay=lambda cmd: 0.15 if cmd == "x-query-virtio-status" else 0.0)
    t0 = time.monotonic()
    with pytest.raises(qmp.QmpDeadline):
        probe(sock_path, timeout=2.0, budget_s=0.5)
    elapsed = time.monotonic() - t0
    # Each reply takes >= 0.15 s however busy the host, so a 0.5 s session sends at most 4 of
    # the 33 status queries; the limit cannot pass before 0.5 s either.
    assert len(qemu.commands("x-query-virtio-status")) <= 4
    assert elapsed >= 0.5 - TIMER_SLACK_S
    print(f"probe stopped after {elapsed:.2f} s (limit 0.5 s; unbounded: 33 x 0.15 s)")
    qemu.close()


def test_confirmer_probe_is_targeted_and_bounded(sock_path):
    qemu = FakeQemu(sock_path, lab_answer(extra_anon=97))
    c = VmmConfirmer(socket_for=lambda vm: sock_path)
    c.submit(suspicion(f"mmio-0x{NET0_CFG:x}"))
    [v] = verdicts(c, 1)
    assert (v.device, v.needs_reset, v.type) == (f"mmio-0x{NET0_CFG:x}", False, "net")
    assert [r["arguments"]["path"] for r in qemu.commands("x-query-virtio-status")] == [
        "/machine/peripheral/net0/virtio-backend"]
    c.close()
    qemu.close()


def test_confirmer_gives_up_on_a_slow_monitor_within_its_budget(sock_path):
    qemu = FakeQemu(sock_path, lab_answer(), delay=lambda cmd: 0.9 if cmd != "qmp_capabilities"
                    else 0.0)
    c = VmmConfirmer(socket_for=lambda vm: sock_path, timeout_s=2.0, budget_s=0.5)
    t0 = time.monotonic()
    c.submit(suspicion(f"mmio-0x{RNG0_CFG:x}"))
    # Each command would succeed within its 2 s timeout: only the 0.5 s session limit makes this
    # an error, after the first command (its reply takes 0.9 s, so no second one is sent).
    assert wait_for(lambda: c.queries["error"]) == 1
    print(f"gave up after {time.monotonic() - t0:.2f} s (limit 0.5 s; unbounded: 3 x 0.9 s)")
    assert len([r for r in qemu.requests if r["execute"] != "qmp_capabilities"]) == 1
    assert wait_for(lambda: worker_idle(c)) and c.poll() == []
    c.close()
    qemu.close()


def test_confirmer_does_not_probe_for_ids_without_an_address(sock_path):
    qemu = FakeQemu(sock_path, lab_answer())
    c = VmmConfirmer(socket_for=lambda vm: sock_path)
    c.submit(suspicion("vhost-fd3"))
    assert wait_for(lambda: c.queries["unmatched"]) == 1
    assert qemu.requests == []
    c.close()
    qemu.close()


def test_pci_typer_query_is_bounded_by_its_budget(sock_path):
    qemu = FakeQemu(sock_path, lab_answer(), delay=lambda cmd: 1.5 if cmd == "query-pci" else 0.0)
    t = PciTyper(socket_for=lambda pid: sock_path, timeout_s=2.0, budget_s=0.3)
    t0 = time.monotonic()
    t.submit(PID, "mmio", RNG0_CFG)
    # query-pci's reply (1.5 s) is within its 2 s timeout: only the 0.3 s limit makes it an error
    assert wait_for(lambda: t.queries["pci_map_error"]) == 1
    assert t.queries["pci_map"] == 0
    print(f"gave up after {time.monotonic() - t0:.2f} s (limit 0.3 s; unbounded: 1.5 s)")
    t.close()
    qemu.close()


# --- 2. which socket ------------------------------------------------------------------------

def fake_proc(root: Path, pid: int, argv: list[str], starttime: int = 100) -> str:
    d = root / str(pid)
    d.mkdir(parents=True)
    (d / "cmdline").write_bytes(b"\0".join(a.encode() for a in argv) + b"\0")
    fields = ["S", "1", str(pid), str(pid)] + ["0"] * 15 + [str(starttime)] + ["0"] * 30
    (d / "stat").write_text(f"{pid} (qemu-system-x86) " + " ".join(fields) + "\n")
    return str(root)


LIBVIRT = ["/usr/bin/qemu-system-x86_64", "-name", "guest=vm1,debug-threads=on",
           "-chardev", "socket,id=charmonitor,path=/var/lib/libvirt/qemu/domain-1-vm1/monitor.sock,"
           "server=on,wait=off",
           "-mon", "chardev=charmonitor,id=monitor,mode=control"]


@pytest.mark.parametrize("argv", [
    LIBVIRT,                                                          # libvirt's own monitor
    ["qemu", "-qmp", "unix:/run/vm/client.sock"],                     # client mode
    ["qemu", "-qmp", "unix:vra-qmp,server=on,wait=off,abstract=on"],  # abstract: other netns
    ["qemu", "-chardev", "socket,id=q,path=/run/q.sock", "-mon", "chardev=q,mode=control"],
    ["qemu", "-chardev", "socket,id=h,path=/run/h.sock,server=on", "-mon", "chardev=h"],  # HMP
    ["qemu", "-qmp", "tcp:127.0.0.1:4444,server=on,wait=off"],
], ids=["libvirt", "client", "abstract", "chardev-client", "hmp", "tcp"])
def test_sockets_docs_qmp_md_excludes_are_never_used(tmp_path, argv):
    root = fake_proc(tmp_path, 1234, argv)
    vm = VmIdentity(pid=1234, start_time=100, name="vm1")
    assert qmp_socket_for(vm, root) is None
    assert qmp_socket_for_pid(1234, root) is None


def test_usable_sockets_are_reached_through_the_process_root(tmp_path):
    argv = LIBVIRT + ["-qmp", "unix:/run/vra/vm1.qmp,server=on,wait=off"]
    root = fake_proc(tmp_path, 1234, argv)
    vm = VmIdentity(pid=1234, start_time=100, name="vm1")
    assert qmp_socket_for(vm, root) == f"{root}/1234/root/run/vra/vm1.qmp"
    assert qmp_socket_for_pid(1234, root) == f"{root}/1234/root/run/vra/vm1.qmp"
    # an abstract socket first, then a usable chardev monitor: the usable one
    argv2 = ["qemu", "-qmp", "unix:abs,server=on,abstract=on",
             "-chardev", "socket,id=m,path=rel.sock,server=on,wait=off",
             "-mon", "chardev=m,mode=control"]
    root2 = fake_proc(tmp_path / "p2", 55, argv2)
    assert qmp_socket_path(55, root2) == f"{root2}/55/cwd/rel.sock"


def test_a_reused_or_vanished_pid_is_never_asked(tmp_path):
    root = fake_proc(tmp_path, 1234, ["qemu", "-qmp", "unix:/run/a.sock,server=on"],
                     starttime=999)
    assert qmp_socket_for(VmIdentity(pid=1234, start_time=100, name="old"), root) is None
    assert qmp_socket_for(VmIdentity(pid=1234, start_time=999, name="new"), root) is not None
    assert qmp_socket_for(VmIdentity(pid=4321, start_time=100, name="gone"), root) is None
    assert qmp_socket_for_pid(4321, root) is None


# --- 3. virtio-mmio matching -----------------------------------------------------------------

def _status(path: str, broken: bool):
    return parse_virtio_status(path, ret("x-query-virtio-status.lab-rng0" if broken else
                                         "x-query-virtio-status.lab-net0"))


def mmio_probe(*devs: tuple[str, bool], queried: Optional[set[str]] = None) -> VmProbe:
    """A VM without PCI virtio devices: (QOM path, broken) per device."""
    listed = tuple(VirtioDevice(p, "virtio-net") for p, _ in devs)
    probed = tuple(ProbedDevice(v, _status(v.path, b), None) for v, (_, b) in zip(listed, devs)
                   if queried is None or v.path in queried)
    return VmProbe(None, probed, (), listed)


def test_mmio_fallback_never_confirms_another_device():
    """Healthy A suspected, broken B: neither A nor B may be answered for A."""
    p = mmio_probe(("/machine/peripheral/a", False), ("/machine/peripheral/b", True))
    assert match(p, "mmio-0xfeb00000") is None
    # the same without `listed` (a probe built from the queried devices only)
    assert match(VmProbe(None, p.devices, ()), "mmio-0xfeb00000") is None


def test_mmio_fallback_reports_the_single_devices_real_status():
    healthy = mmio_probe(("/machine/peripheral-anon/device[0]", False))
    d = match(healthy, "mmio-0xfeb00000")
    assert d is not None and not d.status.needs_reset
    broken = mmio_probe(("/machine/peripheral/rng0", True))
    assert match(broken, "mmio-0xfeb00000").status.needs_reset
    # an I/O port in no BAR is no virtio-mmio device
    assert match(broken, "pio-0xc000") is None


def test_anonymous_virtio_pci_devices_are_not_virtio_mmio():
    """A broken anonymous virtio-pci device (not linked to PCI by qdev id) next to a healthy
    virtio-mmio device: the mmio address is the mmio device, reported clear."""
    pci = tuple(parse_pci(ret("query-pci.lab")))
    anon = VirtioDevice("/machine/peripheral-anon/device[3]/virtio-backend", "virtio-rng")
    mmio = VirtioDevice("/machine/peripheral/mmio0", "virtio-net")
    assert anon.proxied and not mmio.proxied
    p = VmProbe(None, (ProbedDevice(anon, _status(anon.path, True), None),
                       ProbedDevice(mmio, _status(mmio.path, False), None)), pci, (anon, mmio))
    d = match(p, "mmio-0xfeb00000")
    assert d is not None and d.virtio == mmio and not d.status.needs_reset
    assert virtio_at((anon,), pci, "mmio", 0xFEB00000) is None


def test_confirmer_passes_a_clear_mmio_answer_on():
    p = mmio_probe(("/machine/peripheral/rng0", False))
    c = VmmConfirmer(socket_for=lambda vm: "/x", probe_fn=lambda path, t: p)
    c.submit(suspicion("mmio-0xfeb00000"))
    [v] = verdicts(c, 1)
    assert (v.needs_reset, c.queries["clear"]) == (False, 1)
    c.close()


def test_targeted_probe_queries_the_single_mmio_device_only_when_it_is_alone(sock_path):
    one = [{"name": "virtio-net", "path": "/machine/peripheral-anon/device[0]"},
           {"name": "virtio-rng", "path": "/machine/peripheral-anon/device[1]/virtio-backend"}]
    qemu = FakeQemu(sock_path, lab_answer(listed=one))
    result = probe(sock_path, targets=[("mmio", 0xFEB00000)])
    assert [r["arguments"]["path"] for r in qemu.commands("x-query-virtio-status")] == [
        "/machine/peripheral-anon/device[0]"]
    assert match(result, "mmio-0xfeb00000").virtio.path == "/machine/peripheral-anon/device[0]"
    qemu.close()
    os.unlink(sock_path)
    two = one + [{"name": "virtio-rng", "path": "/machine/peripheral/rng0"}]
    qemu = FakeQemu(sock_path, lab_answer(listed=two))
    result = probe(sock_path, targets=[("mmio", 0xFEB00000)])
    assert qemu.commands("x-query-virtio-status") == [] and result.devices == ()
    assert match(result, "mmio-0xfeb00000") is None
    qemu.close()


# --- 4. answers for VMs that exited while their query ran ---------------------------------

class Gate:
    """Blocks the worker inside its QMP call until released."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.calls = 0

    def wait(self) -> None:
        self.calls += 1
        self.entered.set()
        assert self.release.wait(5)


class FakeClient:
    def __init__(self, gate: Gate):
        self.gate = gate

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None

    def execute(self, command, arguments=None, timeout=None):
        assert command == "query-pci"
        self.gate.wait()
        return ret("query-pci.lab")


def test_pci_typer_drops_a_map_that_arrives_after_the_vm_exited():
    gate = Gate()
    t = PciTyper(socket_for=lambda pid: "/x",
                 connect=lambda path, timeout, budget_s: FakeClient(gate))
    t.submit(PID, "mmio", RNG0_CFG)
    assert gate.entered.wait(5)
    t.forget_pid(PID)                   # the VM exits while query-pci runs
    gate.release.set()
    assert wait_for(lambda: worker_idle(t))
    assert t.poll() == [] and PID not in t._maps
    # a new VM with the reused pid is queried afresh, not answered from the old map
    gate.entered.clear()
    t.submit(PID, "mmio", NET0_CFG)
    [h] = verdicts(t, 1)
    assert (h.pid, h.addr, h.type) == (PID, NET0_CFG, "net") and gate.calls == 2
    t.close()


def test_pci_typer_drops_uncollected_hints_of_an_exited_vm():
    gate = Gate()
    gate.release.set()
    t = PciTyper(socket_for=lambda pid: "/x",
                 connect=lambda path, timeout, budget_s: FakeClient(gate))
    t.submit(PID, "mmio", RNG0_CFG)
    wait_for(lambda: len(t._results) == 1)
    t.forget_pid(PID)
    assert t.poll() == [] and PID not in t._maps
    t.close()


def test_confirmer_drops_a_verdict_that_arrives_after_the_vm_exited():
    gate = Gate()
    p = mmio_probe(("/machine/peripheral/rng0", True))

    def slow_probe(path, timeout):
        gate.wait()
        return p

    c = VmmConfirmer(socket_for=lambda vm: "/x", probe_fn=slow_probe)
    c.submit(suspicion("mmio-0xfeb00000"))
    assert gate.entered.wait(5)
    c.forget_pid(PID)
    gate.release.set()
    assert wait_for(lambda: c.queries["needs_reset"] and worker_idle(c))
    assert c.poll() == [] and not c._inflight
    # the reused pid's VM is asked afresh (not rate-limited by the old one)
    c.submit(suspicion("mmio-0xfeb00000", start_time=555))
    [v] = verdicts(c, 1)
    assert v.needs_reset and gate.calls == 2
    c.close()
