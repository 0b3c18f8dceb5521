"""`make bench`: every benchmark in turn (root, KVM and BCC needed for the guest and agent ones).

    sudo .venv/bin/python -m bench [--quick] [NAME ...]     # NAME: userspace, agent_start,
                                                            # guest_overhead, mmio_cost
"""
from __future__ import annotations

import argparse
import sys

from bench import agent_start, guest_overhead, mmio_cost, userspace

# name -> (title, module, arguments of the --quick run)
BENCHMARKS = {
    "userspace": ("userspace: correlation replay and scrape", userspace,
                  ["--vms", "40", "--repeat", "1", "--scrapes", "5"]),
    "agent_start": ("agent start-up and memory", agent_start, ["--starts", "1", "--vms", "2"]),
    "guest_overhead": ("guest overhead", guest_overhead,
                       ["--ops", "20000", "--hold-ms", "300", "--rounds", "1"]),
    "mmio_cost": ("kvm_mmio program cost against an empty program", mmio_cost,
                  ["--ops", "20000", "--rounds", "1"]),
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller runs (a smoke test, ~1 min)")
    ap.add_argument("names", nargs="*", metavar="NAME",
                    help=f"only these benchmarks (default: all): {', '.join(BENCHMARKS)}")
    args = ap.parse_args()
    names = args.names or list(BENCHMARKS)
    for bad in [n for n in names if n not in BENCHMARKS]:
        ap.error(f"unknown benchmark {bad}; known: {', '.join(BENCHMARKS)}")
    for i, name in enumerate(names):
        title, module, quick = BENCHMARKS[name]
        print(f"{'' if i == 0 else chr(10)}#### {title}", flush=True)
        module.main(quick if args.quick else [])
    return 0


if __name__ == "__main__":
    sys.exit(main())
