"""Holds events for a window and releases them in timestamp order.

Capture delivers each batch sorted, but batches (and CPUs) can overlap a little. Every event is
held until the newest timestamp seen is `window_ns` past it, then released in (ts, kind rank,
arrival) order. An event arriving later than that (older than the last released one) is
released at the last released timestamp instead of its own and counted as late: durations can
never go negative, and the event is still applied.
"""
from __future__ import annotations

import dataclasses
import heapq
import itertools
from typing import Iterator

from agent.events import Event, ProcessExit, VmStarted

# at equal timestamps: identities first, exits last
_RANK = {VmStarted.kind: 0, ProcessExit.kind: 2}


class ReorderBuffer:
    def __init__(self, window_ns: int) -> None:
        self.window_ns = window_ns
        self._heap: list[tuple[int, int, int, Event]] = []
        self._seq = itertools.count()
        self.newest_ns: int | None = None    # newest timestamp seen
        self.released_ns: int | None = None  # timestamp of the last released event
        self.late = 0

    def __len__(self) -> int:
        return len(self._heap)

    def push(self, event: Event) -> None:
        if self.released_ns is not None and event.ts_ns < self.released_ns:
            self.late += 1
            event = dataclasses.replace(event, ts_ns=self.released_ns)
        if self.newest_ns is None or event.ts_ns > self.newest_ns:
            self.newest_ns = event.ts_ns
        heapq.heappush(self._heap, (event.ts_ns, _RANK.get(event.kind, 1), next(self._seq), event))

    def horizon(self) -> int | None:
        """Events at or before this timestamp are safe to process."""
        return None if self.newest_ns is None else self.newest_ns - self.window_ns

    def release(self, upto_ns: int | None) -> Iterator[Event]:
        """Pop events with ts <= upto_ns (all of them when upto_ns is None), in order."""
        heap = self._heap
        while heap and (upto_ns is None or heap[0][0] <= upto_ns):
            event = heapq.heappop(heap)[3]
            self.released_ns = event.ts_ns
            yield event
