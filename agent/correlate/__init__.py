"""Correlation: agent.events in, agent.model outputs out. Pure (no I/O, no clock, no /proc).

    from agent.correlate import Correlator, CorrelatorConfig
    c = Correlator(CorrelatorConfig(stuck_after_ns=..., max_vms=..., max_devices=...,
                                    notify_window_ns=..., reorder_window_ns=...))
    outputs = c.feed(event)        # EpisodeEnded, EpisodeStuck, Violation, WatchRegister, WatchInterrupt
    outputs = c.tick(now_ns)       # time passes: buffered events, stuck episodes, notify windows
    outputs = c.flush()            # end of input: process everything still buffered
    snap = c.snapshot(now_ns)      # agent.model.Snapshot
    c.stats()                      # internal counters (late events, evicted candidates, ...)

See docs/correlation.md.
"""
from agent.correlate.config import CorrelatorConfig, DeviceHint
from agent.correlate.correlator import Correlator

__all__ = ["Correlator", "CorrelatorConfig", "DeviceHint"]
