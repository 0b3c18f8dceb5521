"""Command line: `virtio-recovery-agent <command>`.

Each command lives in its own module exposing `add_arguments(parser)` and `main(args) -> int`.
"""
from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "run": ("agent.run", "capture, correlate and serve Prometheus metrics (the DaemonSet's command)"),
    "doctor": ("agent.doctor", "check every prerequisite and say how to fix what is missing"),
    "record": ("agent.record", "capture decoded events to a JSON-lines file"),
    "replay": ("agent.replay", "run recorded events through correlation and print the episodes"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="virtio-recovery-agent",
        description="eBPF host agent for KVM hosts: detects virtio DEVICE_NEEDS_RESET episodes "
        "and measures how long each guest takes to reset and re-initialise the device.",
    )
    from agent import __version__

    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=help_text, description=(module.__doc__ or help_text).strip(),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args._module.main(args) or 0)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
