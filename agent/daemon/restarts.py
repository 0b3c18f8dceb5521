"""The run loop's restarts: the state file (agent.state_file) restored at start, saved when the
correlator's state changed and once more at shutdown, so a restarted agent goes on where the old
one stopped (docs/run.md, "Restarts").

A mixin of agent.daemon.loop.Agent: it uses the Agent's lock, correlator, outputs and episode log.
"""
from __future__ import annotations

import logging
import time
from typing import Optional

from agent.events import ProcessExit
from agent.model import EpisodeEnded

log = logging.getLogger("agent.run")

SAVE_EVERY_NS = 1_000_000_000   # state file: changes saved at most this often (episode ends at once)
RESTORED_CHECK_NS = 1_000_000_000   # restored VMs not heard from: /proc liveness checked this often


class StateKeeping:
    """restore() before the first step, _state_to_save()/_save() from each step, save_state() at
    shutdown, _check_restored() for taken-over VMs that have not been heard from."""

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

