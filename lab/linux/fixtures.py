"""Record the replay fixtures of tests/unit/test_replay_real_linux.py: one clean and one faulted
real-Linux run per device type, each as

    <device>-<clean|fault>.events.jsonl.gz   what capture would have forwarded (agent.events)
    <device>-<clean|fault>.guest.json        what the guest and QEMU said (the truth)

    sudo .venv/bin/python -m lab.linux.fixtures tests/unit/fixtures/linux [--device rng ...]

Six TCG boots (a few minutes on a quiet 2-core host).
"""
from __future__ import annotations

import argparse
import gzip
import json
import sys
from pathlib import Path

from agent import events as E
from lab.linux.run import run_linux
from lab.linux.vm import DEVICES


def save(run, out: Path, stem: str) -> None:
    with gzip.open(out / f"{stem}.events.jsonl.gz", "wt", encoding="utf-8", compresslevel=9) as f:
        for ev in run.events:
            f.write(E.to_json(ev) + "\n")
    s = run.summary()
    truth = {k: s[k] for k in ("device", "guest_devices", "qemu_virtio_errors", "fault",
                               "qemu_pci", "vmm_status", "guest_status_at_end", "guest_irqs",
                               "events")}
    (out / f"{stem}.guest.json").write_text(json.dumps(truth, indent=1, sort_keys=True) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lab.linux.fixtures", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path)
    p.add_argument("--device", choices=DEVICES, action="append")
    a = p.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    for device in a.device or DEVICES:
        for fault in (False, True):
            stem = f"{device}-{'fault' if fault else 'clean'}"
            run = run_linux(device, fault)
            save(run, a.out, stem)
            s = run.summary()
            print(f"{stem}: {len(run.events)} events, needs_reset "
                  f"{[r['evidence'] for r in s['agent_needs_reset']]}, "
                  f"qemu {s['qemu_virtio_errors']}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
