"""Capture decoded kernel events to a JSON-lines file (the input of `replay`).

Runs the BPF capture until --duration elapses, Ctrl-C or SIGTERM, writing one agent.events JSON object
per line. The first event of each VMM is preceded by its VmStarted (name, namespace, uuid from
/proc; never the command line), so replayed episodes carry VM names. --watch-status SPACE:ADDR marks a status register as watched (for every --pid, and
for every VMM seen if no --pid is given) so it is forwarded on every change instead of going
through the rate-limited discovery path. --pid keeps only those VMMs' events.
"""
from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
from typing import Optional, Sequence

from agent.events import Register, Space, to_json
from agent.model import WatchInterrupt, WatchRegister
from agent.vmm.vmident import identify_vm

MAX_PIDS = 4096  # bound on VMMs remembered for applying watches


def parse_space_addr(text: str) -> tuple[str, int]:
    try:
        space, addr = text.split(":", 1)
        value = int(addr, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected SPACE:ADDR like mmio:0xfebf0014 or pio:0xc012, got {text!r}") from None
    if space not in (Space.MMIO, Space.PIO):
        raise argparse.ArgumentTypeError(f"space must be mmio or pio, got {space!r}")
    if value < 0:
        raise argparse.ArgumentTypeError(f"address must be >= 0, got {addr!r}")
    return space, value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-o", "--output", required=True, help="JSON-lines file to write ('-' = stdout)")
    parser.add_argument("--duration", type=float, default=None,
                        help="seconds to record (default: until Ctrl-C)")
    parser.add_argument("--pid", type=int, action="append", default=[],
                        help="only this VMM process (repeatable)")
    parser.add_argument("--watch-status", type=parse_space_addr, action="append", default=[],
                        metavar="SPACE:ADDR", help="watch this status register (repeatable)")
    parser.add_argument("--watch-vector", type=int, action="append", default=[],
                        help="forward MSI/APIC deliveries of this vector (repeatable)")
    parser.add_argument("--watch-gsi", type=int, action="append", default=[],
                        help="forward level changes of this GSI (repeatable)")
    parser.add_argument("--hooks", default=None,
                        help="comma-separated hook families (default: all)")
    parser.add_argument("--ringbuf-pages", type=int, default=64)


class Recorder:
    def __init__(self, cap, pids: list[int], watch_status: list[tuple[str, int]],
                 vectors: list[int], gsis: list[int]) -> None:
        self.cap = cap
        self.pids = set(pids)
        self.watch_status = watch_status
        self.vectors = vectors
        self.gsis = gsis
        self.seen: set[int] = set()
        self.identified: set[int] = set()
        self.skipped_other_pid = 0

    def apply_watches(self, pid: int) -> None:
        if pid in self.seen or len(self.seen) >= MAX_PIDS:
            return
        self.seen.add(pid)
        for space, addr in self.watch_status:
            self.cap.watch_register(WatchRegister(pid=pid, space=space, addr=addr,
                                                  register=Register.STATUS))
        for v in self.vectors:
            self.cap.watch_interrupt(WatchInterrupt(pid=pid, vector=v))
        for g in self.gsis:
            self.cap.watch_interrupt(WatchInterrupt(pid=pid, gsi=g))

    def write(self, out, ev) -> int:
        """Write `ev`, preceded by its VMM's VmStarted the first time; returns lines written."""
        lines = 0
        if ev.pid not in self.identified and len(self.identified) < MAX_PIDS:
            self.identified.add(ev.pid)
            vm = identify_vm(ev.pid, ts_ns=ev.ts_ns)
            if vm is not None:
                out.write(to_json(vm) + "\n")
                lines += 1
        out.write(to_json(ev) + "\n")
        return lines + 1

    def run(self, out, duration: Optional[float], stop: Sequence[int] = ()) -> int:
        """Until `duration` elapses or `stop` (signals received) is not empty."""
        for pid in self.pids:
            self.apply_watches(pid)
        written = 0
        deadline = None if duration is None else time.monotonic() + duration
        try:
            while not stop and (deadline is None or time.monotonic() < deadline):
                for ev in self.cap.poll(100):
                    if self.pids and ev.pid not in self.pids:
                        self.skipped_other_pid += 1
                        continue
                    if not self.pids:
                        self.apply_watches(ev.pid)
                    written += self.write(out, ev)
                out.flush()
        except KeyboardInterrupt:
            pass
        for ev in self.cap.poll(0):  # drain
            if not self.pids or ev.pid in self.pids:
                written += self.write(out, ev)
        out.flush()
        return written


def main(args: argparse.Namespace) -> int:
    from agent.capture import Capture, CaptureError

    # SIGINT and SIGTERM set a flag, from the start (a signal during the compile must not kill
    # the recorder before its summary): a KeyboardInterrupt raised while BCC runs the
    # ring-buffer callback is swallowed by ctypes ("Exception ignored on calling ctypes callback
    # function"), and a background command of a shell without job control starts with SIGINT
    # ignored. Handlers can only be set from the main thread: run in another one, the recorder
    # stops at --duration.
    stop: list[int] = []
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda signum, _frame: stop.append(signum))
    hooks = None if args.hooks is None else {h for h in args.hooks.split(",") if h}
    try:
        cap = Capture(hooks=hooks, ringbuf_pages=args.ringbuf_pages)
    except ValueError as exc:
        print(f"record: {exc}", file=sys.stderr)
        return 2
    try:
        statuses = cap.start()
    except CaptureError as exc:
        print(f"record: {exc} (run `virtio-recovery-agent doctor`)", file=sys.stderr)
        return 1
    try:
        for st in sorted(statuses.values(), key=lambda s: s.name):
            print(f"hook {st.name}: {'attached' if st.attached else 'NOT attached'} ({st.reason})",
                  file=sys.stderr)
        if cap.bpf is None:
            print("record: no hook could be loaded (run `virtio-recovery-agent doctor`)",
                  file=sys.stderr)
            return 1
        rec = Recorder(cap, args.pid, args.watch_status, args.watch_vector, args.watch_gsi)
        out = sys.stdout if args.output == "-" else open(args.output, "w")
        try:
            written = rec.run(out, args.duration, stop)
        finally:
            if out is not sys.stdout:
                out.close()
        s = cap.stats()
        print(f"record: {written} events written to {args.output}; kernel forwarded "
              f"{s.forwarded}, filtered {s.filtered}, lost {s.lost}, other pids skipped "
              f"{rec.skipped_other_pid}", file=sys.stderr)
        return 0
    finally:
        cap.close()
