"""Render the Grafana dashboards (JSON) and the ConfigMap that Grafana's dashboard sidecar loads.

    python dashboards/render.py          # rewrite dashboards/*.json and the ConfigMap
    python dashboards/render.py --check  # exit 1 if any of them is out of date (tests/deploy checks it)

Every query uses only metrics of docs/metrics.md (tests/deploy checks that too) plus `up` and
`scrape_duration_seconds`, which Prometheus itself records for each scrape.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
CONFIGMAP = HERE / "grafana-dashboards-configmap.yaml"
DS = {"type": "prometheus", "uid": "${datasource}"}
# Every query selects on the cluster, node and agent variables (tests/deploy checks each selector).
# `cluster` is whatever label tells clusters apart where several Prometheus feed one Grafana (an
# external label kept by Thanos/Mimir/federation); on a single Prometheus it has no values and
# "All" (.*) also matches series without it. `node` is set by the ServiceMonitor (docs/deploy.md).
SEL = 'cluster=~"$cluster", node=~"$node", instance=~"$instance"'
VM_SEL = SEL + ', namespace=~"$namespace", vm=~"$vm"'
DEV_SEL = VM_SEL + ', device=~"$device"'
WIDTH = 24


class _BlockDumper(yaml.SafeDumper):
    """Multi-line strings (the dashboard JSON) as literal blocks: readable and diffable."""


_BlockDumper.add_representer(
    str, lambda d, v: d.represent_scalar("tag:yaml.org,2002:str", v, style="|" if "\n" in v else None))


@dataclass
class Query:
    expr: str
    legend: str = ""
    instant: bool = False
    fmt: str = "time_series"  # or "table", "heatmap"


@dataclass
class Panel:
    title: str
    kind: str  # stat, timeseries, heatmap, table, state-timeline
    queries: list[Query]
    width: int = 12
    height: int = 8
    unit: str = ""
    description: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    defaults: dict[str, Any] = field(default_factory=dict)


def _targets(queries: list[Query]) -> list[dict[str, Any]]:
    out = []
    for i, q in enumerate(queries):
        out.append({
            "datasource": DS,
            "refId": chr(ord("A") + i),
            "expr": q.expr,
            "legendFormat": q.legend or "__auto",
            "instant": q.instant,
            "range": not q.instant,
            "format": q.fmt,
        })
    return out


def _layout(panels: list[Panel]) -> list[dict[str, Any]]:
    out, x, y, row_h = [], 0, 0, 0
    for pid, p in enumerate(panels, start=1):
        if x + p.width > WIDTH:
            x, y, row_h = 0, y + row_h, 0
        field_defaults: dict[str, Any] = {"unit": p.unit} if p.unit else {}
        field_defaults.update(p.defaults)
        panel = {
            "id": pid,
            "type": p.kind,
            "title": p.title,
            "description": p.description,
            "datasource": DS,
            "gridPos": {"x": x, "y": y, "w": p.width, "h": p.height},
            "targets": _targets(p.queries),
            "fieldConfig": {"defaults": field_defaults, "overrides": []},
            "options": {},
        }
        panel.update(p.extra)
        out.append(panel)
        x += p.width
        row_h = max(row_h, p.height)
    return out


def _query_var(name: str, label: str, query: str, multi: bool = True) -> dict[str, Any]:
    return {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": DS,
        "query": {"query": query, "refId": f"var-{name}"},
        "definition": query,
        "refresh": 2,
        "multi": multi,
        "includeAll": True,
        "allValue": ".*",
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "sort": 1,
    }


def _dashboard(uid: str, title: str, description: str, variables: list[dict[str, Any]],
               panels: list[Panel], time_from: str = "now-6h") -> dict[str, Any]:
    datasource_var = {
        "name": "datasource",
        "label": "Prometheus",
        "type": "datasource",
        "query": "prometheus",
        "current": {},
        "hide": 0,
    }
    return {
        "uid": uid,
        "title": title,
        "description": description,
        "tags": ["virtio", "kvm", "virtio-recovery-agent"],
        "editable": True,
        "graphTooltip": 1,
        "schemaVersion": 39,
        "version": 1,
        "time": {"from": time_from, "to": "now"},
        "refresh": "30s",
        "timezone": "",
        "templating": {"list": [datasource_var, *variables]},
        "annotations": {"list": []},
        "links": [{"title": "virtio dashboards", "type": "dashboards", "tags": ["virtio-recovery-agent"],
                   "asDropdown": True, "includeVars": True, "keepTime": True}],
        "panels": _layout(panels),
    }


def _host_vars() -> list[dict[str, Any]]:
    """cluster -> node -> agent (instance), each narrowed by the ones before it."""
    return [
        _query_var("cluster", "cluster", "label_values(virtio_agent_build_info, cluster)"),
        _query_var("node", "node", 'label_values(virtio_agent_build_info{cluster=~"$cluster"}, node)'),
        _query_var("instance", "agent",
                   'label_values(virtio_agent_build_info{cluster=~"$cluster", node=~"$node"}, instance)'),
    ]


def _stat(title: str, expr: str, unit: str = "short", description: str = "", width: int = 4,
          thresholds: list[tuple[float | None, str]] | None = None) -> Panel:
    steps = [{"value": v, "color": c} for v, c in (thresholds or [(None, "green")])]
    return Panel(title, "stat", [Query(expr, instant=True)], width=width, height=4, unit=unit,
                 description=description,
                 defaults={"thresholds": {"mode": "absolute", "steps": steps}},
                 extra={"options": {"reduceOptions": {"calcs": ["lastNotNull"]}, "colorMode": "background"}})


def fleet_overview() -> dict[str, Any]:
    rng = "$__range"
    ri = "$__rate_interval"
    bad = [(None, "green"), (1, "red")]
    panels = [
        _stat("Devices stuck in NEEDS_RESET", f"sum(virtio_devices_stuck{{{SEL}}})", thresholds=bad,
              description="Devices whose open NEEDS_RESET episode is older than the agent's --stuck-after."),
        _stat("Episodes started", f"sum(increase(virtio_device_needs_reset_total{{{SEL}}}[{rng}]))",
              description="NEEDS_RESET episodes started in the selected time range."),
        _stat("Recovered", f'sum(increase(virtio_episodes_ended_total{{{SEL}, outcome="recovered"}}[{rng}]))'),
        _stat("Abandoned (VM exited)",
              f'sum(increase(virtio_episodes_ended_total{{{SEL}, outcome="abandoned"}}[{rng}]))'),
        _stat("Spec violations", f"sum(increase(virtio_spec_violations_total{{{SEL}}}[{rng}]))",
              thresholds=[(None, "green"), (1, "orange")]),
        _stat("VMs / devices tracked", f"sum(virtio_agent_vms{{{SEL}}})", width=2),
        _stat("Devices", f"sum(virtio_agent_devices{{{SEL}}})", width=2),
        Panel("Recovery time p50 / p99 (NEEDS_RESET to DRIVER_OK)", "timeseries", [
            Query("histogram_quantile(0.5, sum by (le) "
                  f"(rate(virtio_recovery_duration_seconds_bucket{{{SEL}}}[{ri}])))", "p50"),
            Query("histogram_quantile(0.99, sum by (le) "
                  f"(rate(virtio_recovery_duration_seconds_bucket{{{SEL}}}[{ri}])))", "p99"),
        ], unit="s"),
        Panel("Recovery time distribution", "heatmap", [
            Query(f"sum by (le) (increase(virtio_recovery_duration_seconds_bucket{{{SEL}}}[{ri}]))",
                  "{{le}}", fmt="heatmap"),
        ], unit="s", extra={"options": {"calculate": False, "yAxis": {"unit": "s"},
                                        "cellGap": 1, "color": {"scheme": "Oranges", "mode": "scheme"}}}),
        Panel("Recovery time p99 by device type and transport", "timeseries", [
            Query("histogram_quantile(0.99, sum by (type, transport, le) "
                  f"(rate(virtio_recovery_duration_seconds_bucket{{{SEL}}}[{ri}])))", "{{type}} {{transport}}"),
        ], unit="s"),
        Panel("Phase p99: notify, react, reset, reinit", "timeseries", [
            Query("histogram_quantile(0.99, sum by (phase, le) "
                  f"(rate(virtio_recovery_phase_duration_seconds_bucket{{{SEL}}}[{ri}])))", "{{phase}}"),
        ], unit="s", description="notify: start to guest first saw 0x40; react: saw to reset written; "
                                 "reset: reset written to read back 0; reinit: reset done to DRIVER_OK."),
        Panel("Devices stuck in NEEDS_RESET", "table", [
            Query("max by (instance, namespace, vm, device, type, transport) ("
                  f"virtio_device_unrecovered_seconds{{{SEL}}} "
                  "* on (instance, namespace, vm, device) group_left (type, transport) "
                  f"virtio_device_info{{{SEL}}}"
                  f") and on (instance, namespace, vm, device) (virtio_device_stuck{{{SEL}}} == 1)",
                  instant=True, fmt="table"),
        ], width=12, unit="s", description="Open episodes older than --stuck-after; Value = seconds unrecovered.",
            extra={"transformations": [{"id": "organize", "options": {"excludeByName": {"Time": True}}}]}),
        Panel("Suspected NEEDS_RESET (kernel evidence, not confirmed by the VMM)", "table", [
            Query("max by (instance, namespace, vm, device) ("
                  f"virtio_device_no_progress_seconds{{{SEL}}}) "
                  f"and on (instance, namespace, vm, device) (virtio_device_needs_reset_suspected{{{SEL}}} == 1)",
                  instant=True, fmt="table"),
        ], width=12, unit="s",
            description="Config interrupt, then kicks without completion and no status read (how Linux guests "
                        "behave); Value = seconds without progress. Confirmed devices move to the episode tables.",
            extra={"transformations": [{"id": "organize", "options": {"excludeByName": {"Time": True}}}]}),
        Panel("Episodes started by evidence", "timeseries", [
            Query(f"sum by (evidence) (increase(virtio_episodes_started_total{{{SEL}}}[{ri}]))", "{{evidence}}"),
        ], width=12, description="status_read / config_interrupt / vhost: the kernel decided; vmm: QEMU "
                                 "confirmed a kernel suspicion (the guest never read the status)."),
        Panel("Open NEEDS_RESET episodes", "table", [
            Query(f"max by (instance, namespace, vm, device) (virtio_device_unrecovered_seconds{{{SEL}}})",
                  instant=True, fmt="table"),
        ], width=12, unit="s",
            extra={"transformations": [{"id": "organize", "options": {"excludeByName": {"Time": True}}}]}),
        Panel("Episodes started per VM", "timeseries", [
            Query(f"sum by (namespace, vm) (increase(virtio_device_needs_reset_total{{{SEL}}}[{ri}]))",
                  "{{namespace}}/{{vm}}"),
        ]),
        Panel("Episodes ended by outcome", "timeseries", [
            Query(f"sum by (outcome) (increase(virtio_episodes_ended_total{{{SEL}}}[{ri}]))", "{{outcome}}"),
        ]),
        Panel("Spec violations by rule", "timeseries", [
            Query(f"sum by (rule) (increase(virtio_spec_violations_total{{{SEL}}}[{ri}]))", "{{rule}}"),
        ]),
        Panel("VMs with most spec violations", "table", [
            Query(f"topk(20, sum by (namespace, vm, rule) (increase(virtio_spec_violations_total{{{SEL}}}[{rng}])) > 0)",
                  instant=True, fmt="table"),
        ], extra={"transformations": [{"id": "organize", "options": {"excludeByName": {"Time": True}}}]}),
        Panel("Resets, config interrupts, FAILED writes (fleet)", "timeseries", [
            Query(f"sum(rate(virtio_device_resets_total{{{SEL}}}[{ri}]))", "resets/s"),
            Query(f"sum(rate(virtio_config_interrupts_total{{{SEL}}}[{ri}]))", "config interrupts/s"),
            Query(f"sum(rate(virtio_driver_failed_total{{{SEL}}}[{ri}]))", "FAILED written/s"),
        ], width=24, unit="ops"),
        Panel("Frames dropped toward the guest per virtio-net episode (host backend)", "heatmap", [
            Query(f"sum by (le) (increase(virtio_net_outage_episode_dropped_packets_bucket{{{SEL}}}[{ri}]))",
                  "{{le}}", fmt="heatmap"),
        ], width=12, description="Per measured virtio-net NEEDS_RESET episode: frames the tap/macvtap "
            "dropped because nothing drained it (a lower bound of the loss; 0 does not mean no delay).",
            extra={"options": {"calculate": False, "cellGap": 1,
                               "color": {"scheme": "Oranges", "mode": "scheme"}}}),
        Panel("Frames dropped toward guests in virtio-net outages, by VM", "timeseries", [
            Query(f"sum by (namespace, vm) (increase(virtio_net_outage_dropped_packets_total{{{SEL}}}[{ri}])) "
                  "or vector(0)", "{{namespace}}/{{vm}}"),
        ], width=12, description="0 (no labels) when no virtio-net episode was measured."),
    ]
    return _dashboard("virtio-fleet-overview", "virtio recovery / fleet overview",
                      "DEVICE_NEEDS_RESET episodes and guest recovery times across all KVM hosts.",
                      _host_vars(), panels)


# virtio status byte -> what the driver has got to (virtio 1.x, 2.1)
_STATUS_MAPPINGS = [
    {"type": "value", "options": {
        "0": {"text": "reset (0)", "color": "blue", "index": 0},
        "1": {"text": "ACKNOWLEDGE (1)", "color": "light-yellow", "index": 1},
        "3": {"text": "DRIVER (3)", "color": "yellow", "index": 2},
        "11": {"text": "FEATURES_OK (11)", "color": "orange", "index": 3},
        "15": {"text": "DRIVER_OK (15)", "color": "green", "index": 4},
    }},
    {"type": "range", "options": {"from": 64, "to": 127, "result": {"text": "NEEDS_RESET", "color": "red", "index": 5}}},
    {"type": "range", "options": {"from": 128, "to": 255, "result": {"text": "FAILED", "color": "dark-red", "index": 6}}},
]


def vm_drilldown() -> dict[str, Any]:
    ri = "$__rate_interval"
    rng = "$__range"
    variables = [
        *_host_vars(),
        _query_var("namespace", "namespace", f'label_values(virtio_device_info{{{SEL}}}, namespace)'),
        _query_var("vm", "VM", f'label_values(virtio_device_info{{{SEL}, namespace=~"$namespace"}}, vm)'),
        _query_var("device", "device", f'label_values(virtio_device_info{{{VM_SEL}}}, device)'),
    ]
    panels = [
        Panel("Device status timeline", "state-timeline", [
            Query(f"max by (namespace, vm, device) (virtio_device_status{{{DEV_SEL}}})", "{{vm}} {{device}}"),
        ], width=24, height=10, description="The status byte the guest last read or wrote: reset, the "
            "initialisation steps, DRIVER_OK, and NEEDS_RESET (bit 0x40) / FAILED (bit 0x80).",
            defaults={"mappings": _STATUS_MAPPINGS, "color": {"mode": "thresholds"},
                      "thresholds": {"mode": "absolute", "steps": [{"value": None, "color": "text"}]}},
            extra={"options": {"showValue": "never", "mergeValues": True, "rowHeight": 0.8}}),
        Panel("Devices", "table", [
            Query(f"max by (namespace, vm, device, type, transport, ifname) (virtio_device_info{{{DEV_SEL}}})",
                  instant=True, fmt="table"),
        ], width=24, height=6,
            extra={"transformations": [{"id": "organize", "options": {"excludeByName": {"Time": True, "Value": True}}}]}),
        _stat("Episodes started", f"sum(increase(virtio_device_needs_reset_total{{{DEV_SEL}}}[{rng}]))"),
        _stat("Recoveries", f"sum(increase(virtio_device_recoveries_total{{{DEV_SEL}}}[{rng}]))"),
        _stat("Resets written", f"sum(increase(virtio_device_resets_total{{{DEV_SEL}}}[{rng}]))"),
        _stat("FAILED written", f"sum(increase(virtio_driver_failed_total{{{DEV_SEL}}}[{rng}]))",
              thresholds=[(None, "green"), (1, "red")]),
        _stat("Config interrupts", f"sum(increase(virtio_config_interrupts_total{{{DEV_SEL}}}[{rng}]))"),
        _stat("Stuck now", f"sum(virtio_device_stuck{{{DEV_SEL}}}) or vector(0)",
              thresholds=[(None, "green"), (1, "red")]),
        Panel("Seconds in the open NEEDS_RESET episode", "timeseries", [
            Query(f"max by (vm, device) (virtio_device_unrecovered_seconds{{{DEV_SEL}}})", "{{vm}} {{device}}"),
        ], unit="s"),
        Panel("Status byte", "timeseries", [
            Query(f"max by (vm, device) (virtio_device_status{{{DEV_SEL}}})", "{{vm}} {{device}}"),
        ], defaults={"custom": {"lineInterpolation": "stepAfter"}}),
        Panel("Resets, config interrupts, episodes", "timeseries", [
            Query(f"sum by (vm, device) (increase(virtio_device_resets_total{{{DEV_SEL}}}[{ri}]))",
                  "resets {{vm}} {{device}}"),
            Query(f"sum by (vm, device) (increase(virtio_config_interrupts_total{{{DEV_SEL}}}[{ri}]))",
                  "config irqs {{vm}} {{device}}"),
            Query(f"sum by (vm, device) (increase(virtio_device_needs_reset_total{{{DEV_SEL}}}[{ri}]))",
                  "NEEDS_RESET {{vm}} {{device}}"),
        ]),
        Panel("Spec violations of the VM", "timeseries", [
            Query(f"sum by (vm, rule) (increase(virtio_spec_violations_total{{{VM_SEL}}}[{ri}]))",
                  "{{vm}} {{rule}}"),
        ]),
        Panel("Virtio-net outages: frames toward the guest at the host backend", "timeseries", [
            Query(f"sum by (vm, device, ifname) (increase(virtio_net_outage_dropped_packets_total{{{DEV_SEL}}}[{ri}])) "
                  "or vector(0)", "dropped {{vm}} {{device}} {{ifname}}"),
            Query(f"sum by (vm, device, ifname) (increase(virtio_net_outage_toward_guest_packets_total{{{DEV_SEL}}}[{ri}])) "
                  "or vector(0)", "handled {{vm}} {{device}} {{ifname}}"),
        ], description="Counted at the backend interface (ifname) between the episode's start and its end: "
            "dropped = queue full (tap tx_dropped, macvtap rx_dropped); handled = tap: read by the VMM, "
            "macvtap: received (dropped included). See docs/network.md."),
        Panel("Virtio-net outages: bytes toward the guest at the host backend", "timeseries", [
            Query(f"sum by (vm, device, ifname) (increase(virtio_net_outage_toward_guest_bytes_total{{{DEV_SEL}}}[{ri}])) "
                  "or vector(0)", "{{vm}} {{device}} {{ifname}}"),
        ], unit="bytes", description="Bytes of the handled frames (a dropped frame's size is not counted by a tap)."),
    ]
    return _dashboard("virtio-vm-drilldown", "virtio recovery / VM drill-down",
                      "Status timeline and counters of the virtio devices of one VM.", variables, panels)


def agent_health() -> dict[str, Any]:
    ri = "$__rate_interval"
    panels = [
        _stat("Agents up", f'sum(up{{job=~"$job", {SEL}}})', width=4,
              description="Targets of the selected scrape job that answered the last scrape."),
        _stat("Agents down", f'count(up{{job=~"$job", {SEL}}} == 0) or vector(0)', width=4,
              thresholds=[(None, "green"), (1, "red")]),
        _stat("Agents not ready", f"count(virtio_agent_ready{{{SEL}}} == 0) or vector(0)", width=4,
              thresholds=[(None, "green"), (1, "red")],
              description="Agents that answer but are not capturing: compiling, or capture died (VirtioAgentNotReady)."),
        _stat("Hooks not attached", f'count(virtio_agent_hook_attached{{{SEL}, hook!="vhost_kprobe"}} == 0) or vector(0)',
              width=4, description="Hook families not attached, vhost_kprobe (kprobes, vDPA only) left out "
              "as in the VirtioAgentHookNotAttached alert.",
              thresholds=[(None, "green"), (1, "orange")]),
        _stat("Events lost (range)", f"sum(increase(virtio_agent_events_lost_total{{{SEL}}}[$__range]))", width=4,
              thresholds=[(None, "green"), (1, "orange")]),
        _stat("VMs tracked", f"sum(virtio_agent_vms{{{SEL}}})", width=2),
        _stat("Devices tracked", f"sum(virtio_agent_devices{{{SEL}}})", width=2),
        Panel("Hook families attached", "state-timeline", [
            Query(f"max by (instance, hook) (virtio_agent_hook_attached{{{SEL}}})", "{{instance}} {{hook}}"),
        ], width=24, height=7, defaults={
            "mappings": [{"type": "value", "options": {
                "0": {"text": "not attached", "color": "red", "index": 0},
                "1": {"text": "attached", "color": "green", "index": 1}}}],
            "color": {"mode": "thresholds"},
            "thresholds": {"mode": "absolute", "steps": [{"value": None, "color": "text"}]}}),
        Panel("Events correlated by kind", "timeseries", [
            Query(f"sum by (kind) (rate(virtio_agent_events_total{{{SEL}}}[{ri}]))", "{{kind}}"),
        ], unit="ops"),
        Panel("Accesses filtered in the kernel by reason", "timeseries", [
            Query(f"sum by (reason) (rate(virtio_agent_kernel_events_filtered_total{{{SEL}}}[{ri}]))",
                  "{{reason}}"),
        ], unit="ops"),
        Panel("Events lost", "timeseries", [
            Query(f"sum by (instance, reason) (increase(virtio_agent_events_lost_total{{{SEL}}}[{ri}]))",
                  "{{instance}} {{reason}}"),
        ]),
        Panel("BPF map fill", "timeseries", [
            Query(f"max by (instance, map) (virtio_agent_bpf_map_entries{{{SEL}}} "
                  f"/ (virtio_agent_bpf_map_capacity{{{SEL}}} > 0))", "{{instance}} {{map}}"),
        ], unit="percentunit", defaults={"max": 1, "min": 0}),
        Panel("BPF run time per invocation", "timeseries", [
            Query(f"sum by (prog) (rate(virtio_agent_bpf_run_time_seconds_total{{{SEL}}}[{ri}])) "
                  f"/ sum by (prog) (rate(virtio_agent_bpf_run_count_total{{{SEL}}}[{ri}]))", "{{prog}}"),
        ], unit="s", description="Needs kernel.bpf_stats_enabled=1 on the host; empty otherwise."),
        Panel("BPF CPU time (share of one CPU)", "timeseries", [
            Query(f"sum by (instance, prog) (rate(virtio_agent_bpf_run_time_seconds_total{{{SEL}}}[{ri}]))",
                  "{{instance}} {{prog}}"),
        ], unit="percentunit"),
        Panel("Scrape duration", "timeseries", [
            Query(f"max by (instance) (virtio_agent_scrape_duration_seconds{{{SEL}}})",
                  "{{instance}} build (previous scrape)"),
            Query(f'max by (instance) (scrape_duration_seconds{{job=~"$job", {SEL}}})', "{{instance}} scrape"),
        ], unit="s"),
        Panel("VMM (QMP) confirmation probes", "timeseries", [
            Query(f"sum by (result) (increase(virtio_agent_vmm_queries_total{{{SEL}}}[{ri}]))", "{{result}}"),
            Query(f"sum by (reason) (increase(virtio_agent_vmm_queries_skipped_total{{{SEL}}}[{ri}]))",
                  "skipped: {{reason}}"),
        ], description="QMP is only used on a NEEDS_RESET suspicion, rate-limited per VM."),
        Panel("Virtio-net outage impact: not measured / metering now", "timeseries", [
            Query(f"sum by (reason) (increase(virtio_agent_net_outage_unmeasured_total{{{SEL}}}[{ri}]))",
                  "{{reason}}"),
            Query(f"sum(virtio_agent_net_outage_open{{{SEL}}})", "metering now"),
        ], description="Episodes of possibly-net devices whose backend drops were not measured: no_backend "
            "(no tap/macvtap: vhost-user, slirp, VFIO), unmatched (several NICs/taps and no QMP socket), "
            "refused (too many at once), gone (interface vanished), inconsistent, missed, error."),
        Panel("State file: saves and what a restart took over", "timeseries", [
            Query(f"sum by (instance, result) (increase(virtio_agent_state_saves_total{{{SEL}}}[{ri}]))",
                  "{{instance}} saves {{result}}"),
            Query(f"max by (instance, what) (virtio_agent_state_restored{{{SEL}}})",
                  "{{instance}} restored {{what}}"),
        ], description="--state-file (docs/run.md, Restarts): save errors mean a restart now would lose the "
            "open episodes changed since the last good save; `restored` is what this agent took over when it started."),
        Panel("Evictions (a bound was reached)", "timeseries", [
            Query(f"sum by (instance, what) (increase(virtio_agent_evictions_total{{{SEL}}}[{ri}]))",
                  "{{instance}} {{what}}"),
        ]),
        Panel("Agent builds", "table", [
            Query(f"max by (instance, version, python, bcc) (virtio_agent_build_info{{{SEL}}})",
                  instant=True, fmt="table"),
        ], extra={"transformations": [{"id": "organize", "options": {"excludeByName": {"Time": True, "Value": True}}}]}),
    ]
    job_var = _query_var("job", "scrape job", 'label_values(virtio_agent_build_info{cluster=~"$cluster"}, job)')
    return _dashboard("virtio-agent-health", "virtio recovery / agent health",
                      "Is every virtio-recovery-agent up, attached, keeping up with events and within its bounds?",
                      [_host_vars()[0], job_var, *_host_vars()[1:]], panels, time_from="now-24h")


DASHBOARDS = {
    "virtio-fleet-overview.json": fleet_overview,
    "virtio-vm-drilldown.json": vm_drilldown,
    "virtio-agent-health.json": agent_health,
}


def render_all() -> dict[Path, str]:
    files: dict[Path, str] = {}
    for name, build in DASHBOARDS.items():
        files[HERE / name] = json.dumps(build(), indent=2, sort_keys=False) + "\n"
    configmap = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": "virtio-recovery-dashboards",
            "namespace": "virtio-recovery",
            # Grafana's dashboard sidecar (kube-prometheus-stack: sidecar.dashboards.label) loads
            # every ConfigMap with this label; the annotation picks the folder when folderAnnotation is set.
            "labels": {"grafana_dashboard": "1", "app.kubernetes.io/name": "virtio-recovery-agent"},
            "annotations": {"grafana_folder": "virtio"},
        },
        "data": {name: files[HERE / name] for name in DASHBOARDS},
    }
    files[CONFIGMAP] = ("# GENERATED by dashboards/render.py: edit that, then run `python dashboards/render.py`.\n"
                        "# yamllint disable rule:line-length\n"
                        + yaml.dump(configmap, Dumper=_BlockDumper, sort_keys=False, width=1 << 16))
    return files


def main(argv: list[str]) -> int:
    stale = []
    for path, text in render_all().items():
        if "--check" in argv:
            if not path.exists() or path.read_text() != text:
                stale.append(path.name)
        else:
            path.write_text(text)
    if stale:
        print(f"out of date: {', '.join(stale)}; run python dashboards/render.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
