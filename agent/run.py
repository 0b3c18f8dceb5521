"""Capture virtio status-register traffic and interrupt injections of every KVM guest on this
host, follow each device's status state machine, and serve Prometheus metrics on /metrics
(readiness on /healthz). Finished, stuck and abandoned DEVICE_NEEDS_RESET episodes are also
written to stdout, one JSON line each.

Every option can also be set by the environment variable shown in its help; a flag wins over
its variable. Needs root, tracefs and BCC: `virtio-recovery-agent doctor` checks them all.
SIGTERM or SIGINT detaches every hook and exits 0.
"""
from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

from agent.export.episode_log import EpisodeLog
from agent.events import ProcessExit, Register, VmStarted
from agent.export.metrics import AgentCollector, EpisodeHistograms, SelfStats
from agent.model import (
    EpisodeEnded, EpisodeStuck, NeedsResetSuspected, Snapshot, Violation, VmIdentity,
    WatchDeviceBars, WatchEcam, WatchInterrupt, WatchRegister,
)

log = logging.getLogger("agent.run")

DEFAULTS = {
    "listen": ":9477",
    "stuck_after": "60",
    "log_format": "json",
    "hooks": "auto",
    "max_vms": "256",
    "max_devices": "4096",
    "tls_cert": "",
    "tls_key": "",
    "log_level": "info",
    "vmm_probe": "on",
    "vmm_pci_types": "off",
    "retain_exited": "120",
    "state_file": "/run/virtio-recovery-agent/state.json",
}
ENV = {name: "VRA_" + name.upper() for name in DEFAULTS}
POLL_MS = 100
TICK_EVERY_NS = 100_000_000
STALL_S = 10.0          # /healthz fails if the loop has not come round for this long
SEEN_PIDS_FACTOR = 4    # remembered VMM pids: max_vms * this (older ones are re-identified)
SAVE_EVERY_NS = 1_000_000_000   # state file: changes saved at most this often (episode ends at once)
RESTORED_CHECK_NS = 1_000_000_000   # restored VMs not heard from: /proc liveness checked this often


def _env_default(name: str) -> str:
    return os.environ.get(ENV[name], DEFAULTS[name])


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not v > 0 or v != v or v == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive number of seconds")
    return v


def _non_negative_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not v >= 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} must be a number of seconds >= 0")
    return v


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive integer")
    return v


def _listen(text: str) -> str:
    from agent.export.server import ListenAddressError, parse_listen

    try:
        parse_listen(text)
    except ListenAddressError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _choice(*choices: str) -> Callable[[str], str]:
    def check(text: str) -> str:
        if text not in choices:
            raise argparse.ArgumentTypeError(f"{text!r} is not one of {', '.join(choices)}")
        return text
    return check


def known_hooks() -> dict[str, Any]:
    from agent.capture.hooks import FAMILIES

    return FAMILIES


def _hooks(text: str) -> str:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise argparse.ArgumentTypeError("empty hook list (use `auto` or `all`)")
    if names in (["all"], ["auto"]):
        return names[0]
    unknown = sorted(set(names) - set(known_hooks()))
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown hook famil{'y' if len(unknown) == 1 else 'ies'} {', '.join(unknown)}; "
            f"known: auto, all, {', '.join(known_hooks())}")
    if not {"mmio", "pio"} & set(names):
        raise argparse.ArgumentTypeError(
            "the list needs mmio or pio (or both): status registers are seen through them")
    return ",".join(names)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    def opt(flag: str, name: str, type_, help_: str, metavar: Optional[str] = None) -> None:
        parser.add_argument(flag, dest=name, type=type_, default=_env_default(name),
                            metavar=metavar,
                            help=f"{help_} (env {ENV[name]}; default {DEFAULTS[name] or 'none'})")

    opt("--listen", "listen", _listen, "metrics address, [HOST]:PORT", "ADDR")
    opt("--stuck-after", "stuck_after", _positive_float,
        "an open NEEDS_RESET episode this many seconds old is stuck", "SECONDS")
    opt("--log-format", "log_format", _choice("json", "text"), "diagnostic log format on stderr",
        "json|text")
    opt("--log-level", "log_level", _choice("debug", "info", "warning", "error"),
        "diagnostic log level", "LEVEL")
    opt("--hooks", "hooks", _hooks,
        "comma-separated hook families to enable, `all`, or `auto` (all but the syscall "
        "`ioctl` hooks, which are attached only where vDPA exists: they cost every ioctl on "
        "the host; decided at start)", "LIST")
    opt("--max-vms", "max_vms", _positive_int, "VMs tracked at most", "N")
    opt("--max-devices", "max_devices", _positive_int, "devices tracked at most (all VMs)", "N")
    opt("--tls-cert", "tls_cert", str, "serve /metrics over HTTPS with this PEM certificate",
        "FILE")
    opt("--tls-key", "tls_key", str, "PEM private key for --tls-cert", "FILE")
    opt("--retain-exited", "retain_exited", _non_negative_float,
        "an exited VM's devices stay on /metrics this many seconds", "SECONDS")
    opt("--state-file", "state_file", str,
        "where the agent saves what it tracks (devices, open episodes) so that a restarted "
        "agent goes on where it stopped; '' = don't", "PATH")
    opt("--vmm-probe", "vmm_probe", _choice("on", "off"),
        "ask QEMU over QMP (x-query-virtio-status) about a suspected NEEDS_RESET", "on|off")
    opt("--vmm-pci-types", "vmm_pci_types", _choice("on", "off"),
        "device types from QEMU's query-pci for new PCI devices (QMP traffic for every VM "
        "with a socket)", "on|off")


# --- logging -------------------------------------------------------------------------------------

class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        d = {"ts": round(record.created, 3), "level": record.levelname.lower(),
             "logger": record.name, "msg": record.getMessage()}
        if record.exc_info:
            d["exc"] = self.formatException(record.exc_info)
        return json.dumps(d, separators=(",", ":"))


def setup_logging(fmt: str, level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


# --- prerequisites -------------------------------------------------------------------------------

def privilege_problem() -> Optional[str]:
    """One line saying why `run` cannot work here, or None."""
    hint = "; run `virtio-recovery-agent doctor` for details"
    if os.geteuid() != 0:
        return "run needs root (it loads BPF programs and reads /proc of other processes)" + hint
    from agent.capture.hooks import tracefs

    if tracefs() is None:
        return ("tracefs is not mounted (mount -t tracefs nodev /sys/kernel/tracing)" + hint)
    try:
        import bcc  # noqa: F401
    except Exception as exc:  # ImportError, or libbcc failing to load
        return f"BCC is not usable ({exc}); install python3-bpfcc" + hint
    return None


# --- the loop ------------------------------------------------------------------------------------

@dataclass
class LoopCounters:
    events: collections.Counter = field(default_factory=collections.Counter)
    correlation_errors: int = 0
    output_errors: int = 0
    poll_errors: int = 0
    state_saves: collections.Counter = field(default_factory=collections.Counter)  # ok / error
    loops: int = 0
    last_loop_monotonic: float = field(default_factory=time.monotonic)


class Agent:
    """capture -> correlation -> (metrics, episode log, watch maps). Thread-safe snapshot().

    `capture` needs poll(timeout_ms), watch_register(o), watch_interrupt(o), watch_ecam(o),
    watch_device_bars(o), hook_status,
    stats() and close(); `identify(pid)` returns a VmStarted for a VMM pid (or None when the
    process is already gone).
    """

    def __init__(self, capture, correlator, identify: Callable[[int], Optional[VmStarted]],
                 episode_log: Optional[EpisodeLog] = None, stuck_after_s: float = 60.0,
                 max_vms: int = 256, core_hooks: Iterable[str] = (),
                 confirmer=None, net_outage=None, pci_typer=None, state_file=None) -> None:
        # confirmer: agent.vmm.confirm.VmmConfirmer (asks QEMU about suspected NEEDS_RESET) or None;
        # pci_typer: agent.vmm.confirm.PciTyper (device types from query-pci, opt-in) or None
        self.confirmer = confirmer
        self.pci_typer = pci_typer
        # state_file: agent.state_file.StateFile (acquired) or None
        self.state_file = state_file
        self._saved_changes = -1
        self.restored: dict[str, int] = {"vms": 0, "devices": 0, "episodes": 0}
        # net_outage: agent.net.outage.NetOutageTracker (virtio-net backends' drops) or None;
        # it runs on its own thread (NetOutageWorker), which also writes ended episodes' lines
        self.net_outage = net_outage
        self.net_worker = None
        self.capture = capture
        self.correlator = correlator
        self.identify = identify
        self.episode_log = episode_log
        self.histograms = EpisodeHistograms()
        self.counters = LoopCounters()
        self.core_hooks = tuple(core_hooks)
        self.stuck_after_s = stuck_after_s
        self._lock = threading.Lock()
        self._seen: collections.OrderedDict[int, None] = collections.OrderedDict()
        self._max_seen = max(1, max_vms) * SEEN_PIDS_FACTOR
        self._last_tick_ns = 0
        self._to_log: list = []          # EpisodeEnded / EpisodeStuck for the episode log
        self._last_save_ns = 0
        self._restored: dict[int, VmIdentity] = {}   # restored VMs not heard from since
        self._last_restored_check_ns = 0
        self.collector = AgentCollector(
            self.snapshot, self.histograms, self.self_stats, stuck_after_s=stuck_after_s,
            ifname_fn=(lambda vm, device: net_outage.ifname(vm.key, device))
            if net_outage is not None else None,
            extra_families_fn=net_outage.families if net_outage is not None else None)
        if net_outage is not None:
            from agent.net.outage import NetOutageWorker

            self.net_worker = NetOutageWorker(net_outage, self._write_line)

    # called from the HTTP thread
    def snapshot(self) -> Optional[Snapshot]:
        with self._lock:
            return self.correlator.snapshot(time.monotonic_ns())

    def self_stats(self) -> SelfStats:
        with self._lock:
            events = dict(self.counters.events)
            correlation_errors = self.counters.correlation_errors + self.counters.output_errors
            poll_errors = self.counters.poll_errors
            s = self_stats_from_capture(self.capture)
        s.events = events
        s.lost["correlation_error"] = s.lost.get("correlation_error", 0) + correlation_errors
        s.lost["poll_error"] = s.lost.get("poll_error", 0) + poll_errors
        if self.confirmer is not None:
            s.vmm_queries = dict(self.confirmer.queries)
            s.vmm_skipped = dict(self.confirmer.skipped)
        if self.pci_typer is not None:
            s.vmm_queries.update(self.pci_typer.queries)
        with self._lock:
            s.state_saves = dict(self.counters.state_saves)
        s.state_restored = dict(self.restored)
        return s

    def health(self) -> tuple[bool, str]:
        status = getattr(self.capture, "hook_status", None) or {}
        missing = [h for h in self.core_hooks if not getattr(status.get(h), "attached", False)]
        if missing:
            reasons = "; ".join(f"{h}: {getattr(status.get(h), 'reason', '') or 'not attached'}"
                                for h in missing)
            return False, f"core hooks not attached: {reasons}"
        stalled = time.monotonic() - self.counters.last_loop_monotonic
        if stalled > STALL_S:
            return False, f"event loop stalled for {stalled:.0f}s"
        return True, "ok"

    # the loop thread
    def step(self, timeout_ms: int = POLL_MS) -> int:
        events = self.capture.poll(timeout_ms)
        with self._lock:
            for ev in events:
                self._handle(ev)
            now = time.monotonic_ns()
            if now - self._last_tick_ns >= TICK_EVERY_NS:
                self._last_tick_ns = now
                try:
                    outputs = self.correlator.tick(now)
                except Exception:
                    self.counters.correlation_errors += 1
                    log.exception("correlation tick failed")
                    outputs = []
                self._apply(outputs)
            if self.confirmer is not None:
                self._confirmations()
            if self.pci_typer is not None:
                self._pci_types()
            if self._restored:
                self._check_restored(now)
            snap = None
            if self.net_worker is not None and self._last_tick_ns == now:
                try:
                    snap = self.correlator.snapshot(now)
                except Exception:
                    self.counters.output_errors += 1
                    log.exception("the snapshot for the network worker failed")
            state = self._state_to_save(now)
            self.counters.loops += 1
            self.counters.last_loop_monotonic = time.monotonic()
        if state is not None:
            self._save(state)
        self._log_episodes()
        if snap is not None:
            # after this step's ended episodes: the snapshot no longer shows them open, and
            # their meters must end, not be dropped as vanished
            self.net_worker.tick(snap)
        return len(events)

    def _log_episodes(self) -> None:
        """Episode-log lines, after the state that has these episodes ended or stuck is saved
        (a killed agent's successor does not report them again). Ended ones go through the
        network worker, which adds their network impact."""
        with self._lock:
            lines, self._to_log = self._to_log, []
        for out in lines:
            if isinstance(out, EpisodeEnded) and self.net_worker is not None:
                self.net_worker.ended(out)
            else:
                self._write_line(out, None)

    def _write_line(self, out, net) -> None:
        if self.episode_log is not None:
            self.episode_log.write(out, net=net)

    def close(self) -> None:
        """After save_state: finish the network jobs (writing their lines)."""
        if self.net_worker is not None:
            self.net_worker.close()

    # -- the state file (restarts) -------------------------------------------------------------

    def restore(self) -> None:
        """Go on from the state file, if any (before the first step)."""
        from agent.correlate.checkpoint import StateError, restore

        if self.state_file is None:
            return
        state = self.state_file.load()
        if state is None:
            return
        with self._lock:
            try:
                outputs = restore(self.correlator, state, self.state_file.alive,
                                  time.monotonic_ns())
            except Exception as exc:
                # whatever is in the file, the agent starts (afresh: no half-restored state)
                (log.warning if isinstance(exc, StateError) else log.exception)(
                    "ignoring state file %s: %s", self.state_file.path, exc)
                self.correlator = type(self.correlator)(self.correlator.config)
                return
            self._apply(outputs)
            # BPF reports the exit of a VMM it has forwarded events of: until a restored VM's
            # next event, its liveness is checked from /proc (_check_restored)
            self._restored = {i.pid: i for i in self.correlator.identities()}
            snap = self.correlator.snapshot(time.monotonic_ns())
            self.restored = {"vms": snap.vms, "devices": len(snap.devices),
                             "episodes": sum(d.open_episode is not None for d in snap.devices)}
            # episodes of VMs gone meanwhile: saved as ended before their lines are written
            state = self._state_to_save(time.monotonic_ns()) if self._to_log else None
        if state is not None:
            self._save(state)
        self._log_episodes()
        gone = sum(isinstance(o, EpisodeEnded) for o in outputs)
        log.info("restored from %s: %d VMs, %d devices, %d open episodes; %d episodes of VMs "
                 "that exited meanwhile ended abandoned", self.state_file.path,
                 self.restored["vms"], self.restored["devices"], self.restored["episodes"], gone)

    def _state_to_save(self, now: int) -> Optional[dict]:
        """The correlator's state when it changed: at once when episode-log lines wait (they
        go out only once it is saved), else at most every SAVE_EVERY_NS."""
        if self.state_file is None or self.correlator.changes == self._saved_changes:
            return None
        if not self._to_log and now - self._last_save_ns < SAVE_EVERY_NS:
            return None
        from agent.correlate.checkpoint import dump

        self._saved_changes = self.correlator.changes
        self._last_save_ns = now
        return dump(self.correlator)

    def _check_restored(self, now: int) -> None:
        """Restored VMs that exited before sending an event: BPF does not know them yet, so
        their exit is found in /proc (once a second, until their first event)."""
        if not self._restored or now - self._last_restored_check_ns < RESTORED_CHECK_NS:
            return
        self._last_restored_check_ns = now
        for pid, identity in list(self._restored.items()):
            if not self.state_file.alive(identity):
                del self._restored[pid]
                self._handle(ProcessExit(ts_ns=now, pid=pid))

    def _save(self, state: dict) -> None:
        try:
            self.state_file.save(state)
        except OSError as exc:
            with self._lock:
                self.counters.state_saves["error"] += 1
                first = self.counters.state_saves["error"] == 1
                self._saved_changes = -1        # try again at the next save time
            (log.error if first else log.debug)("saving the state file %s failed: %s",
                                                self.state_file.path, exc)
            return
        with self._lock:
            self.counters.state_saves["ok"] += 1

    def save_state(self) -> None:
        """At shutdown: correlate what is buffered, log what ended and save the state, so the
        next agent goes on from here (a rolling update loses nothing but the events of the
        gap)."""
        with self._lock:
            try:
                self._apply(self.correlator.flush())
            except Exception:
                self.counters.correlation_errors += 1
                log.exception("correlating the last events failed")
            state = None
            if self.state_file is not None:
                from agent.correlate.checkpoint import dump

                state = dump(self.correlator)
        if state is not None:
            self._save(state)
        self._log_episodes()

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            self.step()

    def _feed(self, ev) -> None:
        try:
            outputs = self.correlator.feed(ev)
        except Exception:
            self.counters.correlation_errors += 1
            log.exception("correlation failed for event %s of pid %s", ev.kind, ev.pid)
            return
        self.counters.events[ev.kind] += 1
        self._apply(outputs)

    def _handle(self, ev) -> None:
        pid = ev.pid
        if self._restored:
            self._restored.pop(pid, None)
        if not isinstance(ev, VmStarted):
            if pid in self._seen:
                self._seen.move_to_end(pid)
            else:
                vm = None
                try:
                    vm = self.identify(pid)
                except Exception:
                    log.exception("identifying VMM pid %s failed", pid)
                self._remember(pid)
                if vm is not None:
                    self._feed(vm)
        else:
            self._remember(pid)
        self._feed(ev)
        if isinstance(ev, ProcessExit):
            for side in (self.confirmer, self.pci_typer):
                if side is not None:
                    side.forget_pid(pid)
            self._seen.pop(pid, None)

    def _confirmations(self) -> None:
        """Apply the VMM's answers about suspected devices (agent.vmm.confirm)."""
        for v in self.confirmer.poll():
            try:
                outputs = self.correlator.vmm_status(v.pid, v.device, v.ts_ns, v.needs_reset,
                                                     v.type)
            except Exception:
                self.counters.correlation_errors += 1
                log.exception("applying the VMM verdict for %s failed", v.device)
                continue
            self._apply(outputs)

    def _pci_types(self) -> None:
        for h in self.pci_typer.poll():
            try:
                self.correlator.annotate_device(h.pid, h.space, h.addr, h.type, h.bdf)
            except Exception:
                self.counters.correlation_errors += 1
                log.exception("applying the PCI type of %s failed", h)

    def _remember(self, pid: int) -> None:
        self._seen[pid] = None
        self._seen.move_to_end(pid)
        while len(self._seen) > self._max_seen:
            self._seen.popitem(last=False)

    def _apply(self, outputs) -> None:
        for out in outputs:
            try:
                if isinstance(out, WatchRegister):
                    self.capture.watch_register(out)
                    if (self.pci_typer is not None and out.add
                            and out.register == Register.STATUS):
                        self.pci_typer.submit(out.pid, out.space, out.addr)
                elif isinstance(out, WatchInterrupt):
                    self.capture.watch_interrupt(out)
                elif isinstance(out, WatchDeviceBars):
                    self.capture.watch_device_bars(out)
                elif isinstance(out, WatchEcam):
                    self.capture.watch_ecam(out)
                elif isinstance(out, (EpisodeEnded, EpisodeStuck)):
                    self.histograms.observe(out)
                    self._to_log.append(out)    # after the state is saved, unlocked
                elif isinstance(out, NeedsResetSuspected):
                    log.warning("NEEDS_RESET suspected for VM %s device %s (kernel evidence: "
                                "config interrupt, then kicks without completion)",
                                out.vm.name, out.device)
                    if self.confirmer is not None:
                        self.confirmer.submit(out)
                elif isinstance(out, Violation):
                    log.warning("spec violation %s by VM %s device %s: %s", out.rule,
                                out.vm.name, out.device, out.detail)
            except Exception:
                self.counters.output_errors += 1
                log.exception("applying correlation output %r failed", out)


def self_stats_from_capture(capture) -> SelfStats:
    """agent.capture's CaptureStats (and hook_status) -> the collector's SelfStats."""
    status = getattr(capture, "hook_status", None) or {}
    s = SelfStats(hooks={name: bool(st.attached) for name, st in status.items()})
    try:
        cs = capture.stats()
    except Exception:
        log.exception("reading capture stats failed")
        return s
    s.filtered = dict(cs.filtered)
    s.lost = dict(cs.lost)
    s.map_entries = {name: fill.entries for name, fill in cs.maps.items()}
    s.map_capacity = {name: fill.capacity for name, fill in cs.maps.items()}
    if cs.bpf_stats_enabled:
        s.prog_run_time_ns = {name: p.run_time_ns for name, p in cs.programs.items()}
        s.prog_run_count = {name: p.run_cnt for name, p in cs.programs.items()}
    return s


# --- main ----------------------------------------------------------------------------------------

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


def build_agent(args: argparse.Namespace, episode_stream=None) -> Agent:
    """Capture (attached), correlator and the Agent loop for these args (needs root + BPF)."""
    from agent.capture import Capture
    from agent.correlate import Correlator, CorrelatorConfig
    from agent.vmm.vmident import identify_vm

    hooks = enabled_hooks(args.hooks)
    correlator = Correlator(CorrelatorConfig(stuck_after_ns=int(args.stuck_after * 1e9),
                                             max_vms=args.max_vms,
                                             max_devices=args.max_devices,
                                             retain_exited_ns=int(
                                                 getattr(args, "retain_exited", 120.0) * 1e9)))
    capture = Capture(hooks=hooks)
    try:
        status = capture.start()
    except Exception:
        capture.close()
        raise
    for name, st in sorted(status.items()):
        if st.attached:
            log.info("hook %s attached", name)
        else:
            log.warning("hook %s not attached: %s", name, st.reason)
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


class _DeferredHealth:
    """/healthz before the agent exists (BPF compiling): not ready."""

    def __init__(self) -> None:
        self.agent: Optional[Agent] = None

    def __call__(self) -> tuple[bool, str]:
        if self.agent is None:
            return False, "starting: compiling and attaching BPF programs"
        return self.agent.health()


class _DeferredCollector:
    def __init__(self) -> None:
        self.agent: Optional[Agent] = None

    def describe(self):
        return []

    def collect(self):
        return self.agent.collector.collect() if self.agent is not None else []


def main(args: argparse.Namespace) -> int:
    from prometheus_client import CollectorRegistry

    from agent.export.server import MetricsServer

    setup_logging(args.log_format, args.log_level)
    if bool(args.tls_cert) != bool(args.tls_key):
        print("run: --tls-cert and --tls-key go together (one is missing)", file=sys.stderr)
        return 2
    for path in (args.tls_cert, args.tls_key):
        if path and not os.access(path, os.R_OK):
            print(f"run: cannot read TLS file {path}", file=sys.stderr)
            return 2
    problem = privilege_problem()
    if problem:
        print(f"run: {problem}", file=sys.stderr)
        return 1

    stop = threading.Event()

    def on_signal(signum, _frame) -> None:
        log.info("received %s, shutting down", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    health, deferred = _DeferredHealth(), _DeferredCollector()
    registry = CollectorRegistry()
    registry.register(deferred)
    try:
        server = MetricsServer(registry, args.listen, health_fn=health,
                               tls_cert=args.tls_cert or None, tls_key=args.tls_key or None)
    except (OSError, ValueError) as exc:
        print(f"run: cannot serve metrics on {args.listen}: {exc}", file=sys.stderr)
        return 1
    server.start()
    log.info("serving metrics on %s/metrics", server.url)
    agent: Optional[Agent] = None
    try:
        try:
            agent = build_agent(args)
        except Exception as exc:
            log.debug("capture start failed", exc_info=True)
            print(f"run: cannot start capture: {exc}; run `virtio-recovery-agent doctor`",
                  file=sys.stderr)
            return 1
        health.agent = deferred.agent = agent
        ok, message = agent.health()
        (log.info if ok else log.error)("ready: %s" % message if ok else "not ready: %s" % message)
        while not stop.is_set():
            try:
                agent.step()
            except Exception:
                # poll itself failing (not one event): count, back off, keep serving
                agent.counters.poll_errors += 1
                log.exception("event loop iteration failed")
                stop.wait(1.0)
        return 0
    finally:
        if agent is not None:
            try:
                agent.save_state()
            except Exception:
                log.exception("saving the state at shutdown failed")
            agent.close()
            try:
                agent.capture.close()
            except Exception:
                log.exception("detaching hooks failed")
            if agent.state_file is not None:
                agent.state_file.close()
        server.close()
        log.info("stopped")

