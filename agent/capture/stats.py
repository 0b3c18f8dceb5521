"""Capture statistics: in-kernel counters, map fill, per-program run time."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

FILTER_REASONS = ("repeat", "unwatched", "uninteresting_irq", "rate_limited", "unsatisfied_read")


@dataclass(frozen=True, slots=True)
class MapFill:
    entries: int
    capacity: int


@dataclass(frozen=True, slots=True)
class ProgramStats:
    run_time_ns: int
    run_cnt: int

    @property
    def ns_per_run(self) -> Optional[float]:
        return self.run_time_ns / self.run_cnt if self.run_cnt else None


@dataclass(frozen=True, slots=True)
class CaptureStats:
    forwarded: int                      # events the kernel put in the ring buffer
    delivered: int                      # events decoded and returned by poll()
    filtered: dict[str, int]            # FILTER_REASONS -> count (kept in the kernel)
    lost: dict[str, int]                # ringbuf_full, decode_error, candidate_map_full, ...
    counters: dict[str, int]            # every raw kernel counter, incl. ioctl counts
    maps: dict[str, MapFill]
    programs: dict[str, ProgramStats] = field(default_factory=dict)
    bpf_stats_enabled: bool = False


def bpf_stats_enabled() -> bool:
    try:
        with open("/proc/sys/kernel/bpf_stats_enabled") as f:
            return f.read().strip() == "1"
    except OSError:
        return False


def prog_fdinfo(fd: int, pid: str = "self") -> Optional[ProgramStats]:
    """run_time_ns / run_cnt of a BPF program fd (counted only while bpf_stats_enabled=1)."""
    try:
        with open(os.path.join("/proc", pid, "fdinfo", str(fd))) as f:
            info = dict(line.split(":", 1) for line in f if ":" in line)
    except OSError:
        return None
    try:
        return ProgramStats(int(info["run_time_ns"]), int(info["run_cnt"]))
    except (KeyError, ValueError):
        return None
