"""The run loop: capture -> correlation -> (metrics, episode log, watch maps).

`Agent.step()` polls the capture's ring buffer once, identifies the VMM of each new pid, feeds
the events to the correlator, applies its outputs (watch requests to the BPF maps, ended and
stuck episodes to the histograms and the episode log), ticks the correlator every 100 ms and
saves the state file when it changed (agent.daemon.restarts).
"""
from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

from agent.daemon.restarts import StateKeeping
from agent.events import ProcessExit, Register, VmStarted
from agent.export.episode_log import EpisodeLog
from agent.export.metrics import AgentCollector, EpisodeHistograms, SelfStats
from agent.model import (
    EpisodeEnded, EpisodeStuck, NeedsResetSuspected, Snapshot, Violation, VmIdentity,
    WatchDeviceBars, WatchEcam, WatchInterrupt, WatchRegister,
)
from agent.vmm.vmident import process_gone

log = logging.getLogger("agent.run")

POLL_MS = 100
TICK_EVERY_NS = 100_000_000
STALL_S = 10.0          # /healthz fails if the loop has not come round for this long
SEEN_PIDS_FACTOR = 4    # remembered VMM pids: max_vms * this (older ones are re-identified)
# a failing poll (the capture itself, not one event) is retried after a back-off doubling from
# the first to the last; meanwhile the agent is not ready
POLL_RETRY_FIRST_S = 0.1
POLL_RETRY_MAX_S = 5.0
# a VMM's exit is a ring-buffer record, lost when the ring buffer is full: after a loss the
# known VMs' liveness is checked in /proc, at this interval, twice (the record is written inside
# the exit, before /proc shows the process as a zombie)
EXIT_SWEEP_NS = 1_000_000_000
EXIT_SWEEPS_AFTER_LOSS = 2


@dataclass
class LoopCounters:
    events: collections.Counter = field(default_factory=collections.Counter)
    correlation_errors: int = 0
    output_errors: int = 0
    poll_errors: int = 0
    failing_polls: int = 0          # consecutive: > 0 while the capture fails
    last_poll_error: str = ""
    state_saves: collections.Counter = field(default_factory=collections.Counter)  # ok / error
    loops: int = 0
    last_loop_monotonic: float = field(default_factory=time.monotonic)


class Agent(StateKeeping):
    """capture -> correlation -> (metrics, episode log, watch maps). Thread-safe snapshot().

    `capture` needs poll(timeout_ms), watch_register(o), watch_interrupt(o), watch_ecam(o),
    watch_device_bars(o), hook_status,
    stats(), counters() (the kernel's, `ringbuf_full` among them) and close(); `identify(pid)`
    returns a VmStarted for a VMM pid (or None when the process is already gone).
    """

    def __init__(self, capture, correlator, identify: Callable[[int], Optional[VmStarted]],
                 episode_log: Optional[EpisodeLog] = None, stuck_after_s: float = 60.0,
                 max_vms: int = 256, core_hooks: Iterable[str] = (),
                 confirmer=None, net_outage=None, pci_typer=None, state_file=None,
                 proc_root: str = "/proc") -> None:
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
        self.proc_root = proc_root
        self._last_sweep_ns: Optional[int] = None
        self._ringbuf_full = 0
        self._sweeps_left = 0
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
        if self.counters.failing_polls:
            return False, (f"capture failing: {self.counters.failing_polls} polls in a row "
                           f"failed, last: {self.counters.last_poll_error}")
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
            self._sweep_lost_exits(now)
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

    def run(self, stop: threading.Event) -> None:
        """step() until `stop` is set. A failing step (the poll itself, not one event: those
        are counted inside) is counted, logged once per streak with its traceback, and retried
        after a back-off; the agent is not ready until a step succeeds again."""
        while not stop.is_set():
            try:
                self.step()
            except Exception as exc:
                stop.wait(self._poll_failed(exc))
                continue
            if self.counters.failing_polls:
                log.info("capture works again after %d failed polls", self.counters.failing_polls)
                self.counters.failing_polls = 0

    def _poll_failed(self, exc: Exception) -> float:
        """Count a failed step; the seconds to wait before the next."""
        c = self.counters
        c.poll_errors += 1
        c.failing_polls += 1
        c.last_poll_error = f"{type(exc).__name__}: {exc}"[:300]
        c.last_loop_monotonic = time.monotonic()   # the loop runs: failing, not stalled
        if c.failing_polls == 1:
            log.exception("event loop iteration failed; retrying with back-off")
        elif c.failing_polls & (c.failing_polls - 1) == 0:
            log.error("event loop still failing (%d in a row): %s", c.failing_polls,
                      c.last_poll_error)
        return min(POLL_RETRY_MAX_S, POLL_RETRY_FIRST_S * 2 ** min(c.failing_polls - 1, 16))

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

    def _sweep_lost_exits(self, now: int) -> None:
        """VMs whose exit record the full ring buffer may have dropped: exited in /proc, they
        get the ProcessExit BPF could not deliver (else they would stay, watched, for ever)."""
        if self._last_sweep_ns is not None and now - self._last_sweep_ns < EXIT_SWEEP_NS:
            return
        self._last_sweep_ns = now
        lost = self.capture.counters().get("ringbuf_full", 0)
        if lost != self._ringbuf_full:
            self._ringbuf_full = lost
            self._sweeps_left = EXIT_SWEEPS_AFTER_LOSS
        if not self._sweeps_left:
            return
        self._sweeps_left -= 1
        for identity in self.correlator.identities():
            if process_gone(identity.pid, identity.start_time, self.proc_root):
                log.info("VMM pid %d exited; its exit record was lost (ring buffer full)",
                         identity.pid)
                self._handle(ProcessExit(ts_ns=now, pid=identity.pid))

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

