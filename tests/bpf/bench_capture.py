"""Benchmark: BPF cost of the capture per program run, and what it does to a guest's exit rate.

Needs root, KVM and the lab. Turns kernel.bpf_stats_enabled on for the run (restored after).
Prints figures; asserts nothing.

    sudo .venv/bin/python tests/bpf/bench_capture.py [--reads 200000]
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(Path(__file__).resolve().parent)]

from agent.capture import Capture  # noqa: E402
from capture_lab_support import learn_devices, run_captured  # noqa: E402
from lab.harness import GuestSpec, run  # noqa: E402

SYSCTL = Path("/proc/sys/kernel/bpf_stats_enabled")


def storm_ns_per_read(spec: GuestSpec, result) -> float:
    (storm,) = result.storms
    return storm.duration_ns / storm.n


def measure(raw: bool, spec: GuestSpec, dev) -> tuple[dict, float, int]:
    with Capture(raw_tracepoints=raw) as cap:
        before = {k: v for k, v in cap.stats().programs.items()}
        r = run_captured(cap, spec, watch=[dev], timeout=120)
        after = cap.stats().programs
        events = len(r.events)
    per_prog = {}
    for name, ps in after.items():
        b = before.get(name)
        runs = ps.run_cnt - (b.run_cnt if b else 0)
        ns = ps.run_time_ns - (b.run_time_ns if b else 0)
        if runs:
            per_prog[name] = (runs, ns / runs)
    return per_prog, storm_ns_per_read(spec, r.result), events


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--reads", type=int, default=200_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--transport", default="modern", choices=("modern", "legacy", "mmio"))
    args = ap.parse_args()
    spec = GuestSpec(transport=args.transport, scenario="readstorm", reads=args.reads)
    (dev,) = learn_devices(spec)
    old = SYSCTL.read_text().strip()
    SYSCTL.write_text("1")
    try:
        bases, results = [], {}
        for _ in range(args.rounds):  # interleaved: the nested host is noisy
            bases.append(storm_ns_per_read(spec, run(spec, timeout=120)))
            for mode in ("raw", "regular"):
                results.setdefault(mode, []).append(measure(mode == "raw", spec, dev))
        base = statistics.median(bases)
        results = {mode: (rs[-1][0], statistics.median(r[1] for r in rs), rs[-1][2])
                   for mode, rs in results.items()}
    finally:
        SYSCTL.write_text(old)
    print(f"{args.transport} readstorm, {args.reads} status reads by the guest, "
          f"median of {args.rounds} rounds (program figures: last round)")
    print(f"  no capture: {base:8.0f} ns per guest status read (exit round trip)")
    for mode, (progs, per_read, events) in results.items():
        print(f"  {mode:7} tracepoints: {per_read:8.0f} ns per read "
              f"(x{per_read / base:.3f} of no capture), {events} events to userspace")
        for name, (runs, ns) in sorted(progs.items(), key=lambda kv: -kv[1][0]):
            print(f"      {name:42} {runs:9d} runs  {ns:7.0f} ns/run")
    raw_mmio = [v for k, v in results["raw"][0].items() if "kvm_mmio" in k or "kvm_pio" in k]
    reg_mmio = [v for k, v in results["regular"][0].items() if "kvm_mmio" in k or "kvm_pio" in k]
    if raw_mmio and reg_mmio:
        print(f"  access program cost regular/raw: x{reg_mmio[0][1] / raw_mmio[0][1]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
