"""What the agent's `kvm_mmio` program costs per run, as a ratio to an EMPTY program on the
same tracepoint, measured over the same guest exits.

Everything is attached at once for the whole benchmark, so every guest exit runs every program
(in attach order):
  empty-tp     `TRACEPOINT_PROBE(kvm, kvm_mmio) { return 0; }`           (loaded first)
  empty-raw    `RAW_TRACEPOINT_PROBE(kvm_mmio) { return 0; }` (if raw tracepoints are usable,
               as the agent then uses them)                               (loaded first)
  agent        `virtio-recovery-agent run` as shipped (subprocess: its own device model,
               discovery, activity, PCI config and device-BAR forwarding); its program's
               run_cnt / run_time_ns come from its /metrics
  capture      agent.capture.Capture in this process (every family but `ioctl`, as `run
               --hooks auto` on a host without vDPA), the device's status register watched,
               no userspace device model (no WatchEcam / WatchDeviceBars)
  capture-tp   the same Capture on regular tracepoints (raw_tracepoints=False)
  nodisc       the same Capture with discovery_rate=0 and activity_rate=0 (no status
               candidates, no forwarding of unwatched kicks), status watched
  empty-raw2   a second empty raw program loaded LAST (runs after all the others on each exit:
               shows how much a program's position / cache state moves the floor)
Cost per run = delta run_time_ns / delta run_cnt over one guest run (kernel.bpf_stats_enabled,
switched on for the benchmark, the previous value restored). Each program sees every VM on the
host: runs/op shows whether other guests' traffic mixed in (the ratio is still over the same
exits, whoever caused them).

Cases (lab guest, one modern virtio-pci device; rounds interleave the cases, order rotating):
  outside   writestorm storm_reg=ipi: N 4-byte writes of the LAPIC ICR (0xfee00300, self-IPIs
            on the config vector) -- an MMIO address outside the device model, no status
            candidate (value > 0xff), no kick (not 16-bit, not +0x50): the C_UNWATCHED path
  watched-w writestorm: N writes of the current status value (watched; folded)
  watched-r readstorm: N status reads (watched; folded; 2 kvm_mmio runs per read, the first an
            unsatisfied-read early return)
  recover   an ordinary guest run: firmware and guest enumeration (PCI config through
            0xcf8/0xcfc), BAR assignment, device init, MSI-X programming, pre-fault queue
            request, NEEDS_RESET fault, reset and re-init -- most accesses first seen
Prints figures and ratios; asserts nothing.

    sudo .venv/bin/python -m bench.mmio_cost [--rounds 5] [--ops 100000] [--cases ...]
    sudo .venv/bin/python -m bench mmio_cost
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from typing import Optional

from bench.common import BPF_STATS, bpf_stats_enabled, machine, median

CASES = ("outside", "watched-w", "watched-r", "recover")
SUBJECTS = ("agent", "capture", "capture-tp", "nodisc", "readval", "lookup", "ringbuf", "ringbuf-nowake")
DEFAULT_SUBJECTS = SUBJECTS
# every family but `ioctl` (what `run --hooks auto` attaches on a host without vDPA)
NO_IOCTL = ("mmio", "pio", "apic", "exit", "fast_mmio", "msi", "gsi")
# the tracepoints measured: kvm_mmio (the figure) and kvm_pio (PCI config through
# 0xcf8/0xcfc, which the agent now forwards, goes there)
TPS = ("kvm_mmio", "kvm_pio")
EMPTY_TP = "\n".join(f"TRACEPOINT_PROBE(kvm, {tp}) {{ return 0; }}" for tp in TPS)
EMPTY_RAW = "\n".join(f"RAW_TRACEPOINT_PROBE({tp}) {{ return 0; }}" for tp in TPS)
# the cost of forwarding alone: every run reserves and submits a record of the capture's size
# (48 bytes) with a timestamp and pid, as capture.c's reserve() / submit() do (flags 0: the
# kernel wakes the consumer when it has caught up, through irq_work); consumed by this process.
# `ringbuf-nowake` submits with BPF_RB_NO_WAKEUP (this process consumes without being woken).
RINGBUF = """
struct rec { u64 ts, addr, value; u32 tgid, tid, repeats, size; u8 type, op, space, reg; u32 pad; };
BPF_RINGBUF_OUTPUT(events, 64);
static __always_inline int emit(u64 addr) {
    struct rec *e = events.ringbuf_reserve(sizeof(struct rec));
    if (!e)
        return 0;
    u64 pt = bpf_get_current_pid_tgid();
    e->ts = bpf_ktime_get_ns();
    e->tgid = pt >> 32;
    e->tid = (u32)pt;
    e->addr = addr;
    e->value = 0;
    e->repeats = 0;
    events.ringbuf_submit(e, SUBMIT_FLAGS);
    return 0;
}
""" + "\n".join(f"RAW_TRACEPOINT_PROBE({tp}) {{ return emit(ctx->args[2]); }}" for tp in TPS)
# the floor of the agent's first steps on kvm_mmio (raw tracepoints only): `readval` reads the
# value through the tracepoint's pointer as capture.c's read_sized() does; `lookup` also takes
# the pid and looks the (pid, space, address) key up in an empty hash of the watch map's shape
STEPS = """
struct key { u32 tgid; u32 space; u64 addr; };
BPF_HASH(watch, struct key, u64, 4096);
RAW_TRACEPOINT_PROBE(kvm_mmio)
{
    u64 v = 0;
    u32 len = ctx->args[1];
    const void *p = (const void *)ctx->args[3];
    if (ctx->args[0] != 0 && p) {
        if (len == 4) {
            u32 w = 0;
            bpf_probe_read_kernel(&w, sizeof(w), p);
            v = w;
        } else {
            bpf_probe_read_kernel(&v, sizeof(v), p);
        }
    }
#if LOOKUP
    struct key k = {};
    k.tgid = bpf_get_current_pid_tgid() >> 32;
    k.space = 0;
    k.addr = ctx->args[2];
    if (watch.lookup(&k))
        return 1;
#endif
    return v == 0x5a5a5a5a;
}
RAW_TRACEPOINT_PROBE(kvm_pio) { return 0; }
"""
READVAL = "#define LOOKUP 0\n" + STEPS
LOOKUP = "#define LOOKUP 1\n" + STEPS
RINGBUF_WAKE = "#define SUBMIT_FLAGS 0\n" + RINGBUF
RINGBUF_NOWAKE = "#define SUBMIT_FLAGS BPF_RB_NO_WAKEUP\n" + RINGBUF
# capture counters shown per case (deltas of the in-process `capture`)
SHOWN_COUNTERS = ("forwarded", "repeat", "unwatched", "rate_limited", "unsatisfied_read",
                  "activity_forwarded", "activity_folded", "config_forwarded", "ringbuf_full")


def spec_for(case: str, ops: int, transport: str):
    from lab.harness import GuestSpec
    from tests.bpf.capture_lab_support import StormSpec

    name = ("-name", f"bench-mmio-{case}")
    if case == "outside":
        return StormSpec(transport=transport, scenario="writestorm", writes=ops, storm_reg="ipi",
                         extra_args=name)
    if case == "watched-w":
        return GuestSpec(transport=transport, scenario="writestorm", writes=ops, extra_args=name)
    if case == "watched-r":
        return GuestSpec(transport=transport, scenario="readstorm", reads=ops, extra_args=name)
    return GuestSpec(transport=transport, scenario="recover", extra_args=name)


def _tp_of(name: str) -> Optional[str]:
    """The tracepoint of a program name (rtp_kvm_mmio, tracepoint__kvm__kvm_pio, ...)."""
    for tp in TPS:
        if name.endswith(tp) and not name.endswith("fast_" + tp):
            return tp
    return None


class Reference:
    """A BCC object of reference programs (one per tracepoint); (run_cnt, run_time_ns) by fd."""

    def __init__(self, text: str) -> None:
        from bcc import BPF

        self.bpf = BPF(text=text.encode())     # BCC attached them while loading
        self.fns = {}
        for name, fn in self.bpf.funcs.items():
            tp = _tp_of(name.decode())
            if tp:
                self.fns[tp] = fn
        try:
            self.bpf[b"events"].open_ring_buffer(lambda *_: None)
            self.ringbuf = True
        except KeyError:
            self.ringbuf = False

    def consume(self) -> None:
        if self.ringbuf:
            self.bpf.ring_buffer_consume()

    def counters(self) -> dict[str, tuple[int, int]]:
        from agent.capture.stats import prog_fdinfo

        out = {}
        for tp, fn in self.fns.items():
            ps = prog_fdinfo(fn.fd)
            out[tp] = (ps.run_cnt, ps.run_time_ns) if ps else (0, 0)
        return out

    def close(self) -> None:
        self.bpf.cleanup()


def _capture_counters(cap) -> dict[str, tuple[int, int]]:
    out = {}
    for name, ps in cap.stats().programs.items():
        tp = _tp_of(name)
        if tp:
            out[tp] = (ps.run_cnt, ps.run_time_ns)
    return out


def _agent_counters(agent) -> dict[str, tuple[int, int]]:
    from prometheus_client.parser import text_string_to_metric_families

    runs, ns = {}, {}
    for fam in text_string_to_metric_families(agent.metrics_text()):
        for s in fam.samples:
            tp = _tp_of(s.labels.get("prog", ""))
            if not tp:
                continue
            if s.name == "virtio_agent_bpf_run_count_total":
                runs[tp] = int(s.value)
            elif s.name == "virtio_agent_bpf_run_time_seconds_total":
                ns[tp] = int(round(s.value * 1e9))
    return {tp: (runs[tp], ns.get(tp, 0)) for tp in runs}


@dataclass
class Sample:
    ops: int                                      # guest operations (storm n; 0 for recover)
    progs: dict[tuple[str, str], tuple[int, float]]  # (name, tracepoint) -> (runs, ns/run)
    delivered: dict[str, int]                     # in-process capture -> events of this VM
    counters: dict[str, int]                      # `capture`'s counter deltas


class Bench:
    """Everything attached at once, in this order: the empty references, the subjects, a second
    empty raw reference (so each exit runs the first and the last program of the list empty)."""

    def __init__(self, subjects: list[str]) -> None:
        self.subjects = subjects
        self.refs: dict[str, Reference] = {}
        self.caps: dict = {}
        self.agent = None
        self.order: list[str] = []

    def __enter__(self) -> "Bench":
        try:
            self._start()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _start(self) -> None:
        from agent.capture import Capture
        from agent.capture.capture import raw_tracepoints_usable

        self.raw = raw_tracepoints_usable()
        if self.raw:
            self.refs["empty-raw"] = Reference(EMPTY_RAW)
        self.refs["empty-tp"] = Reference(EMPTY_TP)
        self.order += list(self.refs)
        for subj in self.subjects:
            if subj == "agent":
                from agent.demo import AgentProcess

                self.agent = AgentProcess()
                self.agent.start()
            elif subj == "capture":
                self.caps[subj] = Capture(hooks=NO_IOCTL)
                self.caps[subj].start()
            elif subj == "capture-tp":     # the same program on regular tracepoints
                self.caps[subj] = Capture(hooks=NO_IOCTL, raw_tracepoints=False)
                self.caps[subj].start()
            elif subj == "nodisc":
                self.caps[subj] = Capture(hooks=NO_IOCTL, discovery_rate=0, activity_rate=0)
                self.caps[subj].start()
            elif subj == "readval" and self.raw:
                self.refs[subj] = Reference(READVAL)
            elif subj == "lookup" and self.raw:
                self.refs[subj] = Reference(LOOKUP)
            elif subj == "ringbuf" and self.raw:
                self.refs[subj] = Reference(RINGBUF_WAKE)
            elif subj == "ringbuf-nowake" and self.raw:
                self.refs[subj] = Reference(RINGBUF_NOWAKE)
            else:
                continue
            self.order.append(subj)
        if self.raw:
            self.refs["empty-raw2"] = Reference(EMPTY_RAW)
            self.order.append("empty-raw2")

    def __exit__(self, *exc) -> None:
        for cap in self.caps.values():
            cap.close()
        if self.agent is not None:
            self.agent.close()
        for ref in self.refs.values():
            ref.close()

    def snapshot(self) -> dict[tuple[str, str], tuple[int, int]]:
        snap = {}
        for name, ref in self.refs.items():
            snap.update({(name, tp): v for tp, v in ref.counters().items()})
        for name, cap in self.caps.items():
            snap.update({(name, tp): v for tp, v in _capture_counters(cap).items()})
        if self.agent is not None:
            snap.update({("agent", tp): v for tp, v in _agent_counters(self.agent).items()})
        return snap

    def _poll(self, pid: int, delivered: dict, exited: set) -> None:
        from agent.events import ProcessExit

        for ref in self.refs.values():
            ref.consume()
        for name, cap in self.caps.items():
            for ev in cap.poll(10):
                if ev.pid == pid:
                    delivered[name] += 1
                    if isinstance(ev, ProcessExit):
                        exited.add(name)

    def run(self, spec, dev, timeout: float = 300.0) -> Sample:
        from lab.harness import LabVM
        from tests.bpf.capture_lab_support import watch_device

        self._poll(0, {}, set())     # drain what came before
        before = self.snapshot()
        counters0 = self.caps["capture"].counters() if "capture" in self.caps else {}
        vm = LabVM.start(spec)
        # QEMU needs tens of milliseconds before the guest runs: the watches are in by then
        for cap in self.caps.values():
            watch_device(cap, vm.pid, dev)
        delivered = {name: 0 for name in self.caps}
        exited: set = set()
        try:
            deadline = time.monotonic() + timeout
            while vm.proc.poll() is None and time.monotonic() < deadline:
                self._poll(vm.pid, delivered, exited)
            result = vm.wait(timeout=max(0.1, deadline - time.monotonic()))
        finally:
            vm.kill()
        end = time.monotonic() + 3.0
        while time.monotonic() < end and len(exited) < len(self.caps):
            self._poll(vm.pid, delivered, exited)
        after = self.snapshot()
        counters1 = self.caps["capture"].counters() if "capture" in self.caps else {}
        result.raise_for_error()
        progs = {}
        for key, (r1, t1) in after.items():
            r0, t0 = before.get(key, (0, 0))
            if r1 - r0 > 0:
                progs[key] = (r1 - r0, (t1 - t0) / (r1 - r0))
        ops = sum(s.n for s in result.storms) if result.storms else 0
        return Sample(ops, progs, delivered,
                      {c: counters1[c] - counters0.get(c, 0) for c in counters1})


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ops", type=int, default=100_000, help="writes / reads per storm")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--transport", default="modern", choices=("modern", "legacy", "mmio"))
    ap.add_argument("--cases", default=",".join(CASES), help=f"from {', '.join(CASES)}")
    ap.add_argument("--subjects", default=",".join(DEFAULT_SUBJECTS),
                    help=f"programs measured against the empty ones, from {', '.join(SUBJECTS)}")
    args = ap.parse_args(argv)
    cases = [c for c in args.cases.split(",") if c]
    subjects = [s for s in args.subjects.split(",") if s]
    for bad in set(cases) - set(CASES):
        ap.error(f"unknown case {bad}; known: {', '.join(CASES)}")
    for bad in set(subjects) - set(SUBJECTS):
        ap.error(f"unknown subject {bad}; known: {', '.join(SUBJECTS)}")
    if args.transport != "modern" and "outside" in cases:
        cases.remove("outside")     # the ipi storm needs the MSI-X config vector
        print("outside: modern transport only (self-IPIs on the MSI-X config vector)")
    if not cases:
        ap.error("no case left")

    from tests.bpf.capture_lab_support import learn_devices

    print(machine(), flush=True)
    print(f"mmio cost: {args.transport}, cases {cases}, {args.rounds} interleaved rounds, "
          f"{args.ops} ops per storm", flush=True)
    specs = {c: spec_for(c, args.ops, args.transport) for c in cases}
    (dev,) = learn_devices(specs[cases[0]])
    samples: dict[str, list[Sample]] = {c: [] for c in cases}
    with bpf_stats_enabled("1") as previous:
        print(f"kernel.bpf_stats_enabled was {previous}; set to 1 for the run", flush=True)
        with Bench(subjects) as bench:
            raw = bench.raw
            ref = "empty-raw" if raw else "empty-tp"
            print(f"attached, in this order (each exit runs them in it): {', '.join(bench.order)}"
                  f"; the agent's programs are {'raw ' if raw else ''}tracepoints", flush=True)
            for r in range(args.rounds):
                order = cases[r % len(cases):] + cases[:r % len(cases)]
                for case in order:
                    if BPF_STATS.read_text().strip() != "1":
                        print("  warning: kernel.bpf_stats_enabled was switched off by someone "
                              "else; switching it on again", flush=True)
                        BPF_STATS.write_text("1")
                    s = bench.run(specs[case], dev)
                    samples[case].append(s)
                    for tp in TPS:
                        runs = s.progs.get((ref, tp), (0, 0))[0]
                        if not runs:
                            continue
                        cells = " ".join(f"{n}={s.progs[(n, tp)][1]:.0f}" for n in bench.order
                                         if (n, tp) in s.progs)
                        base = s.progs[(ref, tp)][1]
                        agent = s.progs.get(("agent", tp))
                        print(f"  round {r} {case:9} {tp:8} runs={runs:7d} ns/run: {cells}"
                              + (f"  agent/{ref} x{agent[1] / base:.2f}" if agent else ""),
                              flush=True)
            order_names = list(bench.order)
    print(f"kernel.bpf_stats_enabled restored to {previous}")
    report(cases, order_names, samples, raw)
    return 0


def _fmt(values: list[float]) -> str:
    if not values:
        return "-"
    return f"x{median(values):.2f} ({min(values):.2f}..{max(values):.2f})"


def report(cases, names, samples, raw: bool) -> None:
    ref = "empty-raw" if raw else "empty-tp"
    subjects = [n for n in names if not n.startswith("empty")]
    width = max([8] + [len(n) for n in subjects])
    refs = [n for n in names if n.startswith("empty")]
    for tp in TPS:
        rows = [c for c in cases if any((ref, tp) in s.progs for s in samples[c])]
        if not rows:
            continue
        print(f"\n== {tp}: ns per run, median over rounds (min..max) ==")
        print("(runs/op: program runs per guest operation, all VMs of the host; recover: runs "
              "per guest run)")
        print(f"{'case':9} {'runs/op':>8}  " + " ".join(f"{n:>16}" for n in names))
        for case in rows:
            ss = samples[case]
            per_op = [s.progs[(ref, tp)][0] / s.ops for s in ss if s.ops and (ref, tp) in s.progs]
            total = [s.progs[(ref, tp)][0] for s in ss if (ref, tp) in s.progs]
            cells = []
            for n in names:
                v = [s.progs[(n, tp)][1] for s in ss if (n, tp) in s.progs]
                cells.append(f"{median(v):.0f} ({min(v):.0f}..{max(v):.0f})" if v else "-")
            rl = f"{median(per_op):8.2f}" if per_op else f"{median(total):8.0f}"
            print(f"{case:9} {rl}  " + " ".join(f"{c:>16}" for c in cells))
        print(f"\n{tp}: ratio to the empty programs of the same guest run, median (min..max)")
        print(f"{'case':9} {'subject':{width}} " + " ".join(f"{'/ ' + r:>22}" for r in refs))
        for case in rows:
            ss = samples[case]
            for subj in subjects:
                cells = []
                for r in refs:
                    v = [s.progs[(subj, tp)][1] / s.progs[(r, tp)][1] for s in ss
                         if (subj, tp) in s.progs and (r, tp) in s.progs and s.progs[(r, tp)][1]]
                    cells.append(_fmt(v))
                print(f"{case:9} {subj:{width}} " + " ".join(f"{c:>22}" for c in cells))
    print("\n== in-process `capture`: what its programs did per guest run (counter deltas, all "
          "families, median) ==")
    for case in cases:
        ss = samples[case]
        if not ss or not ss[0].counters:
            continue
        cells = " ".join(f"{c}={median([s.counters.get(c, 0) for s in ss]):.0f}"
                         for c in SHOWN_COUNTERS)
        ev = " ".join(f"{n}={median([s.delivered[n] for s in ss]):.0f}" for n in ss[0].delivered)
        print(f"{case:9} {cells}; events of the VM delivered: {ev}")


if __name__ == "__main__":
    sys.exit(main())
