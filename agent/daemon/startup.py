"""`run`'s start: prerequisites, the capture (BPF compiled, loaded, attached), the correlator
and the Agent loop around them.

A core hook family that cannot be compiled, loaded or attached stops the start (StartupError):
the agent cannot see an episode without it, and a pod that stays up unready explains nothing.
The error carries doctor's diagnosis and fix, and what libbcc printed meanwhile.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any, Optional

from agent.daemon.loop import Agent
from agent.daemon.options import known_hooks
from agent.daemon.native_output import native_output_captured
from agent.export.episode_log import EpisodeLog

log = logging.getLogger("agent.run")

# libbcc repeats its complaint for every build it tries (all families, then each alone)
MAX_BCC_LINES = 20


class StartupError(RuntimeError):
    """The capture cannot run here. `fields` go into the JSON log line with the message."""

    def __init__(self, message: str, fields: dict[str, Any]) -> None:
        super().__init__(message)
        self.fields = fields


def privilege_problem() -> Optional[str]:
    """One line saying why `run` cannot work here, or None."""
    hint = "; run `virtio-recovery-agent doctor` for details"
    if os.geteuid() != 0:
        return "run needs root (it loads BPF programs and reads /proc of other processes)" + hint
    from agent.doctor import HOST_PID_FIX, host_pid_problem

    problem = host_pid_problem()
    if problem:
        return f"{problem}; fix: {HOST_PID_FIX}"
    from agent.capture.hooks import tracefs

    if tracefs() is None:
        return ("tracefs is not mounted (mount -t tracefs nodev /sys/kernel/tracing)" + hint)
    try:
        import bcc  # noqa: F401
    except Exception as exc:  # ImportError, or libbcc failing to load
        return f"BCC is not usable ({exc}); install python3-bpfcc" + hint
    return None


def enabled_hooks(spec: str) -> Optional[set[str]]:
    """The families to enable for --hooks (None: all)."""
    if spec == "all":
        return None
    if spec == "auto":
        from agent.capture.hooks import auto_families

        names, left_off = auto_families()
        for name in left_off:
            log.info("hook %s left off: no vDPA on this host (--hooks auto; restart the agent "
                     "after adding vDPA devices, or use --hooks all)", name)
        return names
    return set(spec.split(","))


def core_hooks(enabled: Optional[set[str]]) -> list[str]:
    return [name for name, fam in known_hooks().items()
            if fam.core and (enabled is None or name in enabled)]


def _unique_lines(lines: list[str]) -> list[str]:
    seen: dict[str, None] = {}
    for line in lines:
        seen.setdefault(line.strip()[:300], None)
    return list(seen)[:MAX_BCC_LINES]


def start_capture(hooks: Optional[set[str]]):
    """agent.capture.Capture started with these families; StartupError when a core one is
    not attached (or the capture fails as a whole)."""
    from agent.capture import Capture

    capture = Capture(hooks=hooks)
    error: Optional[Exception] = None
    with native_output_captured() as bcc_out:
        try:
            status = capture.start()
        except Exception as exc:   # CaptureError, or anything BCC raises
            error = exc
            status = {}
    bcc_lines = _unique_lines(bcc_out.lines())
    missing = {name: st.reason for name, st in status.items()
               if name in core_hooks(hooks) and not st.attached}
    if error is None and not missing:
        for name, st in sorted(status.items()):
            if st.attached:
                log.info("hook %s attached", name)
            else:
                log.warning("hook %s not attached: %s", name, st.reason)
        if bcc_lines:
            log.info("libbcc said while compiling", extra={"fields": {"libbcc_output": bcc_lines}})
        return capture
    try:
        capture.close()
    except Exception:
        log.debug("closing the failed capture failed", exc_info=True)
    from agent.doctor import load_failure_checks

    # the kernel's refusal (EPERM under seccomp) is in the exceptions, the compiler's in its output
    said = "\n".join([bcc_out.text, *missing.values(), str(error or "")])
    checks = load_failure_checks(said)
    if error is not None:
        what = f"the capture failed to start ({type(error).__name__}: {error})"
    else:
        what = "core hook families not attached: " + "; ".join(
            f"{name}: {reason}" for name, reason in sorted(missing.items()))
    diagnosis = "; ".join(f"{c.name}: {c.detail}" for c in checks)
    fix = "; ".join(c.fix for c in checks if c.fix)
    raise StartupError(
        f"cannot start capture: {diagnosis}; fix: {fix} ({what}; run `virtio-recovery-agent "
        "doctor` for every check)",
        {"diagnosis": [{"check": c.name, "detail": c.detail, "fix": c.fix} for c in checks],
         "hooks": {name: "attached" if st.attached else st.reason
                   for name, st in sorted(status.items())},
         "libbcc_output": bcc_lines,
         "libbcc_output_truncated": bcc_out.truncated})


def build_agent(args: argparse.Namespace, episode_stream=None) -> Agent:
    """Capture (attached), correlator and the Agent loop for these args (needs root + BPF).
    Raises StartupError."""
    from agent.correlate import Correlator, CorrelatorConfig
    from agent.vmm.vmident import identify_vm

    hooks = enabled_hooks(args.hooks)
    correlator = Correlator(CorrelatorConfig(stuck_after_ns=int(args.stuck_after * 1e9),
                                             max_vms=args.max_vms,
                                             max_devices=args.max_devices,
                                             retain_exited_ns=int(
                                                 getattr(args, "retain_exited", 120.0) * 1e9)))
    capture = start_capture(hooks)
    confirmer = None
    if getattr(args, "vmm_probe", "on") == "on":
        from agent.vmm.confirm import VmmConfirmer

        confirmer = VmmConfirmer()
    pci_typer = None
    if getattr(args, "vmm_pci_types", "off") == "on":
        from agent.vmm.confirm import PciTyper

        pci_typer = PciTyper()
    agent = Agent(capture, correlator, identify_vm, confirmer=confirmer, pci_typer=pci_typer,
                  net_outage=_net_outage_tracker(),
                  episode_log=EpisodeLog(episode_stream or sys.stdout),
                  stuck_after_s=args.stuck_after, max_vms=args.max_vms,
                  core_hooks=core_hooks(hooks), state_file=_state_file(args))
    agent.restore()
    return agent


def _state_file(args: argparse.Namespace):
    """agent.state_file.StateFile for --state-file, or None (off, or in use: logged)."""
    path = getattr(args, "state_file", "")
    if not path:
        log.info("no state file: a restarted agent starts afresh")
        return None
    from agent.state_file import StateFile

    sf = StateFile(path)
    problem = sf.acquire()
    if problem:
        log.warning("running without a state file (a restart loses open episodes): %s", problem)
        return None
    return sf


def _net_outage_tracker():
    """agent.net.outage.NetOutageTracker, or None (logged) when pyroute2 is missing."""
    try:
        import pyroute2  # noqa: F401
    except ImportError as exc:
        log.warning("virtio-net outage impact disabled: %s", exc)
        return None
    from agent.net.outage import NetOutageTracker

    return NetOutageTracker()
