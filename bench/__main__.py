"""`make bench`: every benchmark in turn (root, KVM and BCC needed for the guest and agent ones).

    sudo .venv/bin/python -m bench [--quick]
"""
from __future__ import annotations

import argparse
import sys

from bench import agent_start, guest_overhead, userspace


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller runs (a smoke test, ~1 min)")
    args = ap.parse_args()
    quick = args.quick
    print("#### userspace: correlation replay and scrape", flush=True)
    userspace.main(["--vms", "40", "--repeat", "1", "--scrapes", "5"] if quick else [])
    print("\n#### agent start-up and memory", flush=True)
    agent_start.main(["--starts", "1", "--vms", "2"] if quick else [])
    print("\n#### guest overhead", flush=True)
    guest_overhead.main(["--ops", "20000", "--hold-ms", "300", "--rounds", "1"] if quick else [])
    return 0


if __name__ == "__main__":
    sys.exit(main())
