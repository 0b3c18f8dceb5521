"""Userspace throughput: correlation of a large synthesised event stream, and /metrics scrape time.

Stream: `--vms` VMs with `--devices` devices each (mixed transports: modern PCI with an MSI-X
config vector, legacy PCI with INTx, virtio-mmio), built with the correlation tests' guest-script
builder (tests/unit/test_correlate_guestscript.py), which also records the truth. Per device:
bring-up, then `--episodes` rounds drawn from a fixed-seed mix — NEEDS_RESET + recovery (most),
NEEDS_RESET without a config interrupt, FAILED then reset, ordinary resets, re-init without
reset (a violation), idle status reads; a tenth of the VMs exit with an episode open, and a few
pids are reused by a new VM. The stream is fed, in timestamp order, through one
agent.correlate.Correlator on one core (events/s); the episodes found are checked against the
builder's truth so that the figure is for work really done.

Scrape: an AgentCollector over a Correlator holding `--scrape-devices` devices (with open
episodes and histograms filled) rendered by prometheus_client's generate_latest, as the HTTP
server does per scrape. Prints figures; asserts nothing about timings.

    .venv/bin/python -m bench.userspace [--vms 500 --devices 4 --episodes 60]
"""
from __future__ import annotations

import argparse
import gc
import heapq
import random
import sys
import time
from typing import Optional

from bench.common import machine, median

S = 1_000_000_000
MS = 1_000_000


def _builder():
    from tests.unit.test_correlate_guestscript import Script

    return Script


def synthesise(n_vms: int, devs_per_vm: int, episodes: int, seed: int = 1):
    """(events in ts order, truth episodes, number of devices)."""
    from agent.model import Transport

    Script = _builder()
    rng = random.Random(seed)
    scripts = []
    for v in range(n_vms):
        s = Script(t0=S + v, gap=20_000, unit=n_vms)   # merged scripts never tie
        pid = 10_000 + v
        vm = s.vm(pid, f"vm-{v}", start_time=1000 + v)
        devs = []
        for d in range(devs_per_vm):
            kind = d % 3
            if kind == 0:
                devs.append(vm.device(Transport.PCI_MODERN, 0xC000_0000 + d * 0x4000,
                                      vector=0x40 + 2 * d))
            elif kind == 1:
                devs.append(vm.device(Transport.PCI_LEGACY, 0xC000 + d * 0x40, gsi=10 + d % 2))
            else:
                devs.append(vm.device(Transport.MMIO, 0xFEB0_0000 + d * 0x200, gsi=24 + d))
        for dev in devs:
            dev.init()
        for _ in range(episodes):
            dev = rng.choice(devs)
            roll = rng.random()
            s.step(rng.randrange(50, 5000))                       # idle time between rounds
            if roll < 0.55:
                dev.needs_reset()
                dev.read(gap=rng.randrange(1, 50))                # the driver polls again
                dev.recover()
            elif roll < 0.65:
                dev.needs_reset(notify=False)
                dev.recover()
            elif roll < 0.72:
                dev.needs_reset()
                dev.fail()
                dev.recover()
            elif roll < 0.85:
                dev.recover()                                     # an ordinary reset + init
            elif roll < 0.90:
                dev.fail()
                dev.reinit_without_reset()
            else:
                dev.read()                                        # an idle status read
        if v % 10 == 9:                                           # exits with an episode open
            devs[0].needs_reset()
            vm.exit()
            if v % 20 == 19:                                      # the pid comes back
                vm2 = s.vm(pid, f"vm-{v}-again", start_time=5000 + v)
                dev2 = vm2.device(Transport.PCI_MODERN, 0xC000_0000, vector=0x40)
                dev2.init()
                dev2.needs_reset()
                dev2.recover()
        scripts.append(s)
    events = list(heapq.merge(*(s.events for s in scripts), key=lambda e: e.ts_ns))
    truth = [ep for s in scripts for ep in s.episodes]
    return events, truth, n_vms * devs_per_vm


def replay(events, max_devices: int, max_vms: int) -> tuple[float, int, int]:
    """(seconds, recovered, abandoned) for feeding `events` through a fresh Correlator."""
    from agent.correlate import Correlator, CorrelatorConfig
    from agent.model import EpisodeEnded, Outcome

    c = Correlator(CorrelatorConfig(max_devices=max_devices, max_vms=max_vms))
    recovered = abandoned = 0
    gc.collect()
    t0 = time.perf_counter()
    for ev in events:
        for out in c.feed(ev):
            if isinstance(out, EpisodeEnded):
                if out.episode.outcome == Outcome.RECOVERED:
                    recovered += 1
                else:
                    abandoned += 1
    for out in c.flush():
        if isinstance(out, EpisodeEnded):
            if out.episode.outcome == Outcome.RECOVERED:
                recovered += 1
            else:
                abandoned += 1
    return time.perf_counter() - t0, recovered, abandoned


def scrape_setup(n_devices: int):
    """A registry with an AgentCollector over a Correlator holding n_devices devices, half of
    them in an open NEEDS_RESET episode, histograms filled."""
    from prometheus_client import CollectorRegistry

    from agent.correlate import Correlator, CorrelatorConfig
    from agent.export.metrics import AgentCollector, EpisodeHistograms, SelfStats

    per_vm = 10
    # half the devices: a normal stream (episodes that ended, some VMs exited, a pid reused)
    events, _, _ = synthesise(max(1, n_devices // 2 // per_vm), per_vm, episodes=5, seed=2)
    c = Correlator(CorrelatorConfig(max_devices=n_devices * 2, max_vms=n_devices))
    hist = EpisodeHistograms()
    for ev in events:
        for out in c.feed(ev):
            hist.observe(out)
    for out in c.flush():
        hist.observe(out)
    now = events[-1].ts_ns + 10 * MS
    have = len(c.snapshot(now).devices)
    # the rest: VMs whose devices sit in an open NEEDS_RESET episode
    from agent.model import Transport
    s = _builder()(t0=now, gap=1000)
    opened = 0
    i = 0
    while have + opened < n_devices:
        vm = s.vm(900_000 + i, f"open-{i}", start_time=1)
        for d in range(min(per_vm, n_devices - have - opened)):
            dev = vm.device(Transport.PCI_MODERN, 0xC000_0000 + d * 0x4000, vector=0x40 + 2 * d)
            dev.init()
            dev.needs_reset()
            opened += 1
        i += 1
    for ev in s.events:
        c.feed(ev)
    c.tick(s.t + 100 * MS)
    t_snap = s.t + 200 * MS

    def self_stats() -> SelfStats:
        return SelfStats(hooks={"mmio": True, "pio": True, "apic": True, "exit": True},
                         events={"access": 123}, filtered={"repeat": 1}, lost={},
                         map_entries={"watch": 10}, map_capacity={"watch": 4096})

    reg = CollectorRegistry()
    reg.register(AgentCollector(lambda: c.snapshot(t_snap), hist, self_stats, stuck_after_s=60))
    return reg, len(c.snapshot(t_snap).devices), opened


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vms", type=int, default=500)
    ap.add_argument("--devices", type=int, default=4, help="devices per VM")
    ap.add_argument("--episodes", type=int, default=60, help="rounds per VM")
    ap.add_argument("--repeat", type=int, default=3, help="replays (median)")
    ap.add_argument("--scrape-devices", type=int, default=1000)
    ap.add_argument("--scrapes", type=int, default=20)
    args = ap.parse_args(argv)
    from prometheus_client import generate_latest

    print(machine(), flush=True)
    t0 = time.perf_counter()
    events, truth, n_devs = synthesise(args.vms, args.devices, args.episodes)
    kinds: dict[str, int] = {}
    for e in events:
        kinds[e.kind] = kinds.get(e.kind, 0) + 1
    want_rec = sum(t.outcome == "recovered" for t in truth)
    want_ab = sum(t.outcome == "abandoned" for t in truth)
    print(f"\n== replay: {len(events):,} events ({kinds}), {args.vms} VMs, {n_devs} devices, "
          f"{len(truth)} episodes in the truth ({want_rec} recovered, {want_ab} abandoned); "
          f"synthesised in {time.perf_counter() - t0:.1f}s ==")
    rates = []
    for i in range(args.repeat):
        secs, rec, ab = replay(events, max_devices=max(4096, n_devs * 2),
                               max_vms=max(256, args.vms * 2))
        rates.append(len(events) / secs)
        print(f"  run {i}: {secs:.2f}s, {len(events) / secs:,.0f} events/s, found "
              f"{rec} recovered / {ab} abandoned (truth {want_rec} / {want_ab})", flush=True)
    print(f"replay median: {median(rates):,.0f} events/s on one core "
          f"({1e9 / median(rates):,.0f} ns/event)")

    reg, devices, opened = scrape_setup(args.scrape_devices)
    body = generate_latest(reg)
    series = sum(1 for line in body.decode().splitlines() if line and not line.startswith("#"))
    times = []
    for _ in range(args.scrapes):
        t = time.perf_counter()
        generate_latest(reg)
        times.append(time.perf_counter() - t)
    print(f"\n== scrape: {devices} devices ({opened} with an open episode), {series} series, "
          f"{len(body) / 1024:.0f} KiB ==")
    print(f"scrape median {median(times) * 1e3:.1f} ms, min {min(times) * 1e3:.1f} ms, "
          f"max {max(times) * 1e3:.1f} ms over {args.scrapes} scrapes (collect + render)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
