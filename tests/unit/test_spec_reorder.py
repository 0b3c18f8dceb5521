"""The reorder buffer: events held for a window and released in timestamp order.

Not a virtio rule but correlation's own contract (docs/correlation.md): capture's per-CPU
batches overlap a little; every event waits until the newest timestamp seen is the window
past it; equal timestamps go identities first (VmStarted), process exits last, the rest in
arrival order; an event older than what was already released is applied at that time and
counted late, so no duration goes negative.
"""
from __future__ import annotations

from agent.correlate.reorder import ReorderBuffer
from agent.events import IrqLine, ProcessExit, VmStarted


def irq(ts: int, gsi: int = 5) -> IrqLine:
    return IrqLine(ts, 100, 101, gsi, 1)


def test_events_wait_for_the_window_then_come_out_in_timestamp_order():
    buf = ReorderBuffer(window_ns=100)
    assert buf.horizon() is None and len(buf) == 0
    for ts in (1000, 950, 1020, 900):
        buf.push(irq(ts))
    assert buf.newest_ns == 1020 and buf.horizon() == 920
    assert [e.ts_ns for e in buf.release(buf.horizon())] == [900]
    buf.push(irq(1200))
    assert buf.horizon() == 1100
    assert [e.ts_ns for e in buf.release(buf.horizon())] == [950, 1000, 1020]
    assert len(buf) == 1 and buf.released_ns == 1020
    assert buf.late == 0


def test_an_event_exactly_at_the_horizon_is_released():
    buf = ReorderBuffer(window_ns=100)
    buf.push(irq(1000))
    buf.push(irq(1100))
    assert [e.ts_ns for e in buf.release(buf.horizon())] == [1000]


def test_release_none_drains_everything():
    buf = ReorderBuffer(window_ns=10**9)
    for ts in (5, 3, 4):
        buf.push(irq(ts))
    assert [e.ts_ns for e in buf.release(None)] == [3, 4, 5]
    assert len(buf) == 0


def test_equal_timestamps_release_identities_first_exits_last_the_rest_by_arrival():
    buf = ReorderBuffer(window_ns=0)
    buf.push(ProcessExit(500, 100))
    buf.push(irq(500, gsi=1))
    buf.push(VmStarted(500, 100, 7, "vm"))
    buf.push(irq(500, gsi=2))
    out = list(buf.release(None))
    assert [e.kind for e in out] == ["vm", "irq", "irq", "exit"]
    assert [e.gsi for e in out if e.kind == "irq"] == [1, 2]


def test_an_older_event_pushed_first_still_comes_before_an_equal_time_identity():
    buf = ReorderBuffer(window_ns=0)
    buf.push(VmStarted(501, 100, 7, "vm"))
    buf.push(ProcessExit(499, 100))
    assert [e.ts_ns for e in buf.release(None)] == [499, 501]


def test_an_event_later_than_the_window_is_applied_at_the_last_released_time_and_counted():
    buf = ReorderBuffer(window_ns=100)
    buf.push(irq(1000))
    buf.push(irq(1200))
    list(buf.release(buf.horizon()))               # releases 1000
    buf.push(irq(990, gsi=9))
    assert buf.late == 1
    out = list(buf.release(None))
    assert [(e.ts_ns, e.gsi) for e in out] == [(1000, 9), (1200, 5)]
    # at exactly the released time it is not late
    buf2 = ReorderBuffer(window_ns=100)
    buf2.push(irq(1000))
    list(buf2.release(None))
    buf2.push(irq(1000))
    assert buf2.late == 0


def test_a_late_event_does_not_move_the_newest_time_back():
    buf = ReorderBuffer(window_ns=10)
    buf.push(irq(100))
    list(buf.release(None))
    buf.push(irq(50))
    assert buf.newest_ns == 100 and buf.horizon() == 90


def test_the_newest_time_only_grows():
    buf = ReorderBuffer(window_ns=10)
    buf.push(irq(100))
    buf.push(irq(80))
    assert buf.newest_ns == 100
    buf.push(irq(100))
    assert buf.newest_ns == 100 and len(buf) == 3


def test_every_late_event_is_counted():
    buf = ReorderBuffer(window_ns=0)
    buf.push(irq(1000))
    list(buf.release(None))
    for ts in (10, 20, 30):
        buf.push(irq(ts))
    assert buf.late == 3
    assert [e.ts_ns for e in buf.release(None)] == [1000, 1000, 1000]
