"""PCI configuration space (real QEMU + KVM + BPF): the guest's own device programming, through
the 0xcf8/0xcfc ports (qboot and the lab guest on i440fx, SeaBIOS before it enables MMCONFIG) and
through q35's ECAM window (SeaBIOS after `PCIe: using q35 mmconfig at 0xb0000000`), forwarded
on change per config address. QEMU's `query-pci` is the truth: every function's ids and BARs
are rebuilt from the forwarded accesses alone."""
from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from agent.events import Op, ProcessExit, QueueNotify, RegisterAccess, Space, pcicfg_addr
from agent.model import WatchEcam
from agent.vmm.qmp import QmpClient
from agent.vmm.probe import PciDevice, pci_map
from lab.harness import GuestSpec, LabVM, wait_qmp

from capture_lab_support import capture_fixture

Q35_ECAM_BASE = 0xB0000000      # QEMU q35's default PCIEXBAR, 256 MiB
Q35_ECAM_SIZE = 0x10000000
VIRTIO_VENDOR = 0x1AF4

cap = capture_fixture()


class ConfigSpace:
    """Each function's configuration space as the forwarded accesses left it (byte-wise)."""

    def __init__(self, events):
        self.bytes: dict[int, dict[int, int]] = {}     # bdf -> offset -> byte
        self.accesses = [e for e in events
                         if isinstance(e, RegisterAccess) and e.space == Space.PCICFG]
        for e in self.accesses:
            shadow = self.bytes.setdefault(e.addr >> 12, {})
            for i in range(e.size):
                shadow[(e.addr & 0xFFF) + i] = (e.value >> (8 * i)) & 0xFF

    def dword(self, bdf: int, offset: int):
        shadow = self.bytes.get(bdf, {})
        if not all(offset + i in shadow for i in range(4)):
            return None
        return sum(shadow[offset + i] << (8 * i) for i in range(4))

    def ids(self, bdf: int):
        v = self.dword(bdf, 0)
        return None if v is None else (v & 0xFFFF, v >> 16)

    def functions(self) -> set[int]:
        """Functions that answered a vendor id read (absent ones read as 0xffff)."""
        out = set()
        for bdf, shadow in self.bytes.items():
            if (0 in shadow and 1 in shadow and shadow[0] | shadow[1] << 8 != 0xFFFF):
                out.add(bdf)
        return out

    def bar(self, bdf: int, index: int, mem64: bool, io: bool):
        low = self.dword(bdf, 0x10 + 4 * index)
        if low is None:
            return None
        addr = low & (~0x3 if io else ~0xF) & 0xFFFFFFFF
        if mem64:
            high = self.dword(bdf, 0x14 + 4 * index)
            if high is None:
                return None
            addr |= high << 32
        return addr


def _bdf(d: PciDevice) -> int:
    return d.bus << 8 | d.slot << 3 | d.function


def _name(bdf: int) -> str:
    return f"{bdf >> 8:02x}:{(bdf >> 3) & 0x1F:02x}.{bdf & 7}"


def _check_against_query_pci(space: ConfigSpace, pci: list[PciDevice], with_ids: bool = True):
    """Every function's ids (with_ids) and every programmed BAR, rebuilt from the accesses,
    equal QEMU's view; returns the BARs checked, as (bdf, index)."""
    checked = []
    for d in pci:
        bdf = _bdf(d)
        if with_ids:
            assert space.ids(bdf) == (d.vendor, d.device), _name(bdf)
        for bar in d.bars:
            if bar.index > 5 or bar.address is None:
                continue
            rebuilt = space.bar(bdf, bar.index, bar.mem64, bar.space == Space.PIO)
            assert rebuilt == bar.address, (f"{_name(bdf)} BAR{bar.index}: rebuilt "
                                            f"{rebuilt if rebuilt is None else hex(rebuilt)}, "
                                            f"QEMU {bar.address:#x}")
            checked.append((bdf, bar.index))
    return checked


def _poll_until(c, pid: int, events: list, done, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not done() and time.monotonic() < deadline:
        events += [e for e in c.poll(50) if e.pid == pid]


def _exited(events, pid: int) -> bool:
    return any(isinstance(e, ProcessExit) and e.pid == pid for e in events)


@pytest.mark.parametrize("transport", ["modern", "legacy"])
def test_qboot_lab_guest_enumeration_matches_query_pci(cap, transport):
    """qboot assigns the BARs, then the lab guest scans bus 0, sizes and re-writes every BAR of
    its two virtio-rng functions (same vendor/device ids), all through 0xcf8/0xcfc."""
    spec = GuestSpec(transport=transport, devices=2, scenario="init", start_delay_ms=1000,
                     qmp=True)
    before = cap.counters()
    vm = LabVM.start(spec)
    pid, events = vm.pid, []
    try:
        # the guest prints `VRA found` once its PCI programming is done, then waits 1 s
        _poll_until(cap, pid, events, lambda: vm.serial_text().count("VRA found") == 2, 15)
        with QmpClient.connect(str(vm.qmp_path)) as client:
            pci = pci_map(client)
        _poll_until(cap, pid, events, lambda: _exited(events, pid), 15)
        result = vm.wait(timeout=5)
    finally:
        vm.kill()
    result.raise_for_error()
    assert _exited(events, pid)
    # the kernel's state is still there right after the ProcessExit (forgotten one poll late)
    empty = [pcicfg_addr(0, slot, 0, 0) for slot in range(32)
             if slot not in {d.slot for d in pci if d.bus == 0}]
    states = {a: cap.config_state(pid, a) for a in empty}
    after = cap.counters()
    fns = cap.bpf[b"virtio_fns"]
    # the kernel marked both virtio functions (vendor 0x1af4 read) and spanned their BARs
    marked = {int(getattr(k, "value", k)) & 0xFFFF for k in fns.keys()
              if int(getattr(k, "value", k)) >> 32 == pid}
    assert marked == {d.slot << 3 for d in pci if d.virtio_id is not None}, marked
    span = cap.bpf[b"devbar_k"].get(cap.bpf[b"devbar_k"].Key(pid))   # the kernel's own
    assert span is not None and all(
        span.base <= bar.address < span.base + span.size
        for d in pci if d.virtio_id is not None for bar in d.bars
        if bar.space == "mmio" and bar.address and bar.index < 6)
    cap.poll(0)
    assert all(cap.config_state(pid, a) is None for a in empty), "not forgotten after exit"
    assert cap.bpf[b"cf8_latch"].get(cap.bpf[b"cf8_latch"].Key(pid)) is None
    assert not [k for k in fns.keys() if int(getattr(k, "value", k)) >> 32 == pid]
    assert cap.bpf[b"devbar_k"].get(cap.bpf[b"devbar_k"].Key(pid)) is None

    space = ConfigSpace(events)
    assert space.accesses and all(e.register == 0 for e in space.accesses)
    assert all(e.tid != pid for e in space.accesses)          # a vCPU thread
    assert space.functions() == {_bdf(d) for d in pci}
    checked = _check_against_query_pci(space, pci)
    virtio = [d for d in pci if d.vendor == VIRTIO_VENDOR]
    assert len(virtio) == 2
    bar = 4 if transport == "modern" else 0
    assert all((_bdf(d), bar) in checked for d in virtio), checked

    # the two functions with identical ids: the id read of each is forwarded (folding is per
    # config address, not per port)
    ids = virtio[0].device << 16 | VIRTIO_VENDOR
    id_reads = {e.addr >> 12 for e in space.accesses
                if e.addr & 0xFFF == 0 and e.op == Op.READ and e.size == 4 and e.value == ids}
    assert id_reads == {_bdf(d) for d in virtio}

    # qboot and then the guest read the id of every empty slot: one read forwarded, the other
    # folded (in the kernel's state at exit, or carried by a later event)
    for a in empty:
        reads = [e for e in space.accesses if e.addr == a]
        assert [(e.op, e.size, e.value) for e in reads] == [(Op.READ, 4, 0xFFFFFFFF)], reads
        assert states[a] is not None and states[a].valid
        assert states[a].repeats >= 1, (hex(a), states[a])
    # never two identical accesses in a row at one config address
    last = {}
    for e in space.accesses:
        assert last.get(e.addr) != (e.op, e.size, e.value), e
        last[e.addr] = (e.op, e.size, e.value)
    delta = {k: after[k] - before[k] for k in after}
    assert delta["repeat"] >= len(empty)
    assert delta["config_forwarded"] >= len(space.accesses)
    assert delta["config_rate_limited"] == 0 and delta["ringbuf_full"] == 0
    print(f"\n{transport}: {len(space.accesses)} config accesses forwarded, "
          f"{sum(e.repeats for e in space.accesses)} repeats carried, "
          f"{len(space.functions())} functions, BARs checked {len(checked)}")


def _seabios(tmp_path: Path, machine: str, devices: int = 2):
    """QEMU with SeaBIOS (no -bios), stopped before the first instruction (-S), with QMP and
    SeaBIOS's debug console; transitional virtio-rng functions (BAR0 I/O, BAR1, BAR4)."""
    qmp, log = tmp_path / "qmp.sock", tmp_path / "seabios.log"
    cmd = ["qemu-system-x86_64", "-accel", "kvm", "-M", machine, "-m", "64", "-nodefaults",
           "-no-user-config", "-display", "none", "-S",
           "-qmp", f"unix:{qmp},server=on,wait=off",
           "-chardev", f"file,id=dbg,path={log}", "-device", "isa-debugcon,iobase=0x402,chardev=dbg"]
    for _ in range(devices):
        cmd += ["-device", "virtio-rng-pci"]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        wait_qmp(qmp, proc)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return proc, qmp, log


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


def test_q35_seabios_uses_the_ecam_window(cap, tmp_path):
    """SeaBIOS on q35 programs PCIEXBAR through 0xcf8/0xcfc, then does the rest (BAR sizing and
    assignment, device init) through the ECAM window at 0xb0000000. With a WatchEcam for that
    window, the window's MMIO accesses come out as configuration space: a second capture that
    only has the mmio family sees the BAR programming, and the BARs both rebuild equal QEMU's."""
    from agent.capture import Capture

    with Capture(hooks={"mmio", "exit"}) as mmio_only:
        before = cap.counters()
        proc, qmp, log = _seabios(tmp_path, "q35")
        pid, events, ecam_events = proc.pid, [], []
        try:
            window = WatchEcam(pid, Q35_ECAM_BASE, Q35_ECAM_SIZE)
            assert cap.watch_ecam(window) and mmio_only.watch_ecam(window)
            with QmpClient.connect(str(qmp)) as client:
                client.execute("cont")
            deadline = time.monotonic() + 20
            while "All threads complete" not in _read(log) and time.monotonic() < deadline:
                events += [e for e in cap.poll(50) if e.pid == pid]
                ecam_events += [e for e in mmio_only.poll(0) if e.pid == pid]
            assert "All threads complete" in _read(log), _read(log)[-2000:]
            with QmpClient.connect(str(qmp)) as client:
                pci = pci_map(client)
        finally:
            proc.kill()
            proc.wait()
        _poll_until(cap, pid, events, lambda: _exited(events, pid), 5)
        _poll_until(mmio_only, pid, ecam_events, lambda: _exited(ecam_events, pid), 5)
        after = cap.counters()
        mmio_stats = mmio_only.stats()
        cap.poll(0)                 # the exited VM's window is forgotten
        assert cap.bpf[b"ecam"].get(cap.bpf[b"ecam"].Key(pid)) is None

    assert "using q35 mmconfig at 0xb0000000" in _read(log)
    full, ecam = ConfigSpace(events), ConfigSpace(ecam_events)
    # the window's accesses are configuration space, never MMIO events (nor kicks)
    for evs in (events, ecam_events):
        assert not [e for e in evs if isinstance(e, (RegisterAccess, QueueNotify))
                    and getattr(e, "space", Space.MMIO) == Space.MMIO
                    and Q35_ECAM_BASE <= e.addr < Q35_ECAM_BASE + Q35_ECAM_SIZE]
    # PCIEXBAR (MCH 00:00.0 +0x60) written through the ports: enable | base, 256 MiB
    assert full.dword(0, 0x60) == Q35_ECAM_BASE | 1
    assert ecam.dword(0, 0x60) is None
    # ids of every function (ports and window together), BARs of every function (both)
    checked = _check_against_query_pci(full, pci)
    assert _check_against_query_pci(ecam, pci, with_ids=False) == checked
    virtio = [_bdf(d) for d in pci if d.vendor == VIRTIO_VENDOR]
    assert len(virtio) == 2 and all((b, i) in checked for b in virtio for i in (0, 4))
    # through the window: BAR sizing writes of every function with BARs
    sized = {e.addr >> 12 for e in ecam.accesses
             if e.op == Op.WRITE and 0x10 <= e.addr & 0xFFF < 0x28 and e.value == 0xFFFFFFFF}
    assert sized >= {b for b, _ in checked}
    delta = {k: after[k] - before[k] for k in after}
    assert delta["config_rate_limited"] == 0 and delta["ringbuf_full"] == 0
    assert mmio_stats.lost["ringbuf_full"] == 0
    print(f"\nq35 SeaBIOS: {len(full.accesses)} config accesses forwarded, "
          f"{len(ecam.accesses)} of them through the ECAM window; BARs checked {len(checked)}")


def _ecam_span(c) -> tuple[int, int]:
    from agent.capture.capture import CFG_ECAM_HI, CFG_ECAM_LO
    cfg = c.bpf[b"config"]
    return cfg[cfg.Key(CFG_ECAM_LO)].value, cfg[cfg.Key(CFG_ECAM_HI)].value


def _ecam_window(c, pid: int):
    v = c.bpf[b"ecam"].get(c.bpf[b"ecam"].Key(pid))
    return None if v is None else (v.base, v.size)


def test_q35_seabios_pciexbar_decoded_in_the_kernel(cap, tmp_path):
    """No WatchEcam before the boot: the kernel decodes SeaBIOS's PCIEXBAR write (00:00.0 +0x60
    through the ports) and installs the VM's window itself, so the BAR sizing through
    0xb0000000 that follows at once is forwarded from the first access on: the sequence equals
    that of a capture given the window before the first instruction (pciexbar_decode off), and
    the BARs rebuilt from it equal QEMU's. Without either, the window's accesses are lost. A
    later WatchEcam of the same window changes nothing."""
    from agent.capture import Capture

    with Capture(hooks={"pio", "mmio", "exit"}, pciexbar_decode=False) as ref, \
            Capture(hooks={"pio", "mmio", "exit"}, pciexbar_decode=False) as blind:
        assert cap.pciexbar_decode
        before = cap.counters()
        proc, qmp, log = _seabios(tmp_path, "q35")
        pid, events, ref_events, blind_events = proc.pid, [], [], []
        try:
            assert ref.watch_ecam(WatchEcam(pid, Q35_ECAM_BASE, Q35_ECAM_SIZE))
            assert _ecam_window(cap, pid) is None
            with QmpClient.connect(str(qmp)) as client:
                client.execute("cont")
            deadline = time.monotonic() + 20
            while "All threads complete" not in _read(log) and time.monotonic() < deadline:
                events += [e for e in cap.poll(50) if e.pid == pid]
                ref_events += [e for e in ref.poll(0) if e.pid == pid]
                blind_events += [e for e in blind.poll(0) if e.pid == pid]
            assert "All threads complete" in _read(log), _read(log)[-2000:]
            with QmpClient.connect(str(qmp)) as client:
                pci = pci_map(client)
            # set by the kernel; the correlator's WatchEcam, arriving later, agrees
            assert _ecam_window(cap, pid) == (Q35_ECAM_BASE, Q35_ECAM_SIZE)
            span = _ecam_span(cap)
            assert span[0] <= Q35_ECAM_BASE and Q35_ECAM_BASE + Q35_ECAM_SIZE <= span[1]
            assert cap.watch_ecam(WatchEcam(pid, Q35_ECAM_BASE, Q35_ECAM_SIZE))
            assert _ecam_window(cap, pid) == (Q35_ECAM_BASE, Q35_ECAM_SIZE)
            assert _ecam_span(cap) == span
            assert _ecam_window(blind, pid) is None
        finally:
            proc.kill()
            proc.wait()
        for c, evs in ((cap, events), (ref, ref_events), (blind, blind_events)):
            _poll_until(c, pid, evs, lambda: _exited(evs, pid), 5)
        after = cap.counters()
        cap.poll(0)                 # the exited VM's window is forgotten, the span recomputed
        assert _ecam_window(cap, pid) is None
        # (from what is left: the kernel decodes every VM's PCIEXBAR, other q35 VMs on the host)
        left = [(v.base, v.base + v.size) for v in cap.bpf[b"ecam"].values()]
        assert _ecam_span(cap) == ((min(b for b, _ in left), max(e for _, e in left))
                                   if left else (0, 0))

    assert "using q35 mmconfig at 0xb0000000" in _read(log)
    full, reference, blind_space = (ConfigSpace(events), ConfigSpace(ref_events),
                                    ConfigSpace(blind_events))
    seq = [(e.op, e.addr, e.size, e.value, e.repeats) for e in full.accesses]
    assert seq == [(e.op, e.addr, e.size, e.value, e.repeats) for e in reference.accesses]
    assert not [e for e in events if isinstance(e, (RegisterAccess, QueueNotify))
                and getattr(e, "space", Space.MMIO) == Space.MMIO
                and Q35_ECAM_BASE <= e.addr < Q35_ECAM_BASE + Q35_ECAM_SIZE]
    assert full.dword(0, 0x60) == Q35_ECAM_BASE | 1
    checked = _check_against_query_pci(full, pci)
    virtio = [_bdf(d) for d in pci if d.vendor == VIRTIO_VENDOR]
    assert len(virtio) == 2 and all((b, i) in checked for b in virtio for i in (0, 4))
    # BAR sizing of every function with BARs, all of it after the PCIEXBAR write (through
    # the window: SeaBIOS sizes only once mmconfig is on)
    first = next(i for i, e in enumerate(full.accesses)
                 if e.addr == 0x60 and e.op == Op.WRITE and e.size == 4)
    sized = {e.addr >> 12 for e in full.accesses[first:]
             if e.op == Op.WRITE and 0x10 <= e.addr & 0xFFF < 0x28 and e.value == 0xFFFFFFFF}
    assert sized >= {b for b, _ in checked}
    # without the decode and without a WatchEcam, that programming is not seen
    assert len(blind_space.accesses) < len(full.accesses) // 2
    assert not {b for b in virtio if blind_space.bar(b, 4, True, False) is not None}
    delta = {k: after[k] - before[k] for k in after}
    assert delta["config_rate_limited"] == 0 and delta["ringbuf_full"] == 0
    print(f"\nq35 SeaBIOS, PCIEXBAR decoded in the kernel: {len(full.accesses)} config accesses "
          f"forwarded (as with the window given up front), {len(full.accesses) - first - 1} "
          f"after the PCIEXBAR write; without either {len(blind_space.accesses)}; "
          f"BARs checked {len(checked)}")


def test_config_changes_beyond_the_bucket_are_counted(bpf):
    """A VM's config bucket bounds what it forwards (here burst 50, 1/s); the rest is counted
    (`config_rate_limited`, also in `rate_limited`)."""
    from agent.capture import Capture

    with Capture(hooks={"pio", "exit"}, config_burst=50, config_rate=1) as c:
        before = c.counters()
        vm = LabVM.start(GuestSpec(transport="modern", devices=2, scenario="init"))
        pid, events = vm.pid, []
        try:
            _poll_until(c, pid, events, lambda: _exited(events, pid), 15)
            vm.wait(timeout=5).raise_for_error()
        finally:
            vm.kill()
        after = c.counters()
    delta = {k: after[k] - before[k] for k in after}
    forwarded = [e for e in events if isinstance(e, RegisterAccess) and e.space == Space.PCICFG]
    assert 50 <= len(forwarded) <= 55       # the burst, and what 1/s refilled meanwhile
    assert delta["config_rate_limited"] > 100
    assert delta["rate_limited"] >= delta["config_rate_limited"]
