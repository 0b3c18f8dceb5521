"""The episode log: one JSON line per finished, stuck or abandoned episode (docs/metrics.md)."""
from __future__ import annotations

import json
import threading
from typing import Any, Optional, TextIO

from agent.model import Episode, EpisodeEnded, EpisodeStuck, Outcome


def episode_record(episode: Episode, outcome: str) -> dict[str, Any]:
    return {
        "event": "episode",
        "outcome": outcome,
        "vm": episode.vm.name or f"pid-{episode.vm.pid}",
        "namespace": episode.vm.namespace,
        "device": episode.device,
        "type": episode.type,
        "transport": episode.transport,
        "start_ns": episode.start_ns,
        "guest_saw_ns": episode.guest_saw_ns,
        "reset_written_ns": episode.reset_written_ns,
        "reset_done_ns": episode.reset_done_ns,
        "driver_ok_ns": episode.driver_ok_ns,
        "recovery_seconds": episode.recovery_seconds,
        "notify_seconds": episode.phase_seconds().get("notify"),
        "evidence": episode.evidence,
        "resumed": episode.resumed,
    }


def record_for(output: object) -> Optional[dict[str, Any]]:
    """The log record of a correlation output, or None if it is not an episode output."""
    if isinstance(output, EpisodeStuck):
        return episode_record(output.episode, "stuck")
    if isinstance(output, EpisodeEnded):
        outcome = output.episode.outcome
        if outcome not in (Outcome.RECOVERED, Outcome.ABANDONED):
            outcome = Outcome.ABANDONED if output.episode.driver_ok_ns is None else Outcome.RECOVERED
        return episode_record(output.episode, outcome)
    return None


class EpisodeLog:
    """Writes episode records to a stream, one line each, flushed (stdout in `run`)."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._lock = threading.Lock()
        self.written = 0

    def write(self, output: object, net: Optional[dict[str, Any]] = None) -> bool:
        """`net`: the network impact of a virtio-net episode (agent.net.outage), logged as the
        record's `net` object."""
        rec = record_for(output)
        if rec is None:
            return False
        if net is not None:
            rec["net"] = net
        line = json.dumps(rec, separators=(",", ":"))
        with self._lock:
            self._stream.write(line + "\n")
            self._stream.flush()
            self.written += 1
        return True


def read_records(lines) -> list[dict[str, Any]]:
    """Parse episode-log lines (other lines, e.g. text logs, are skipped)."""
    out = []
    for line in lines:
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            d = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(d, dict) and d.get("event") == "episode":
            out.append(d)
    return out
