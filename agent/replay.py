"""Run a recorded event file (JSON lines, as written by `record`) through correlation and print
the NEEDS_RESET episodes it contains: a table by default, or JSON with --json.

Every episode is listed: recovered, abandoned (the VM exited) and still open at the end of the
file (stuck if older than --stuck-after at the last event). Phases: notify (start -> guest saw
0x40), react (-> reset written), reset (-> read back 0), reinit (-> DRIVER_OK). Violations of
the virtio status rules and device counters follow. A malformed line stops the replay with its
line number (exit status 2) unless --keep-going, which skips and counts such lines.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections import Counter
from typing import Any, Iterator, TextIO

from agent import events as E
from agent.correlate import Correlator, CorrelatorConfig, DeviceHint
from agent.model import PHASES, Episode, EpisodeEnded, EpisodeStuck, Outcome, Violation

S = 1_000_000_000
_DEFAULTS = CorrelatorConfig()


class ReplayInputError(ValueError):
    pass


def _seconds(text: str) -> int:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError("must be >= 0")
    return int(value * S)


def _hint(text: str) -> DeviceHint:
    """SPACE:ADDR[:TRANSPORT[:TYPE[:VM]]], e.g. mmio:0xfebf1014:pci-modern:net"""
    parts = text.split(":")
    if len(parts) < 2:
        raise argparse.ArgumentTypeError("a hint is SPACE:ADDR[:TRANSPORT[:TYPE[:VM]]]")
    try:
        addr = int(parts[1], 0)
        return DeviceHint(space=parts[0], addr=addr,
                          transport=parts[2] if len(parts) > 2 else "",
                          type=parts[3] if len(parts) > 3 and parts[3] else "unknown",
                          vm=parts[4] if len(parts) > 4 else "")
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"bad hint {text!r}: {exc}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", metavar="FILE", help="recorded events (JSON lines); - for stdin")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--stuck-after", type=_seconds, default=60 * S, metavar="SECONDS",
                        help="an open episode this old is stuck (default 60)")
    parser.add_argument("--notify-window", type=_seconds, default=_DEFAULTS.notify_window_ns,
                        metavar="SECONDS", help="config interrupt <-> 0x40 read window (default 0.2)")
    parser.add_argument("--reorder-window", type=_seconds,
                        default=_DEFAULTS.reorder_window_ns, metavar="SECONDS",
                        help="events are reordered by timestamp within this window (default 0.05)")
    parser.add_argument("--max-vms", type=int, default=_DEFAULTS.max_vms)
    parser.add_argument("--max-devices", type=int, default=_DEFAULTS.max_devices)
    parser.add_argument("--hint", type=_hint, action="append", default=[],
                        metavar="SPACE:ADDR[:TRANSPORT[:TYPE[:VM]]]",
                        help="a known status register (repeatable)")
    parser.add_argument("--keep-going", action="store_true",
                        help="skip malformed lines (counted) instead of stopping")


_TYPES = {"int": int, "str": str}


def parse_line(line: str) -> E.Event:
    """One event; raises E.EventFormatError with the reason."""
    ev = E.from_json(line)
    for f in dataclasses.fields(ev):
        want = _TYPES.get(str(f.type))
        value = getattr(ev, f.name)
        if want is int and (not isinstance(value, int) or isinstance(value, bool)):
            raise E.EventFormatError(f"{ev.kind}: field {f.name} must be an integer, not {value!r}")
        if want is str and not isinstance(value, str):
            raise E.EventFormatError(f"{ev.kind}: field {f.name} must be a string, not {value!r}")
    if ev.ts_ns < 0:
        raise E.EventFormatError(f"{ev.kind}: negative ts_ns")
    return ev


def read_events(stream: TextIO, name: str, keep_going: bool, bad: list[str]) -> Iterator[E.Event]:
    for lineno, line in enumerate(stream, 1):
        if not line.strip():
            continue
        try:
            yield parse_line(line)
        except E.EventFormatError as exc:
            msg = f"{name}:{lineno}: {exc}"
            if not keep_going:
                raise ReplayInputError(msg) from None
            bad.append(msg)


def replay(stream: TextIO, name: str, config: CorrelatorConfig, keep_going: bool = False):
    """Correlate a whole recording. Returns (episodes, violations, snapshot, stats, skipped
    lines); the snapshot has every device seen, with its counters at the end, exited VMs too."""
    c = Correlator(config)
    # a second correlator that never sees exits: its snapshot has every device's final counters
    # (in `c`, the devices of a VM that exited are gone)
    survivors = Correlator(config)
    outputs: list = []
    bad: list[str] = []
    last = 0
    n = 0
    for ev in read_events(stream, name, keep_going, bad):
        n += 1
        last = max(last, ev.ts_ns)
        outputs.extend(c.feed(ev))
        if not isinstance(ev, E.ProcessExit):
            survivors.feed(ev)
    outputs.extend(c.flush())
    survivors.flush()
    # nothing more will come: let pending notify windows close; stuck is judged at the last event
    outputs.extend(c.tick(last + config.notify_window_ns + config.reorder_window_ns + 1))
    episodes: list[Episode] = [o.episode for o in outputs if isinstance(o, EpisodeEnded)]
    for view in c.snapshot(last).devices:
        if view.open_episode is not None:
            ep = view.open_episode
            ep.stuck = last - ep.start_ns >= config.stuck_after_ns
            episodes.append(ep)
    episodes.sort(key=lambda e: (e.start_ns, e.vm.name, e.device))
    violations = [o for o in outputs if isinstance(o, Violation)]
    stats = c.stats()
    stats["events"] = n
    stats["malformed_lines"] = len(bad)
    stats["stuck_reported"] = sum(isinstance(o, EpisodeStuck) for o in outputs)
    return episodes, violations, survivors.snapshot(last), stats, bad


def episode_json(ep: Episode) -> dict[str, Any]:
    return {
        "vm": ep.vm.name, "namespace": ep.vm.namespace, "pid": ep.vm.pid,
        "device": ep.device, "type": ep.type, "transport": ep.transport,
        "evidence": ep.evidence, "outcome": ep.outcome, "stuck": ep.stuck,
        "start_ns": ep.start_ns, "guest_saw_ns": ep.guest_saw_ns,
        "reset_written_ns": ep.reset_written_ns, "reset_done_ns": ep.reset_done_ns,
        "driver_ok_ns": ep.driver_ok_ns, "end_ns": ep.end_ns,
        "recovery_seconds": ep.recovery_seconds, "phase_seconds": ep.phase_seconds(),
        "reinit_values": ep.reinit_values,
    }


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.3f}"


def print_table(out: TextIO, episodes, violations, snap, stats) -> None:
    head = ["VM", "DEVICE", "TYPE", "TRANSPORT", "EVIDENCE", "OUTCOME", "START_S"] + \
        [f"{p.upper()}_MS" for p in PHASES] + ["RECOVERY_MS"]
    rows = [head]
    for ep in episodes:
        phases = ep.phase_seconds()
        outcome = ep.outcome + (" (stuck)" if ep.stuck else "")
        rows.append([ep.vm.name, ep.device, ep.type, ep.transport, ep.evidence, outcome,
                     f"{ep.start_ns / S:.6f}"] + [_ms(phases.get(p)) for p in PHASES] +
                    [_ms(ep.recovery_seconds)])
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    out.write(f"{len(episodes)} NEEDS_RESET episode(s)\n")
    for r in rows:
        out.write("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() + "\n")
    out.write(f"\n{len(violations)} violation(s)\n")
    for v in violations:
        out.write(f"  {v.ts_ns / S:.6f}  {v.vm.name}  {v.device}  {v.rule}  {v.detail}\n")
    out.write(f"\n{len(snap.devices)} device(s), counters at the end of the recording\n")
    for d in snap.devices:
        out.write(f"  {d.vm.name}  {d.device}  {d.type}  {d.transport}  status=0x{d.status:02x}"
                  f"  needs_reset={d.needs_reset_total} recoveries={d.recoveries_total}"
                  f" resets={d.resets_total} failed={d.failed_total}"
                  f" config_interrupts={d.config_interrupts_total}\n")
    out.write("\nstats: " + " ".join(f"{k}={v}" for k, v in sorted(stats.items())) + "\n")


def main(args: argparse.Namespace) -> int:
    try:
        config = CorrelatorConfig(stuck_after_ns=max(1, args.stuck_after),
                                  notify_window_ns=max(1, args.notify_window),
                                  reorder_window_ns=args.reorder_window,
                                  max_vms=args.max_vms, max_devices=args.max_devices,
                                  hints=tuple(args.hint))
    except ValueError as exc:
        print(f"replay: {exc}", file=sys.stderr)
        return 2
    try:
        if args.file == "-":
            result = replay(sys.stdin, "<stdin>", config, args.keep_going)
        else:
            with open(args.file, encoding="utf-8", errors="strict") as f:
                result = replay(f, args.file, config, args.keep_going)
    except OSError as exc:
        print(f"replay: cannot read {args.file}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    except UnicodeDecodeError as exc:
        print(f"replay: {args.file}: not UTF-8 text: {exc}", file=sys.stderr)
        return 2
    except ReplayInputError as exc:
        print(f"replay: {exc}", file=sys.stderr)
        return 2
    episodes, violations, snap, stats, bad = result
    for msg in bad:
        print(f"replay: skipped {msg}", file=sys.stderr)
    if args.json:
        json.dump({
            "episodes": [episode_json(e) for e in episodes],
            "violations": [{"ts_ns": v.ts_ns, "vm": v.vm.name, "namespace": v.vm.namespace,
                            "device": v.device, "rule": v.rule, "detail": v.detail}
                           for v in violations],
            "devices": [{"vm": d.vm.name, "namespace": d.vm.namespace, "device": d.device,
                         "type": d.type, "transport": d.transport, "status": d.status,
                         "needs_reset_total": d.needs_reset_total,
                         "recoveries_total": d.recoveries_total, "resets_total": d.resets_total,
                         "failed_total": d.failed_total,
                         "config_interrupts_total": d.config_interrupts_total}
                        for d in snap.devices],
            "episodes_ended": dict(Counter(e.outcome for e in episodes
                                           if e.outcome != Outcome.OPEN)),
            "stats": stats,
        }, sys.stdout, indent=2, sort_keys=True)
        sys.stdout.write("\n")
    else:
        print_table(sys.stdout, episodes, violations, snap, stats)
    return 0


__all__ = ["add_arguments", "main", "replay", "parse_line", "episode_json"]
