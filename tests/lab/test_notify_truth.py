"""The agent's notify phase and config-interrupt counts against the truth of a raw `record`.

One agent (`run`) serves the module; beside it, for each VM, a raw recorder (`record --pid PID
-o FILE`: its own BPF programs, no correlation), started while the VM is paused before its first
instruction (QEMU -S), so it sees the whole enumeration. For each variant (PCI modern on pc and q35, qboot and SeaBIOS
enumeration, ECAM, a second device of another type, modern or transitional, ioeventfd=off,
modern INTx with ISR reads, kernel-irqchip=split, virtio-mmio) one VM faults and recovers a few
times, and the truth is computed here from the recorder's raw events alone, never by the
correlator:

- the guest's PCI functions from its configuration-space accesses (ids, BARs, the virtio
  capabilities, the MSI-X capability, the interrupt line);
- each function's config vector at any instant: the data (and destination) of the MSI-X table
  entry that `msix_config` selects, from the guest's table and register writes; with MSI-X off,
  the GSI the guest wrote to the interrupt line register;
- each episode: the first status read showing 0x40, and the config interrupt that told the
  guest, the last one since the device's previous status write: an APIC acceptance of that
  vector by that destination (MSI-X), or an assertion of that GSI (its first rise after a fall)
  whose next ISR read has the config bit (INTx; a line two devices share is not exact).
  virtio-mmio's line is not programmed through anything the kernel traces, so there the truth
  is "not known exactly".

Checked per episode: where the truth is known, the agent's episode starts from that interrupt
(evidence `config_interrupt`) and its notify phase is within 100 us of the truth; where it is not
known, the notify phase is absent (null, evidence `status_read`). The interrupt nearest the
agent's episode start is the device's config interrupt, never another vector's.
`virtio_config_interrupts_total` equals the number of config interrupts in the truth (MSI-X:
deliveries on the config vector; INTx: ISR reads with the config bit; virtio-mmio: InterruptACK
writes with it). Every device's `device` and `type` labels are those of the enumeration in the
record and of QEMU's `query-pci` (asked while the VM is paused before its first instruction).

The recorder watches the lab's vectors (0x40-0x4f: every config and queue vector the guest
programs), the GSIs a lab device can have, and virtio-mmio's InterruptACK registers; everything
else reaches it as the kernel forwards it without watches (configuration space, BAR writes,
status-like accesses).

Timestamps come from two BPF programs on the same tracepoints; on a busy host a vCPU thread can
be preempted between them. An attempt where the agent took the right events but the two
programs' clocks for them differ by more than the bound, or where the recorder's or the agent's
ring buffer overflowed (then what is missing is unknown), is void and repeated (up to ATTEMPTS
times); a wrong event fails at once.
"""
from __future__ import annotations

import ast
import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import pytest

from agent.events import (
    ApicAccepted, IrqLine, Op, RegisterAccess, Space, VmStarted, from_json, pcicfg_split,
)
from tests.lab.scrape import samples, wait_until

ROOT = Path(__file__).resolve().parents[2]
BOUND_NS = 100_000          # the bound: agent notify vs truth
ATTEMPTS = 3                # a busy host may put a preemption between the two programs' stamps
NEEDS_RESET = 0x40
ISR_CONFIG = 0x2
VIRTIO_VENDOR = 0x1AF4
TYPE_NAMES = {1: "net", 2: "blk", 3: "console", 4: "rng", 5: "balloon", 8: "scsi", 9: "9p",
              16: "gpu", 18: "input", 19: "vsock", 26: "fs"}
# what the recorder watches (module docstring)
LAB_VECTORS = range(0x40, 0x50)
# INTx lines of the lab's machines: i440fx PIRQs routed to 5-11 by the firmware or the guest,
# ich9 PIRQ E-H on 20-23 (also an ISA IRQ), microvm's virtio-mmio pins 24+ (not device state)
LAB_GSIS = [5, 6, 7, 9, 10, 11, 16, 17, 18, 19, 20, 21, 22, 23]
MMIO_WINDOW, MMIO_SLOTS, MMIO_ALIGN = 0xFEB00000, 32, 0x200
MMIO_STATUS, MMIO_ACK = 0x70, 0x64
RUN = f"ntruth{os.getpid()}-"

# a running guest does not fault right after its bring-up (fault_delay_ms), nor right after boot
BASE = dict(scenario="recover", repeat=3, fault_delay_ms=150, start_delay_ms=300)
VARIANTS = {
    "pc-qboot-msix": dict(),
    "q35-qboot-msix-blk": dict(machine="q35", extra="blk"),
    "pc-seabios-msix-net": dict(firmware="seabios", extra="net", repeat=2),
    "q35-seabios-ecam-msix-net-transitional": dict(machine="q35", firmware="seabios",
                                                   pcicfg="ecam", extra="net",
                                                   extra_transitional=True, repeat=2),
    "pc-2rng-msix-blk-transitional": dict(devices=2, extra="blk", extra_transitional=True,
                                          repeat=2),
    "pc-msix-ioeventfd-off": dict(ioeventfd=False),
    "pc-intx-isr-blk": dict(irq="intx", extra="blk"),
    "q35-intx-isr": dict(machine="q35", irq="intx"),
    "pc-split-msix": dict(irqchip="split"),
    "pc-split-intx": dict(irqchip="split", irq="intx"),
    "q35-split-intx-ecam-blk": dict(machine="q35", irqchip="split", irq="intx", pcicfg="ecam",
                                    extra="blk"),
    "mmio-net": dict(transport="mmio", extra="net"),
    "mmio-ioeventfd-off": dict(transport="mmio", ioeventfd=False),
}


# --- the truth, from raw events -----------------------------------------------------------------

class TruthUnknown(AssertionError):
    """The record lacks something the truth needs (a guest access the lab guest always makes)."""


@dataclass
class Function:
    """A PCI function as the guest's configuration accesses left it (last value per byte)."""
    bdf: int
    cfg: dict[int, int] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"pci-0000:{self.bdf >> 8:02x}:{(self.bdf >> 3) & 0x1F:02x}.{self.bdf & 7:x}"

    def get(self, off: int, size: int) -> int:
        try:
            return sum(self.cfg[off + i] << (8 * i) for i in range(size))
        except KeyError:
            raise TruthUnknown(f"{self.name}: config bytes {off:#x}+{size} never accessed") \
                from None

    @property
    def is_virtio(self) -> bool:
        return (self.cfg.get(0), self.cfg.get(1)) == (VIRTIO_VENDOR & 0xFF, VIRTIO_VENDOR >> 8) \
            and 0x1000 <= self.get(2, 2) <= 0x107F

    @property
    def type(self) -> str:
        dev = self.get(2, 2)
        vid = dev - 0x1040 if dev >= 0x1040 else self.get(0x2E, 2)   # transitional: subsystem
        return TYPE_NAMES.get(vid, f"virtio-{vid}")

    def bar(self, i: int) -> int:
        lo = self.get(0x10 + 4 * i, 4)
        if lo & 1:
            return lo & ~0x3
        if (lo >> 1) & 3 == 2:
            return (lo & ~0xF) | self.get(0x14 + 4 * i, 4) << 32
        return lo & ~0xF

    def capabilities(self) -> list[int]:
        caps, ptr = [], self.get(0x34, 1) & 0xFC
        while ptr and len(caps) < 48:
            caps.append(ptr)
            ptr = self.get(ptr + 1, 1) & 0xFC
        return caps

    def virtio_struct(self, cfg_type: int) -> Optional[int]:
        """Guest address of a virtio capability structure (virtio 1.x 4.1.4), if present."""
        for ptr in self.capabilities():
            if self.get(ptr, 1) == 0x09 and self.get(ptr + 3, 1) == cfg_type:
                return self.bar(self.get(ptr + 4, 1)) + self.get(ptr + 8, 4)
        return None

    def msix_table(self) -> Optional[int]:
        for ptr in self.capabilities():
            if self.get(ptr, 1) == 0x11:
                table = self.get(ptr + 4, 4)
                return self.bar(table & 7) + (table & ~7)
        return None


@dataclass
class TruthEpisode:
    device: str
    read_ns: int                     # the first status read showing NEEDS_RESET
    irq_ns: Optional[int]            # the config interrupt that told the guest; None: unknown
    exact: bool                      # the device's config vector / line is known exactly

    @property
    def notify_ns(self) -> Optional[int]:
        return None if self.irq_ns is None else self.read_ns - self.irq_ns


@dataclass
class Truth:
    devices: dict[str, str] = field(default_factory=dict)            # name -> type
    episodes: list[TruthEpisode] = field(default_factory=list)
    config_irqs: dict[str, int] = field(default_factory=dict)        # name -> count
    # per device: interrupt events of its config interrupts (event ts -> the interrupt's ts: an
    # INTx assertion can be several line events), and every other source's interrupt events
    own: dict[str, dict[int, int]] = field(default_factory=dict)
    others: dict[str, list[int]] = field(default_factory=dict)


def _changes(events, addr: int, space: str = Space.MMIO) -> list[RegisterAccess]:
    return [e for e in events if isinstance(e, RegisterAccess) and e.space == space
            and e.addr == addr]


def _count_bit(accesses: list[RegisterAccess], op: str, bit: int) -> int:
    """Accesses with `bit` set; folded identical ones (`repeats`, carried by the next forwarded
    access of the register) count for the value they repeated."""
    n, prev = 0, None
    for e in accesses:
        if prev is not None and prev.op == op and prev.value & bit:
            n += e.repeats
        if e.op == op and e.value & bit:
            n += 1
        prev = e
    return n


def _episodes(device: str, status: list[RegisterAccess]) -> list[tuple[int, int]]:
    """(first read showing 0x40, the device's previous status write) per episode."""
    out, last_write, had = [], 0, False
    for e in status:
        if e.op == Op.WRITE:
            last_write, had = e.ts_ns, bool(e.value & NEEDS_RESET)
        elif e.value & NEEDS_RESET and not had:
            out.append((e.ts_ns, last_write))
            had = True
        else:
            had = bool(e.value & NEEDS_RESET)
    return out


def pci_truth(events: list, truth: Truth) -> None:
    funcs: dict[int, Function] = {}
    for e in events:
        if isinstance(e, RegisterAccess) and e.space == Space.PCICFG:
            bdf, off = pcicfg_split(e.addr)
            f = funcs.setdefault(bdf, Function(bdf))
            for i in range(e.size):
                f.cfg[off + i] = (e.value >> (8 * i)) & 0xFF
    virtio = [f for f in funcs.values() if f.cfg.get(0) is not None and f.is_virtio]
    lines = {f.name: f.get(0x3C, 1) for f in virtio}
    apic = [e for e in events if isinstance(e, ApicAccepted)]
    line_events = [e for e in events if isinstance(e, IrqLine)]
    rises = [e for e in line_events if e.level]
    msix_vectors: set[int] = set()      # every vector an MSI-X table entry of the VM carries
    for f in virtio:
        table = f.msix_table()
        if table is not None:
            msix_vectors |= {e.value & 0xFF for e in events if isinstance(e, RegisterAccess)
                             and e.space == Space.MMIO and e.op == Op.WRITE
                             and table <= e.addr < table + 16 * 64 and (e.addr - table) % 16 == 8}
    for f in virtio:
        truth.devices[f.name] = f.type
        common, table = f.virtio_struct(1), f.msix_table()
        if common is None:
            raise TruthUnknown(f"{f.name}: no common configuration structure")
        status = _changes(events, common + 0x14)
        if table is not None:
            # the config vector at each instant: entry[msix_config] (data, destination, mask)
            regs = [e for e in events if isinstance(e, RegisterAccess) and e.space == Space.MMIO
                    and e.op == Op.WRITE and (e.addr == common + 0x10
                                              or table <= e.addr < table + 16 * 64)]
            irqs, entries, selected, i = [], {}, 0xFFFF, 0
            for a in apic:
                while i < len(regs) and regs[i].ts_ns <= a.ts_ns:
                    r = regs[i]
                    if r.addr == common + 0x10:
                        selected = r.value
                    else:
                        entries.setdefault((r.addr - table) // 16, {})[(r.addr - table) % 16] = \
                            r.value
                    i += 1
                ent = entries.get(selected, {})
                if (ent.get(8, -1) & 0xFF) == a.vector and not ent.get(12, 0) & 1 \
                        and (ent.get(0, 0) >> 12) & 0xFF == a.apicid:
                    irqs.append(a.ts_ns)
            truth.config_irqs[f.name] = len(irqs)
            truth.own[f.name] = {t: t for t in irqs}
            truth.others[f.name] = [a.ts_ns for a in apic if a.ts_ns not in truth.own[f.name]] \
                + [r.ts_ns for r in rises]
            exact = True
        else:
            isr = f.virtio_struct(3)
            if isr is None:
                raise TruthUnknown(f"{f.name}: no ISR structure")
            gsi = lines[f.name]
            exact = list(lines.values()).count(gsi) == 1      # a line shared: who raised it?
            isr_reads = [e for e in _changes(events, isr) if e.op == Op.READ]
            truth.config_irqs[f.name] = _count_bit(isr_reads, Op.READ, ISR_CONFIG)
            irqs, own = _config_assertions([e for e in line_events if e.gsi == gsi], isr_reads)
            truth.own[f.name] = own
            # the APIC acceptance of an assertion carries the vector of an IOAPIC entry, which
            # nothing traced shows: only MSI-X vectors are surely another source's
            truth.others[f.name] = [r.ts_ns for r in rises if r.gsi != gsi] \
                + [a.ts_ns for a in apic if a.vector in msix_vectors]
        for read_ns, since in _episodes(f.name, status):
            told = [t for t in irqs if since < t <= read_ns] if exact else []
            if exact and not told:
                raise TruthUnknown(f"{f.name}: no config interrupt before its 0x40 read at "
                                   f"{read_ns}")
            truth.episodes.append(TruthEpisode(f.name, read_ns, told[-1] if told else None,
                                               exact))


def _config_assertions(line: list[IrqLine], isr_reads: list[RegisterAccess]):
    """A line's assertions (a rise after a fall; KVM may trace more rises of the same
    assertion, e.g. for its PIC and IOAPIC) that were config interrupts: the first ISR read after
    the assertion has the config bit. Returns their start times, and each of their rises' ts ->
    its assertion's start."""
    starts, own, low, current = [], {}, True, None
    for e in line:
        if not e.level:
            low = True
            continue
        if low:
            nxt = next((r for r in isr_reads if r.ts_ns > e.ts_ns), None)
            current = e.ts_ns if nxt is not None and nxt.value & ISR_CONFIG else None
            if current is not None:
                starts.append(current)
            low = False
        if current is not None:
            own[e.ts_ns] = current
    return starts, own


def mmio_truth(events: list, truth: Truth) -> None:
    """virtio-mmio: devices from their status accesses (4 bytes at +0x70 of a 0x200 window);
    their line is wired by the VMM, not programmed through anything traced: not exact."""
    bases = sorted({e.addr - MMIO_STATUS for e in events if isinstance(e, RegisterAccess)
                    and e.space == Space.MMIO and e.size == 4
                    and e.addr % MMIO_ALIGN == MMIO_STATUS
                    and MMIO_WINDOW <= e.addr < MMIO_WINDOW + MMIO_SLOTS * MMIO_ALIGN})
    for base in bases:
        name = f"mmio-{base:#x}"
        # DeviceID (+0x08) is a 4-byte read that capture does not forward: type unknown here
        truth.devices[name] = "unknown"
        acks = [e for e in _changes(events, base + MMIO_ACK) if e.op == Op.WRITE]
        truth.config_irqs[name] = _count_bit(acks, Op.WRITE, ISR_CONFIG)
        for read_ns, since in _episodes(name, _changes(events, base + MMIO_STATUS)):
            # the pre-fault queue interrupt's ACK: the recorder's watch was in place in time
            if not any(since < a.ts_ns < read_ns and a.value & 1 for a in acks):
                raise TruthUnknown(f"{name}: no queue InterruptACK recorded before the episode "
                                   f"at {read_ns} (the recorder's watch came late?)")
            truth.episodes.append(TruthEpisode(name, read_ns, None, exact=False))


def compute_truth(events: list, mmio: bool) -> Truth:
    truth = Truth()
    (mmio_truth if mmio else pci_truth)(events, truth)
    return truth


# --- the recorder and the agent ---------------------------------------------------------------

class Recorder:
    """`virtio-recovery-agent record --pid PID -o FILE` as a subprocess, for one VM, started
    while that VM is paused before its first instruction (QEMU -S)."""

    def __init__(self, workdir: Path, pid: int) -> None:
        self.path = workdir / "raw.jsonl"
        self.err = workdir / "record.err"
        self.pid = pid
        args = ["--pid", str(pid)]
        args += [a for v in LAB_VECTORS for a in ("--watch-vector", str(v))]
        args += [a for g in LAB_GSIS for a in ("--watch-gsi", str(g))]
        args += [a for n in range(MMIO_SLOTS)
                 for a in ("--watch-status", f"mmio:{MMIO_WINDOW + n * MMIO_ALIGN + MMIO_ACK:#x}")]
        with open(self.err, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "agent", "record", "-o", str(self.path), *args],
                cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)

        def attached() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"record exited {self.proc.returncode}: {self.stderr()}")
            return "hook mmio: attached" in self.stderr() and self.path.exists()
        wait_until("the recorder's hooks", attached, timeout_s=120, every_s=0.1)

    def stderr(self) -> str:
        return self.err.read_text(errors="replace")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self) -> tuple[list, dict[str, int]]:
        """Stop (it drains the ring buffer); this VMM's events by ts, and what the recorder's
        kernel side lost (from its summary line)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        summary = [ln for ln in self.stderr().splitlines() if ln.startswith("record: ")]
        assert summary and "lost {" in summary[-1], f"record failed: {self.stderr()[-1500:]}"
        lost = ast.literal_eval(summary[-1].split("lost ", 1)[1].split("}", 1)[0] + "}")
        events = []
        for line in self.path.read_text().splitlines():
            ev = from_json(line)
            if ev.pid == self.pid and not isinstance(ev, VmStarted):
                events.append(ev)
        events.sort(key=lambda e: e.ts_ns)
        return events, lost


@pytest.fixture(scope="module")
def agent():
    from agent.demo import AgentProcess

    with AgentProcess(stuck_after_s=60) as a:
        yield a
    if REPORT:
        print("\nnotify: agent vs raw record truth, per episode (us)")
        for line in REPORT:
            print("  " + line)


REPORT: list[str] = []


# --- one run ----------------------------------------------------------------------------------

@dataclass
class Run:
    name: str
    truth: Truth
    records: list[dict]
    devices: dict[str, dict]            # agent: device -> virtio_device_info labels
    config_irqs: dict[str, float]       # agent: device -> virtio_config_interrupts_total
    qemu: dict[str, str]                # query-pci (or x-query-virtio on mmio): device -> type
    guest_episodes: int
    lost: dict[str, float]              # events the recorder's or the agent's kernel side lost


def qemu_devices(qmp: Path, mmio: bool, ioeventfd: bool = True) -> dict[str, str]:
    """While the VM is paused (-S): PCI address -> virtio type from query-pci; on microvm (no
    PCI) qdev id -> type from x-query-virtio."""
    from agent.vmm.probe import pci_map, virtio_devices
    from agent.vmm.qmp import QmpClient, QmpConnectError

    def session():
        try:
            return QmpClient.connect(str(qmp), timeout=10, budget_s=30)
        except QmpConnectError:
            return None     # the socket file exists a moment before QEMU listens on it
    c = wait_until("QEMU's QMP socket", session, timeout_s=60)
    with c:
        if mmio:
            return {d.qdev_id: d.name.removeprefix("virtio-") for d in virtio_devices(c)}
        found = pci_map(c)
        for d in found:
            if d.virtio_id is not None:     # the variant's ioeventfd setting took
                assert c.execute("qom-get", {"path": f"/machine/peripheral/{d.qdev_id}",
                                             "property": "ioeventfd"}) is ioeventfd, d
        return {d.device_key: d.virtio_type for d in found if d.virtio_id is not None}


def resume(qmp: Path) -> None:
    from agent.vmm.qmp import QmpClient

    with QmpClient.connect(str(qmp), timeout=10, budget_s=30) as c:
        c.execute("cont")


def agent_lost(text: str) -> float:
    return sum(v for _, v in samples(text, "virtio_agent_events_lost_total", reason="ringbuf_full"))


def run_variant(agent, variant: str, attempt: int, workdir: Path) -> Run:
    from lab.harness import GuestSpec, LabVM

    name = f"{RUN}{variant}-{attempt}-{uuid.uuid4().hex[:4]}"
    spec = GuestSpec(**{**BASE, **VARIANTS[variant]}, qmp=True,
                     extra_args=("-name", name, "-S"))
    mmio = spec.transport == "mmio"
    workdir.mkdir(parents=True)
    lost_before = agent_lost(agent.metrics_text())
    vm = LabVM.start(spec)
    rec = None
    try:
        qemu = qemu_devices(vm.qmp_path, mmio, spec.ioeventfd)
        rec = Recorder(workdir, vm.pid)
        resume(vm.qmp_path)
        result = vm.wait(90).raise_for_error()
    except BaseException:
        if rec is not None:
            rec.kill()
        raise
    finally:
        vm.kill()
    expected = len(result.episodes)
    assert expected and all(e.needs_reset_status == 0x4F for e in result.episodes), result

    def recovered():
        recs = [r for r in agent.records() if r["vm"] == name and r["outcome"] == "recovered"]
        return recs if len(recs) >= expected else None

    try:
        records = wait_until(f"{name}: {expected} recovered episodes in the agent's log",
                             recovered, timeout_s=60, every_s=0.2)
    finally:
        events, lost = rec.stop()
    text = agent.metrics_text()
    lost = {f"record {k}": v for k, v in lost.items() if v}
    if agent_lost(text) > lost_before:
        lost["agent ringbuf_full"] = agent_lost(text) - lost_before
    return Run(
        name=name, truth=compute_truth(events, mmio), records=records,
        devices={lb["device"]: lb for lb, _ in samples(text, "virtio_device_info", vm=name)},
        config_irqs={lb["device"]: v for lb, v in
                     samples(text, "virtio_config_interrupts_total", vm=name)},
        qemu=qemu, guest_episodes=expected, lost=lost)


class Noise(AssertionError):
    """The agent took the truth's events, but the two programs' stamps differ by > bound."""


def check(run: Run) -> list[str]:
    """Assert everything; returns report lines. Raises Noise only when every event matched."""
    t = run.truth
    # devices: the enumeration's names and types, as QEMU has them
    types = {d: lb["type"] for d, lb in run.devices.items()}
    if all(d.startswith("pci-") for d in t.devices):
        assert types == t.devices, (run.name, "agent vs record", run.devices, t.devices)
        assert t.devices == run.qemu, (run.name, "record vs query-pci", t.devices, run.qemu)
    else:
        # virtio-mmio: names from the record; the type is QEMU's or unknown, never another
        assert set(types) == set(t.devices), (run.name, run.devices, t.devices)
        assert len(types) == len(run.qemu), (run.name, types, run.qemu)
        assert all(v == "unknown" or v in run.qemu.values() for v in types.values()), \
            (run.name, types, run.qemu)
    # config interrupts: only real ones
    assert run.config_irqs == t.config_irqs, (run.name, run.config_irqs, t.config_irqs)
    # episodes, in order per device
    assert len(t.episodes) == run.guest_episodes, (t.episodes, run.guest_episodes)
    noise, lines = [], []
    for device in t.devices:
        mine = sorted((e for e in t.episodes if e.device == device), key=lambda e: e.read_ns)
        agent = sorted((r for r in run.records if r["device"] == device),
                       key=lambda r: r["start_ns"])
        assert len(agent) == len(mine), (run.name, device, agent, mine)
        for k, (te, r) in enumerate(zip(mine, agent)):
            where = f"{run.name} {device} episode {k}"
            if not te.exact:
                assert (r["evidence"], r["notify_seconds"]) == ("status_read", None), (where, r)
                lines.append(f"{where}: notify absent (line not known exactly), agent "
                             f"{r['evidence']}")
                continue
            assert r["evidence"] == "config_interrupt" and r["notify_seconds"] is not None, \
                (where, "the vector is known exactly: notify must be measured", r)
            # the interrupt event nearest the agent's start is one of this device's config
            # interrupt that told the guest, not another source's
            near = min([(abs(ts - r["start_ns"]), ts, "own") for ts in t.own[device]]
                       + [(abs(ts - r["start_ns"]), ts, "other") for ts in t.others[device]])
            assert near[2] == "own", (where, "episode started from another interrupt", near, te)
            assert t.own[device][near[1]] == te.irq_ns, \
                (where, "not the config interrupt that told the guest", near, te)
            agent_ns = round(r["notify_seconds"] * 1e9)
            diff = agent_ns - te.notify_ns
            lines.append(f"{where}: truth {te.notify_ns / 1e3:.1f}, agent {agent_ns / 1e3:.1f}, "
                         f"diff {diff / 1e3:+.1f} (start {(r['start_ns'] - te.irq_ns) / 1e3:+.1f}"
                         f", read {(r['guest_saw_ns'] - te.read_ns) / 1e3:+.1f})")
            if abs(diff) > BOUND_NS:
                noise.append(lines[-1])
    if noise:
        raise Noise("; ".join(noise))
    return lines


@pytest.mark.kvm
@pytest.mark.bpf
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_notify_within_100us_of_the_raw_truth(agent, variant: str, tmp_path: Path) -> None:
    for attempt in range(ATTEMPTS):
        run = run_variant(agent, variant, attempt, tmp_path / str(attempt))
        try:
            if run.lost:
                # the host was too busy for a ring buffer: what is missing is unknown
                raise Noise(f"events lost {run.lost}")
            lines = check(run)
        except Noise as exc:
            REPORT.append(f"{variant} attempt {attempt}: measurement void: {exc}")
            if attempt == ATTEMPTS - 1:
                raise
            time.sleep(2)           # let the host quieten
            continue
        REPORT.extend(lines)
        return


# --- the truth computation itself, on hand-made events (no KVM) ----------------------------------

def test_truth_follows_msix_config_and_entry_reprogramming() -> None:
    from agent.events import pcicfg_addr

    def cfg(off, size, value, op=Op.READ, ts=0):
        return RegisterAccess(ts, 1, 1, Space.PCICFG, op, pcicfg_addr(0, 2, 0, off), size, value)

    def mmio(addr, size, value, op, ts):
        return RegisterAccess(ts, 1, 1, Space.MMIO, op, addr, size, value)

    bar1, bar4 = 0xC0000000, 0xC0004000
    ev = [cfg(0, 4, 0x1044_1AF4), cfg(0x10 + 4, 4, bar1), cfg(0x10 + 16, 4, bar4 | 0x4),
          cfg(0x24, 4, 0), cfg(0x34, 1, 0x40), cfg(0x3C, 1, 11),
          # MSI-X cap at 0x40: table in BAR1 at 0; common cfg cap at 0x50: BAR4 + 0
          cfg(0x40, 4, 0x8001_5011), cfg(0x44, 4, 0x1), cfg(0x48, 4, 0x801),
          cfg(0x50, 4, 0x0101_0009), cfg(0x54, 4, 4), cfg(0x58, 4, 0), cfg(0x5C, 4, 0x1000)]
    ev += [mmio(bar1 + 0, 4, 0xFEE00000, Op.WRITE, 10), mmio(bar1 + 8, 4, 0x40, Op.WRITE, 11),
           mmio(bar1 + 16, 4, 0xFEE00000, Op.WRITE, 12), mmio(bar1 + 24, 4, 0x41, Op.WRITE, 13),
           mmio(bar4 + 0x10, 2, 0, Op.WRITE, 14),
           mmio(bar4 + 0x14, 1, 0xF, Op.WRITE, 20),
           ApicAccepted(100, 1, 1, 0, 0x41), ApicAccepted(200, 1, 1, 0, 0x40),
           mmio(bar4 + 0x14, 1, 0x4F, Op.READ, 250), mmio(bar4 + 0x14, 1, 0, Op.WRITE, 300),
           # the guest moves its config interrupt to entry 1 (vector 0x41), re-inits
           mmio(bar4 + 0x10, 2, 1, Op.WRITE, 310), mmio(bar4 + 0x14, 1, 0xF, Op.WRITE, 320),
           ApicAccepted(400, 1, 1, 0, 0x40), ApicAccepted(500, 1, 1, 0, 0x41),
           ApicAccepted(510, 1, 1, 1, 0x41),          # another APIC: not this device's
           mmio(bar4 + 0x14, 1, 0x4F, Op.READ, 600)]
    t = compute_truth(ev, mmio=False)
    assert t.devices == {"pci-0000:00:02.0": "rng"}
    assert [(e.read_ns, e.irq_ns, e.notify_ns) for e in t.episodes] == [(250, 200, 50),
                                                                       (600, 500, 100)]
    assert t.config_irqs == {"pci-0000:00:02.0": 2}
    assert t.own["pci-0000:00:02.0"] == {200: 200, 500: 500}
    assert sorted(t.others["pci-0000:00:02.0"]) == [100, 400, 510]


def test_truth_intx_shared_line_is_not_exact_and_isr_counts() -> None:
    from agent.events import pcicfg_addr

    def func(slot, line, bar):
        def cfg(off, size, value):
            return RegisterAccess(0, 1, 1, Space.PCICFG, Op.READ, pcicfg_addr(0, slot, 0, off),
                                  size, value)
        return [cfg(0, 4, 0x1044_1AF4), cfg(0x20, 4, bar | 0x4), cfg(0x24, 4, 0),
                cfg(0x34, 1, 0x50), cfg(0x3C, 1, line),
                cfg(0x50, 4, 0x0101_6009), cfg(0x54, 4, 4), cfg(0x58, 4, 0),
                cfg(0x60, 4, 0x0301_0009), cfg(0x64, 4, 4), cfg(0x68, 4, 0x1000)]

    def mmio(addr, value, op, ts, repeats=0):
        return RegisterAccess(ts, 1, 1, Space.MMIO, op, addr, 1, value, repeats=repeats)

    a, b = 0xC0004000, 0xC0008000
    ev = func(2, 10, a) + func(3, 11, b) + [
        # a queue interrupt (ISR 0x1), then the config interrupt, traced twice (PIC, IOAPIC)
        IrqLine(40, 1, 1, 10, 1), mmio(a + 0x1000, 0x1, Op.READ, 50), IrqLine(55, 1, 1, 10, 0),
        IrqLine(100, 1, 1, 10, 1), ApicAccepted(105, 1, 1, 0, 0x40), IrqLine(110, 1, 1, 10, 1),
        IrqLine(120, 1, 1, 11, 1), mmio(a + 0x14, 0x4F, Op.READ, 150),
        mmio(a + 0x1000, 0x3, Op.READ, 160), mmio(a + 0x1000, 0x1, Op.READ, 170),
        mmio(a + 0x1000, 0x3, Op.READ, 180), mmio(a + 0x1000, 0x0, Op.READ, 190, repeats=2)]
    t = compute_truth(ev, mmio=False)
    (e,) = t.episodes
    assert (e.device, e.irq_ns, e.exact) == ("pci-0000:00:02.0", 100, True)
    assert t.own["pci-0000:00:02.0"] == {100: 100, 110: 100}
    assert t.others["pci-0000:00:02.0"] == [120]    # gsi 11; the APIC's vector is no MSI-X one
    assert t.config_irqs == {"pci-0000:00:02.0": 4, "pci-0000:00:03.0": 0}   # 1 + 1 + 2 folded
    t = compute_truth(func(2, 10, a) + func(3, 10, b) + ev[22:], mmio=False)
    (e,) = t.episodes
    assert (e.irq_ns, e.exact, e.notify_ns) == (None, False, None)


def test_truth_needs_what_the_guest_always_reads() -> None:
    ev = [RegisterAccess(0, 1, 1, Space.PCICFG, Op.READ, 0x10000, 4, 0x1044_1AF4)]
    with pytest.raises(TruthUnknown, match="never accessed"):
        compute_truth(ev, mmio=False)
    ev = [RegisterAccess(0, 1, 1, Space.MMIO, Op.WRITE, MMIO_WINDOW + MMIO_STATUS, 4, 0xF),
          RegisterAccess(9, 1, 1, Space.MMIO, Op.READ, MMIO_WINDOW + MMIO_STATUS, 4, 0x4F)]
    with pytest.raises(TruthUnknown, match="InterruptACK"):
        compute_truth(ev, mmio=True)


def test_ioeventfd_off_command_lines(tmp_path: Path) -> None:
    from lab.harness import GuestSpec, qemu_command

    cmd = qemu_command(GuestSpec(ioeventfd=False, extra="blk", extra_transitional=True), tmp_path)
    devices = [cmd[i + 1] for i, a in enumerate(cmd) if a == "-device" and "virtio" in cmd[i + 1]]
    assert len(devices) == 2 and all(d.endswith(",ioeventfd=off") for d in devices), devices
    cmd = qemu_command(GuestSpec(transport="mmio", ioeventfd=False), tmp_path)
    assert "virtio-mmio.ioeventfd=off" in cmd        # a property of the transport there
    cmd = qemu_command(GuestSpec(), tmp_path)
    assert not [a for i, a in enumerate(cmd[1:]) if cmd[i] in ("-device", "-global")
                and "ioeventfd" in a]
