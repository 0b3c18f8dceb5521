"""Prometheus export: a custom Collector that builds every metric family afresh on each scrape.

Inputs, all read-only here:
- a correlation `Snapshot` (device state and cumulative counters), fetched per scrape;
- `EpisodeHistograms`, fed by the run loop with correlation outputs (`EpisodeEnded`);
- `SelfStats`, the agent's own counters (capture stats + run-loop counters), fetched per scrape.

Names and labels are the contract in docs/metrics.md.
"""
from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

from prometheus_client.core import (
    CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric,
)
from prometheus_client.registry import Collector

from agent.events import EVENT_TYPES
from agent.model import (
    PHASES, EpisodeEnded, Evidence, Outcome, Rule, Snapshot, Transport, VmIdentity,
)

BUCKETS: tuple[float, ...] = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600,
)

# Fixed label vocabularies (docs/metrics.md). Values outside them are folded, never exported raw.
DEVICE_TYPES = frozenset({
    "net", "blk", "console", "rng", "balloon", "scsi", "9p", "gpu", "input", "vsock", "crypto",
    "iommu", "mem", "sound", "fs", "pmem", "mac80211_hwsim", "video", "unknown",
})
TRANSPORTS = frozenset({
    Transport.PCI_MODERN, Transport.PCI_LEGACY, Transport.MMIO, Transport.VHOST, Transport.UNKNOWN,
})
FILTER_REASONS = ("repeat", "unwatched", "uninteresting_irq", "rate_limited", "unsatisfied_read")
LOST_REASONS = ("ringbuf_full", "decode_error", "candidate_map_full", "watch_map_full",
                "kernel_read_error", "user_read_error", "correlation_error", "poll_error")
ENDED_OUTCOMES = (Outcome.RECOVERED, Outcome.ABANDONED)
# QMP confirmation of suspected NEEDS_RESET (agent/vmm/confirm.py)
VMM_QUERY_RESULTS = ("needs_reset", "clear", "unmatched", "error", "pci_map", "pci_map_error")
VMM_SKIP_REASONS = ("no_socket", "rate_limited", "overflow")


def bounded_type(value: str) -> str:
    return value if value in DEVICE_TYPES else "unknown"


def bounded_transport(value: str) -> str:
    return value if value in TRANSPORTS else Transport.UNKNOWN


class FixedHistogram:
    """Cumulative histogram with fixed bounds, BUCKETS by default (no prometheus_client
    registry involved)."""

    __slots__ = ("bounds", "counts", "count", "sum")

    def __init__(self, bounds: tuple[float, ...] = BUCKETS) -> None:
        self.bounds = bounds
        self.counts = [0] * len(bounds)    # non-cumulative per-bucket counts
        self.count = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.bounds):
            if value <= bound:
                self.counts[i] += 1
                break
        self.count += 1
        self.sum += value

    def buckets(self) -> list[tuple[str, float]]:
        out: list[tuple[str, float]] = []
        running = 0
        for bound, n in zip(self.bounds, self.counts):
            running += n
            out.append((_le(bound), running))
        out.append(("+Inf", self.count))
        return out


def _le(bound: float) -> str:
    return repr(float(bound))


class EpisodeHistograms:
    """Recovery-time histograms, fed with correlation outputs by the run loop (thread-safe).

    Label sets are bounded by the fixed type/transport/phase vocabularies.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._recovery: dict[tuple[str, str], FixedHistogram] = {}
        self._phase: dict[str, FixedHistogram] = {p: FixedHistogram() for p in PHASES}

    def observe(self, output: object) -> None:
        if not isinstance(output, EpisodeEnded):
            return
        ep = output.episode
        if ep.outcome != Outcome.RECOVERED:
            return
        recovery = ep.recovery_seconds
        phases = ep.phase_seconds()
        with self._lock:
            if recovery is not None and recovery >= 0:
                key = (bounded_type(ep.type), bounded_transport(ep.transport))
                self._recovery.setdefault(key, FixedHistogram()).observe(recovery)
            for name, seconds in phases.items():
                if seconds >= 0:
                    self._phase[name].observe(seconds)

    def families(self) -> list[Metric]:
        rec = HistogramMetricFamily(
            "virtio_recovery_duration_seconds",
            "Recovered NEEDS_RESET episodes: episode start to DRIVER_OK.",
            labels=["type", "transport"])
        phase = HistogramMetricFamily(
            "virtio_recovery_phase_duration_seconds",
            "Phases of recovered episodes: notify, react, reset, reinit.",
            labels=["phase"])
        with self._lock:
            for (typ, transport), h in sorted(self._recovery.items()):
                rec.add_metric([typ, transport], h.buckets(), h.sum)
            for name in PHASES:
                h = self._phase[name]
                phase.add_metric([name], h.buckets(), h.sum)
        return [rec, phase]


@dataclass
class SelfStats:
    """The agent's own figures at scrape time (filled by the run loop from capture.stats())."""

    hooks: dict[str, bool] = field(default_factory=dict)            # hook family -> attached
    events: dict[str, int] = field(default_factory=dict)            # event kind -> correlated
    filtered: dict[str, int] = field(default_factory=dict)          # reason -> count
    lost: dict[str, int] = field(default_factory=dict)              # reason -> count
    map_entries: dict[str, int] = field(default_factory=dict)       # BPF map -> entries
    map_capacity: dict[str, int] = field(default_factory=dict)      # BPF map -> max_entries
    prog_run_time_ns: Optional[dict[str, int]] = None               # None: bpf stats are off
    prog_run_count: Optional[dict[str, int]] = None
    vmm_queries: dict[str, int] = field(default_factory=dict)       # result -> QMP probes made
    vmm_skipped: dict[str, int] = field(default_factory=dict)       # reason -> probes not made
    state_saves: dict[str, int] = field(default_factory=dict)       # ok / error -> state file saves
    state_restored: dict[str, int] = field(default_factory=dict)    # vms / devices / episodes


@dataclass(frozen=True)
class BuildInfo:
    version: str
    python: str
    bcc: str

    @classmethod
    def detect(cls) -> "BuildInfo":
        from agent import __version__

        try:
            from importlib.metadata import version as dist_version

            bcc = dist_version("bcc")
        except Exception:
            bcc = "none"
        return cls(__version__, "%d.%d.%d" % sys.version_info[:3], bcc)


def _vm_labels(vm: VmIdentity) -> tuple[str, str]:
    return (vm.name or f"pid-{vm.pid}", vm.namespace)


class AgentStatusCollector(Collector):
    """`virtio_agent_build_info` and `virtio_agent_ready`, served from the first request on:
    before the BPF programs are compiled (the AgentCollector does not exist yet), a scrape shows
    the agent as up but not ready instead of an empty page. `ready_fn` is called per scrape."""

    def __init__(self, ready_fn: Callable[[], bool],
                 build_info: Optional[BuildInfo] = None) -> None:
        self._ready_fn = ready_fn
        self._build = build_info or BuildInfo.detect()

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterable[Metric]:
        b = self._build
        build = GaugeMetricFamily("virtio_agent_build_info", "Build metadata.",
                                  labels=["version", "python", "bcc"])
        build.add_metric([b.version, b.python, b.bcc], 1)
        try:
            ready = bool(self._ready_fn())
        except Exception:
            ready = False
        g = GaugeMetricFamily(
            "virtio_agent_ready",
            "1 when every enabled core hook family is attached and the event loop runs; 0 while "
            "the BPF programs compile, and when capture fails.")
        g.add_metric([], 1 if ready else 0)
        return [build, g]


class AgentCollector(Collector):
    """Builds all families on each scrape (but build_info and ready: AgentStatusCollector).
    Register it in a CollectorRegistry.

    `snapshot_fn` returns the correlation Snapshot for now (or None before correlation runs);
    `self_stats_fn` returns SelfStats. Both are called from the HTTP thread.
    """

    def __init__(self, snapshot_fn: Callable[[], Optional[Snapshot]],
                 histograms: EpisodeHistograms,
                 self_stats_fn: Callable[[], SelfStats] = SelfStats,
                 stuck_after_s: float = 60.0,
                 ifname_fn: Optional[Callable[[VmIdentity, str], str]] = None,
                 extra_families_fn: Optional[Callable[[], list[Metric]]] = None) -> None:
        # ifname_fn(vm, device): the device's host network interface ("" if none known);
        # extra_families_fn: more families built per scrape (agent.net.outage)
        self._ifname_fn = ifname_fn
        self._extra_families_fn = extra_families_fn
        self._snapshot_fn = snapshot_fn
        self._histograms = histograms
        self._self_stats_fn = self_stats_fn
        self._stuck_after_s = stuck_after_s
        self._last_scrape_s = 0.0
        self._lock = threading.Lock()

    def describe(self) -> Iterable[Metric]:
        # An empty describe() keeps the registry from calling collect() at registration time.
        return []

    def collect(self) -> Iterable[Metric]:
        with self._lock:  # concurrent scrapes would otherwise interleave scrape timing
            t0 = time.perf_counter()
            families = self._device_families(self._snapshot_fn())
            families += self._histograms.families()
            families += self._self_families(self._self_stats_fn())
            if self._extra_families_fn is not None:
                families += self._extra_families_fn()
            previous = self._last_scrape_s
            self._last_scrape_s = time.perf_counter() - t0
        g = GaugeMetricFamily("virtio_agent_scrape_duration_seconds",
                              "Time the previous scrape took to build.")
        g.add_metric([], previous)
        families.append(g)
        return families

    def _device_families(self, snap: Optional[Snapshot]) -> list[Metric]:
        dev = ["vm", "namespace", "device"]
        info = GaugeMetricFamily("virtio_device_info", "One series per known virtio device.",
                                 labels=dev + ["type", "transport", "ifname"])
        status = GaugeMetricFamily("virtio_device_status",
                                   "Last status byte the guest read or wrote.", labels=dev)
        needs_reset = CounterMetricFamily("virtio_device_needs_reset_total",
                                          "DEVICE_NEEDS_RESET episodes started.", labels=dev)
        recoveries = CounterMetricFamily("virtio_device_recoveries_total",
                                         "Episodes that ended with DRIVER_OK after a reset.",
                                         labels=dev)
        resets = CounterMetricFamily("virtio_device_resets_total",
                                     "Status 0 written by the driver (all resets).", labels=dev)
        failed = CounterMetricFamily("virtio_driver_failed_total",
                                     "FAILED (0x80) written by the driver.", labels=dev)
        config_irqs = CounterMetricFamily("virtio_config_interrupts_total",
                                          "Configuration-change interrupts delivered.", labels=dev)
        unrecovered = GaugeMetricFamily("virtio_device_unrecovered_seconds",
                                        "Seconds since the open NEEDS_RESET episode started.",
                                        labels=dev)
        stuck = GaugeMetricFamily("virtio_device_stuck",
                                  "1 while the open episode is older than the stuck threshold.",
                                  labels=dev)
        stuck_total = GaugeMetricFamily("virtio_devices_stuck",
                                        "Devices stuck in NEEDS_RESET.")
        ended = CounterMetricFamily("virtio_episodes_ended_total", "Episodes ended, by outcome.",
                                    labels=["outcome"])
        violations = CounterMetricFamily("virtio_spec_violations_total",
                                         "Virtio status-protocol rule violations.",
                                         labels=["vm", "namespace", "rule"])
        vms = GaugeMetricFamily("virtio_agent_vms", "VMs tracked.")
        devices = GaugeMetricFamily("virtio_agent_devices", "Devices tracked.")
        evictions = CounterMetricFamily("virtio_agent_evictions_total",
                                        "Entries evicted because a bound was reached.",
                                        labels=["what"])
        suspected = GaugeMetricFamily(
            "virtio_device_needs_reset_suspected",
            "1 while NEEDS_RESET is suspected from kernel evidence only (config interrupt, then "
            "kicks without completion, status never read) and not confirmed by the VMM.",
            labels=dev)
        no_progress = GaugeMetricFamily(
            "virtio_device_no_progress_seconds",
            "Seconds since the config interrupt after which a suspected device made no progress.",
            labels=dev)
        started = CounterMetricFamily(
            "virtio_episodes_started_total",
            "NEEDS_RESET episodes started, by the evidence that decided: status_read, "
            "config_interrupt, vhost (kernel) or vmm (QEMU confirmed a kernel suspicion).",
            labels=["evidence"])
        families: list[Metric] = [info, status, needs_reset, recoveries, resets, failed,
                                  config_irqs, unrecovered, stuck, stuck_total, ended,
                                  violations, vms, devices, evictions, suspected, no_progress,
                                  started]
        snap = snap or Snapshot(now_ns=0, devices=[], violations={}, episodes_ended={}, vms=0,
                                evictions={})

        # Two VM instances can share a name (a restart before the old one is evicted): one
        # series per label set, the newest instance wins (Prometheus rejects duplicates).
        chosen: dict[tuple[str, str, str], object] = {}
        for d in snap.devices:
            key = _vm_labels(d.vm) + (d.device,)
            prev = chosen.get(key)
            if prev is None or (d.vm.start_time, d.vm.pid) >= (prev.vm.start_time, prev.vm.pid):
                chosen[key] = d
        n_stuck = 0
        for key, d in chosen.items():
            labels = list(key)
            ifname = self._ifname_fn(d.vm, d.device) if self._ifname_fn is not None else ""
            info.add_metric(labels + [bounded_type(d.type), bounded_transport(d.transport),
                                      ifname], 1)
            status.add_metric(labels, d.status)
            needs_reset.add_metric(labels, d.needs_reset_total)
            recoveries.add_metric(labels, d.recoveries_total)
            resets.add_metric(labels, d.resets_total)
            failed.add_metric(labels, d.failed_total)
            config_irqs.add_metric(labels, d.config_interrupts_total)
            if d.suspected_since_ns is not None:
                suspected.add_metric(labels, 1)
                no_progress.add_metric(labels, max(0, snap.now_ns - d.suspected_since_ns) / 1e9)
            ep = d.open_episode
            if ep is not None:
                age = ep.age_seconds(snap.now_ns)
                is_stuck = ep.stuck or age >= self._stuck_after_s
                n_stuck += is_stuck
                unrecovered.add_metric(labels, age)
                stuck.add_metric(labels, 1 if is_stuck else 0)
        stuck_total.add_metric([], n_stuck)

        for outcome in ENDED_OUTCOMES:
            ended.add_metric([outcome], snap.episodes_ended.get(outcome, 0))

        # Every tracked VM gets every rule at 0, so a VM's first violation is an increase.
        per_rule: dict[tuple[str, str, str], int] = {
            vm_labels + (rule,): 0 for vm_labels in {key[:2] for key in chosen} for rule in Rule.ALL
        }
        for (vm, rule), count in snap.violations.items():
            rule = rule if rule in Rule.ALL else "other"
            key = _vm_labels(vm) + (rule,)
            per_rule[key] = per_rule.get(key, 0) + count
        for key, count in sorted(per_rule.items()):
            violations.add_metric(list(key), count)

        for evidence in sorted(set(Evidence.ALL) | set(snap.episodes_started)):
            if evidence in Evidence.ALL:
                started.add_metric([evidence], snap.episodes_started.get(evidence, 0))
        vms.add_metric([], snap.vms)
        devices.add_metric([], sum(1 for d in snap.devices if not d.exited))
        for what in ("vm", "device"):
            evictions.add_metric([what], snap.evictions.get(what, 0))
        return families

    def _self_families(self, s: SelfStats) -> list[Metric]:
        hooks = GaugeMetricFamily("virtio_agent_hook_attached",
                                  "1 if the hook family attached, 0 if tried and failed.",
                                  labels=["hook"])
        for name, attached in sorted(s.hooks.items()):
            hooks.add_metric([name], 1 if attached else 0)
        events = CounterMetricFamily("virtio_agent_events_total",
                                     "Events received from the kernel and correlated.",
                                     labels=["kind"])
        for kind in sorted(set(EVENT_TYPES) | set(s.events)):
            events.add_metric([kind], s.events.get(kind, 0))
        filtered = CounterMetricFamily("virtio_agent_kernel_events_filtered_total",
                                       "Accesses the kernel filter folded or dropped.",
                                       labels=["reason"])
        for reason in sorted(set(FILTER_REASONS) | set(s.filtered)):
            filtered.add_metric([reason], s.filtered.get(reason, 0))
        lost = CounterMetricFamily("virtio_agent_events_lost_total",
                                   "Events lost before or during correlation.", labels=["reason"])
        for reason in sorted(set(LOST_REASONS) | set(s.lost)):
            lost.add_metric([reason], s.lost.get(reason, 0))
        entries = GaugeMetricFamily("virtio_agent_bpf_map_entries",
                                    "Entries in each bounded BPF map.", labels=["map"])
        for name, n in sorted(s.map_entries.items()):
            entries.add_metric([name], n)
        capacity = GaugeMetricFamily("virtio_agent_bpf_map_capacity",
                                     "max_entries of each BPF map.", labels=["map"])
        for name, n in sorted(s.map_capacity.items()):
            capacity.add_metric([name], n)
        queries = CounterMetricFamily(
            "virtio_agent_vmm_queries_total",
            "QMP probes made to confirm a suspected NEEDS_RESET, by result.", labels=["result"])
        for result in VMM_QUERY_RESULTS:
            queries.add_metric([result], s.vmm_queries.get(result, 0))
        skipped = CounterMetricFamily(
            "virtio_agent_vmm_queries_skipped_total",
            "Suspicions not sent to the VMM: no_socket, rate_limited, overflow.",
            labels=["reason"])
        for reason in VMM_SKIP_REASONS:
            skipped.add_metric([reason], s.vmm_skipped.get(reason, 0))
        saves = CounterMetricFamily(
            "virtio_agent_state_saves_total",
            "State file saves (--state-file), by result: ok, error.", labels=["result"])
        for result in ("ok", "error"):
            saves.add_metric([result], s.state_saves.get(result, 0))
        restored = GaugeMetricFamily(
            "virtio_agent_state_restored",
            "What this agent took over from the state file when it started.", labels=["what"])
        for what in ("vms", "devices", "episodes"):
            restored.add_metric([what], s.state_restored.get(what, 0))
        families: list[Metric] = [hooks, events, filtered, lost, entries, capacity,
                                  queries, skipped, saves, restored]
        if s.prog_run_time_ns is not None:
            run_time = CounterMetricFamily("virtio_agent_bpf_run_time_seconds_total",
                                           "BPF program run time (kernel.bpf_stats_enabled).",
                                           labels=["prog"])
            for prog, ns in sorted(s.prog_run_time_ns.items()):
                run_time.add_metric([prog], ns / 1e9)
            families.append(run_time)
        if s.prog_run_count is not None:
            run_count = CounterMetricFamily("virtio_agent_bpf_run_count_total",
                                            "BPF program runs (kernel.bpf_stats_enabled).",
                                            labels=["prog"])
            for prog, n in sorted(s.prog_run_count.items()):
                run_count.add_metric([prog], n)
            families.append(run_count)
        return families
