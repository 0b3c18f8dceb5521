"""Agent start-up time and memory: `virtio-recovery-agent run` from exec to /healthz 200, the BPF
compile + attach alone (agent.capture.Capture.start in this process), and the agent's RSS when
ready and after lab VMs went through NEEDS_RESET episodes. Prints figures; asserts nothing.

    sudo .venv/bin/python -m bench.agent_start [--starts 3]
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Optional

from bench.common import machine, median


def rss_kib(pid: int) -> dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[key] = int(rest.split()[0])
    return out


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--starts", type=int, default=3)
    ap.add_argument("--vms", type=int, default=5, help="recovering lab VMs after the last start")
    args = ap.parse_args(argv)
    from agent.capture import Capture
    from agent.demo import AgentProcess
    from lab.harness import GuestSpec, run

    print(machine(), flush=True)
    compile_s = []
    for _ in range(args.starts):
        t = time.perf_counter()
        cap = Capture()
        status = cap.start()
        compile_s.append(time.perf_counter() - t)
        cap.close()
    attached = sorted(n for n, s in status.items() if s.attached)
    print(f"\nCapture.start() (compile + attach of {len(attached)} families {attached}): "
          f"median {median(compile_s):.2f}s, runs {[round(x, 2) for x in compile_s]}")

    ready_s, rss_ready = [], []
    agent = None
    for i in range(args.starts):
        t = time.perf_counter()
        agent = AgentProcess().start()
        ready_s.append(time.perf_counter() - t)
        rss_ready.append(rss_kib(agent.proc.pid))
        if i < args.starts - 1:
            agent.close()
    print(f"`run` exec -> /healthz 200: median {median(ready_s):.2f}s, "
          f"runs {[round(x, 2) for x in ready_s]}")
    r = rss_ready[-1]
    print(f"RSS when ready: {r['VmRSS'] / 1024:.0f} MiB (anon {r['RssAnon'] / 1024:.0f} MiB, "
          f"file {r['RssFile'] / 1024:.0f} MiB: libbcc/LLVM mapped), peak {r['VmHWM'] / 1024:.0f} MiB")
    assert agent is not None
    try:
        t = time.perf_counter()
        for i in range(args.vms):
            run(GuestSpec(transport=("modern", "mmio")[i % 2], scenario="recover", repeat=5,
                          devices=2, extra_args=("-name", f"bench-start-{i}")), timeout=60)
        time.sleep(0.5)
        after = rss_kib(agent.proc.pid)
        n = len([rec for rec in agent.records() if rec["outcome"] == "recovered"])
        print(f"after {args.vms} lab VMs ({n} recovered episodes logged, "
              f"{time.perf_counter() - t:.1f}s): RSS {after['VmRSS'] / 1024:.0f} MiB "
              f"(anon {after['RssAnon'] / 1024:.0f} MiB), peak {after['VmHWM'] / 1024:.0f} MiB")
    finally:
        agent.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
