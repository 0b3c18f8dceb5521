"""Correlator throughput (printed, not judged): per-event cost with few vs many devices.

Run with `-s` to see the figures. The assertions only check the work was really done.
"""
from __future__ import annotations

import time

from agent.correlate import Correlator, CorrelatorConfig
from agent.model import EpisodeEnded, Transport
from test_correlate_guestscript import Script


def stream(n_vms: int, devs_per_vm: int, rounds: int):
    scripts = []
    for v in range(n_vms):
        s = Script(t0=1_000_000_000 + v, unit=n_vms)
        vm = s.vm(1000 + v, f"vm{v}")
        devs = [vm.device(Transport.PCI_MODERN, 0xFE000000 + d * 0x4000, vector=0x30 + d)
                for d in range(devs_per_vm)]
        for d in devs:
            d.init()
        for _ in range(rounds):
            for d in devs:
                d.needs_reset()
                d.recover()
        scripts.append(s)
    import heapq
    return list(heapq.merge(*(s.events for s in scripts), key=lambda e: e.ts_ns))


def measure(events, expect_episodes: int) -> float:
    c = Correlator(CorrelatorConfig(max_devices=10_000, max_vms=1_000))
    t0 = time.perf_counter()
    n = 0
    for ev in events:
        n += sum(isinstance(o, EpisodeEnded) for o in c.feed(ev))
    n += sum(isinstance(o, EpisodeEnded) for o in c.flush())
    elapsed = time.perf_counter() - t0
    assert n == expect_episodes
    return elapsed / len(events)


def test_per_event_cost_does_not_grow_with_the_number_of_devices():
    small = stream(1, 2, 1000)
    large = stream(100, 10, 10)
    per_small = measure(small, 2 * 1000)
    per_large = measure(large, 100 * 10 * 10)
    print(f"\ncorrelator: {1 / per_small:,.0f} events/s with 2 devices, "
          f"{1 / per_large:,.0f} events/s with 1000 devices "
          f"(cost ratio large/small {per_large / per_small:.2f})")
