"""What the capture costs a guest that exits a lot, measured by the guest's own TSC.

Storms (lab guest, one modern virtio-pci device):
  readstorm   N status reads back to back (a watched register; the kernel folds the repeats)
  writestorm  N status writes of the current value (watched; folded)
  kicks       the `linux` scenario with kick_ms=0: per iteration a config_generation read and a
              device-config read (unwatched: discovery candidates, folded by the candidate LRU)
              and a queue kick (fast MMIO, ioeventfd); for hold_ms
Modes, interleaved round by round (the order rotates each round) so drift of the nested host
cancels out in the per-round ratios:
  none        nothing attached
  raw         agent.capture.Capture with raw tracepoints, the device's status watched
  regular     the same with regular tracepoints (raw_tracepoints=False)
  agent       `virtio-recovery-agent run` (subprocess; discovers and watches the device itself)
  raw-noioctl like raw, without the `ioctl` family (not in the default set; `--modes` adds it)

Per-program BPF cost (ns/run) comes from kernel.bpf_stats_enabled (turned on for the run, its
previous value restored; `--bpf-stats off` turns it off instead, to measure the slowdown without
the stats' own cost). Prints figures; asserts nothing.

    sudo .venv/bin/python -m bench.guest_overhead [--ops 200000] [--rounds 3] [--bpf-stats off]
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from typing import Optional

from bench.common import bpf_stats_enabled, machine, median, spread

MODES = ("none", "raw", "regular", "agent", "raw-noioctl")
DEFAULT_MODES = ("none", "raw", "regular", "agent")
# every family but `ioctl`: its syscall tracepoints put every task on the slow syscall path,
# including each KVM_RUN of every vCPU
NO_IOCTL = ("mmio", "pio", "apic", "exit", "fast_mmio", "msi", "gsi")
KINDS = ("readstorm", "writestorm", "kicks")


@dataclass
class Sample:
    ns_per_op: float
    progs: dict[str, tuple[int, float]] = field(default_factory=dict)  # prog -> (runs, ns/run)
    events: Optional[int] = None                                        # to userspace
    ops: int = 0


def spec_for(kind: str, ops: int, hold_ms: int, transport: str):
    from lab.harness import GuestSpec

    name = ("-name", f"bench-{kind}")
    if kind == "readstorm":
        return GuestSpec(transport=transport, scenario="readstorm", reads=ops, extra_args=name)
    if kind == "writestorm":
        return GuestSpec(transport=transport, scenario="writestorm", writes=ops, extra_args=name)
    return GuestSpec(transport=transport, scenario="linux", kick_ms=0, hold_ms=hold_ms,
                     extra_args=name)


def ns_per_op(result) -> tuple[float, int]:
    if result.storms:
        (storm,) = result.storms
        return storm.duration_ns / storm.n, storm.n
    kicks = result.linux_kicks or 0
    return (result.spec.hold_ms * 1e6 / kicks if kicks else float("nan")), kicks


def _prog_delta(before, after) -> dict[str, tuple[int, float]]:
    out = {}
    for name, ps in after.items():
        b = before.get(name)
        runs = ps.run_cnt - (b.run_cnt if b else 0)
        ns = ps.run_time_ns - (b.run_time_ns if b else 0)
        if runs > 0:
            out[name] = (runs, ns / runs)
    return out


def run_none(spec) -> Sample:
    from lab.harness import run

    per, n = ns_per_op(run(spec, timeout=300))
    return Sample(per, ops=n)


def run_capture(spec, dev, raw: bool, hooks=None) -> Sample:
    from agent.capture import Capture
    from tests.bpf.capture_lab_support import run_captured

    with Capture(hooks=hooks, raw_tracepoints=raw) as cap:
        before = dict(cap.stats().programs)
        r = run_captured(cap, spec, watch=[dev], timeout=300)
        after = cap.stats().programs
    per, n = ns_per_op(r.result)
    return Sample(per, _prog_delta(before, after), len(r.events), n)


def _bpf_counters(agent) -> dict[str, tuple[int, int]]:
    from prometheus_client.parser import text_string_to_metric_families

    runs, times = {}, {}
    for fam in text_string_to_metric_families(agent.metrics_text()):
        for s in fam.samples:
            if s.name == "virtio_agent_bpf_run_count_total":
                runs[s.labels["prog"]] = int(s.value)
            elif s.name == "virtio_agent_bpf_run_time_seconds_total":
                times[s.labels["prog"]] = int(round(s.value * 1e9))
    return {p: (runs[p], times.get(p, 0)) for p in runs}


def run_agent(spec) -> Sample:
    from agent.demo import AgentProcess
    from lab.harness import run

    with AgentProcess() as agent:
        before = _bpf_counters(agent)
        result = run(spec, timeout=300)
        after = _bpf_counters(agent)
    progs = {}
    for p, (runs, ns) in after.items():
        r0, t0 = before.get(p, (0, 0))
        if runs - r0 > 0:
            progs[p] = (runs - r0, (ns - t0) / (runs - r0))
    per, n = ns_per_op(result)
    return Sample(per, progs, None, n)


def measure(kind: str, spec, dev, mode: str) -> Sample:
    if mode == "none":
        return run_none(spec)
    if mode == "agent":
        return run_agent(spec)
    if mode == "raw-noioctl":
        return run_capture(spec, dev, raw=True, hooks=set(NO_IOCTL))
    return run_capture(spec, dev, raw=(mode == "raw"))


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ops", type=int, default=200_000, help="status reads/writes per storm")
    ap.add_argument("--hold-ms", type=int, default=2000, help="duration of the kicks storm")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--transport", default="modern", choices=("modern", "legacy", "mmio"))
    ap.add_argument("--kinds", default=",".join(KINDS))
    ap.add_argument("--modes", default=",".join(DEFAULT_MODES),
                    help=f"comma-separated, from {', '.join(MODES)}")
    ap.add_argument("--bpf-stats", default="on", choices=("on", "off"),
                    help="kernel.bpf_stats_enabled during the run: on gives the per-program "
                         "cost (and costs two clock reads per program run); off measures the "
                         "slowdown as in production")
    args = ap.parse_args(argv)
    kinds = [k for k in args.kinds.split(",") if k]
    modes = [m for m in args.modes.split(",") if m]
    for bad in set(kinds) - set(KINDS):
        ap.error(f"unknown kind {bad}; known: {', '.join(KINDS)}")
    for bad in set(modes) - set(MODES):
        ap.error(f"unknown mode {bad}; known: {', '.join(MODES)}")
    if "none" not in modes:
        ap.error("modes must include none (the baseline of each ratio)")

    from tests.bpf.capture_lab_support import learn_devices

    print(machine(), flush=True)
    print(f"guest overhead: {args.transport}, storms {kinds}, modes {modes}, "
          f"{args.rounds} interleaved rounds; ops per storm {args.ops}, kicks for "
          f"{args.hold_ms} ms", flush=True)
    samples: dict[tuple[str, str], list[Sample]] = {}
    stats = "1" if args.bpf_stats == "on" else "0"
    with bpf_stats_enabled(stats) as previous:
        print(f"kernel.bpf_stats_enabled was {previous}; set to {stats} for the run", flush=True)
        for kind in kinds:
            spec = spec_for(kind, args.ops, args.hold_ms, args.transport)
            (dev,) = learn_devices(spec)
            for r in range(args.rounds):
                order = modes[r % len(modes):] + modes[:r % len(modes)]
                for mode in order:
                    s = measure(kind, spec, dev, mode)
                    samples.setdefault((kind, mode), []).append(s)
                    print(f"  round {r} {kind:10} {mode:7} {s.ns_per_op:9.0f} ns/op", flush=True)
    print(f"kernel.bpf_stats_enabled restored to {previous}")
    report(kinds, modes, samples, args.rounds)
    return 0


def report(kinds, modes, samples, rounds: int) -> None:
    print("\n== guest slowdown (guest TSC; ratio to `none` of the same round, median and range) ==")
    print(f"{'storm':10} {'mode':8} {'ns/op':>9} {'ratio':>7} {'slowdown':>9}  range")
    for kind in kinds:
        base = samples[(kind, "none")]
        for mode in modes:
            ss = samples[(kind, mode)]
            ratios = [s.ns_per_op / b.ns_per_op for s, b in zip(ss, base)]
            med = median(ratios)
            print(f"{kind:10} {mode:8} {median([s.ns_per_op for s in ss]):9.0f} {med:7.3f} "
                  f"{(med - 1) * 100:8.2f}%  {spread(ratios)}")
    for kind in kinds:
        base = [s.ns_per_op for s in samples[(kind, "none")]]
        swing = (max(base) - min(base)) / min(base) * 100
        print(f"{kind}: `none` baseline moved by {swing:.1f}% between rounds "
              f"({min(base):.0f}..{max(base):.0f} ns/op)"
              + ("  <- host noise larger than the effect measured: rerun on a quiet host"
                 if swing > 10 else ""))
    print("\n== BPF cost per program run (kernel.bpf_stats_enabled; median over rounds) ==")
    print(f"{'storm':10} {'mode':8} {'program':40} {'runs/op':>8} {'ns/run':>8}  range")
    for kind in kinds:
        for mode in modes:
            if mode == "none":
                continue
            ss = samples[(kind, mode)]
            progs = sorted({p for s in ss for p in s.progs})
            for p in progs:
                per = [s.progs[p][1] for s in ss if p in s.progs]
                runs = [s.progs[p][0] / s.ops for s in ss if p in s.progs and s.ops]
                if median(runs) < 0.01:
                    continue  # not on this storm's path
                print(f"{kind:10} {mode:8} {p:40} {median(runs):8.2f} {median(per):8.0f}  "
                      f"{min(per):.0f}..{max(per):.0f}")
    for kind in kinds:
        raw = [s.progs.get("rtp_kvm_mmio") for s in samples.get((kind, "raw"), [])]
        reg = [next((v for p, v in s.progs.items() if p.endswith("kvm_mmio")
                     and not p.startswith("rtp_")), None)
               for s in samples.get((kind, "regular"), [])]
        pairs = [(a[1], b[1]) for a, b in zip(raw, reg) if a and b]
        if pairs:
            print(f"{kind}: kvm_mmio program regular/raw tracepoint cost ratio "
                  f"x{median([b / a for a, b in pairs]):.2f}")
    events = {(k, m): [s.events for s in samples[(k, m)] if s.events is not None]
              for k in kinds for m in modes}
    for (k, m), ev in events.items():
        if ev:
            print(f"{k} {m}: events delivered to userspace per storm: {median(ev):.0f}")


if __name__ == "__main__":
    sys.exit(main())
