"""One real-Linux run: boot, traffic, optional fault, QEMU's trace converted to agent.events,
filtered as capture would, and correlated; the summary `python -m lab linux` prints.

    result = run_linux("rng", fault=True)     # LinuxRun; result.summary() is the JSON object
"""
from __future__ import annotations

import dataclasses
import json
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

from agent import events as E
from agent.correlate import Correlator, CorrelatorConfig
from agent.model import EpisodeEnded, NeedsResetSuspected
from agent.replay import episode_json
from agent.vmm.qmp import QmpClient, QmpError
from agent.vmm.vmident import identify_vm
from lab.linux.fault import QUEUES, Fault, FaultError, break_queue
from lab.linux.forward import forwarded
from lab.linux.trace import convert
from lab.linux.vm import QDEV_ID, QOM_PATH, GuestReport, LinuxVM, LinuxVmError, parse_serial

BOOT_TIMEOUT_S = 300.0      # TCG on a busy 2-core host: ~10 s alone, much more when shared
ROUND_TIMEOUT_S = 120.0
QMP_TIMEOUT_S = 60.0        # each command
QMP_BUDGET_S = 120.0        # a session (the fault's holds the RAM search, 1-3 s measured)
TICK_NS = 100_000_000      # how often correlation is ticked between events (run: its poll loop)
# QEMU's error lines: "[<timestamp> ][qemu-system-x86_64: ]<message>" (virtio_error's come bare)
_QEMU_MSG = re.compile(r"^(?:\d{4}-\d\d-\d\dT\S+ )?(?:qemu-system-x86_64: )?(.+)$")


@dataclass
class LinuxRun:
    device: str
    fault: Optional[Fault]
    report: GuestReport
    pci_bdf: str                          # QEMU's query-pci for dev0: "0000:00:02.0"
    vmm_status: dict[str, Any]            # x-query-virtio-status of dev0 before the guest ended
    qemu_messages: list[str]
    events: list[E.Event]                 # what capture would have forwarded
    raw_events: int                       # converted before filtering
    correlation: dict[str, Any] = field(default_factory=dict)
    wall_s: float = 0.0
    workdir: Optional[Path] = None

    @property
    def qemu_virtio_errors(self) -> list[str]:
        return [m for m in self.qemu_messages
                if not m.startswith("warning:") and "terminating on signal" not in m]

    def guest_devices(self, phase: str = "report") -> list[dict[str, Any]]:
        return [{"pci": d.pci, "type": d.type, "name": d.name, "status": d.status,
                 "driver": d.driver} for d in self.report.devices.get(phase, [])]

    def summary(self) -> dict[str, Any]:
        return {
            "device": self.device,
            "guest_devices": self.guest_devices(),
            "agent_devices": self.correlation.get("devices", []),
            "agent_needs_reset": self.correlation.get("needs_reset", []),
            "qemu_virtio_errors": self.qemu_virtio_errors,
            "fault": self.fault.to_dict() if self.fault else None,
            "qemu_pci": self.pci_bdf,
            "vmm_status": {k: self.vmm_status.get(k) for k in ("status", "broken")},
            "guest_status_at_end": [
                {"pci": d.pci, "status": d.status} for d in self.report.devices.get("final", [])],
            "guest_irqs": {ph: [dataclasses.asdict(i) for i in irqs]
                           for ph, irqs in self.report.irqs.items() if ph in ("report", "final")},
            "events": {"converted": self.raw_events, "forwarded": len(self.events)},
            "wall_s": round(self.wall_s, 1),
            "workdir": str(self.workdir) if self.workdir else None,
        }


def qemu_messages(text: str) -> list[str]:
    out = []
    for line in text.splitlines():
        m = _QEMU_MSG.match(line.strip())
        if m:
            out.append(m[1])
    return out


def _needs_reset_status(vmm_status: dict[str, Any]) -> bool:
    st = vmm_status.get("status") or {}
    names = st.get("statuses", []) if isinstance(st, dict) else []
    return any("NEEDS_RESET" in str(n) for n in names)


def feed_ticked(c: Correlator, events: Iterable[E.Event],
                take: Callable[[list], None]) -> None:
    """Feed `events` to `c`, ticking it every TICK_NS of event time in between as `run`'s poll
    loop does; the outputs of each call go to take()."""
    next_tick = None
    for ev in events:
        while next_tick is not None and next_tick < ev.ts_ns:
            take(c.tick(next_tick))
            next_tick += TICK_NS
        if next_tick is None:
            next_tick = ev.ts_ns + TICK_NS
        take(c.feed(ev))


def correlate(events: Iterable[E.Event], vmm: Optional[dict[str, bool]] = None,
              config: Optional[CorrelatorConfig] = None) -> dict[str, Any]:
    """Run events through the real correlation, as `replay` does (feed, flush, let the windows
    close), and keep what it reported. `vmm` maps an agent device name to what the VMM says of
    NEEDS_RESET, given to Correlator.vmm_status when a suspicion comes (as `run` does)."""
    config = config or CorrelatorConfig()
    c = Correlator(config)
    events = list(events)
    last = max((ev.ts_ns for ev in events), default=0)
    pid = events[-1].pid if events else None
    devices: dict[str, str] = {}
    needs_reset: list[dict[str, Any]] = []

    def take(outputs: list) -> None:
        for o in outputs:
            if isinstance(o, NeedsResetSuspected):
                needs_reset.append({"device": o.device, "evidence": "suspicion",
                                    "ts_ns": o.ts_ns, "since_ns": o.since_ns})
                if vmm is not None and o.device in vmm:
                    take(c.vmm_status(o.vm.pid, o.device, o.ts_ns, vmm[o.device]))
            elif isinstance(o, EpisodeEnded):
                needs_reset.append(episode_json(o.episode))

    feed_ticked(c, events, take)
    take(c.flush())
    take(c.tick(last + config.notify_window_ns + config.reorder_window_ns + 1))
    # an exited VM's devices stay in the snapshot (retain_exited_ns); its open episodes ended
    # `abandoned` at the exit (EpisodeEnded above)
    for view in c.snapshot(last).devices:
        devices[view.device] = view.type
        if view.open_episode is not None:
            needs_reset.append(episode_json(view.open_episode))
    return {
        "devices": [{"device": d, "type": t} for d, t in sorted(devices.items())],
        "needs_reset": needs_reset,
        "stats": {k: v for k, v in c.stats().items() if isinstance(v, int)},
        "pid": pid,
    }


def trace_events(trace: Path, pid: int, name: str, start_time: int) -> tuple[list[E.Event], int]:
    """(forwarded events with VmStarted first and ProcessExit last, converted count)."""
    with open(trace, encoding="utf-8", errors="replace") as f:
        raw = list(convert(f, pid))
    if not raw:
        return [], 0
    head = E.VmStarted(raw[0].ts_ns, pid, start_time, name)
    tail = E.ProcessExit(raw[-1].ts_ns + 1, pid)
    return list(forwarded([head] + raw + [tail])), len(raw)


def write_events(path: Path, events: Iterable[E.Event]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for ev in events:
            f.write(E.to_json(ev) + "\n")


def run_linux(device: str, fault: bool, workdir: Optional[Path] = None,
              rounds: int = 6) -> LinuxRun:
    t0 = time.monotonic()
    keep = workdir is not None
    if workdir is None:
        workdir = Path(tempfile.mkdtemp(prefix=f"vra-linux-{device}-"))
    workdir.mkdir(parents=True, exist_ok=True)
    vm = LinuxVM(device, workdir, rounds=rounds)
    done = None
    flt: Optional[Fault] = None
    vmm_status: dict[str, Any] = {}
    with vm:
        ident = identify_vm(vm.pid, ts_ns=0)
        start_time = ident.start_time if ident is not None else 0
        vm.wait_phase("ready", BOOT_TIMEOUT_S)
        try:
            # one session per step: a session has an overall budget
            with _qmp(vm) as qmp:
                bdf = _qemu_bdf(qmp.execute("query-pci"))
            if fault:
                try:
                    with _qmp(vm) as qmp:
                        flt = break_queue(qmp, vm.ram, QOM_PATH, QUEUES[device])
                except QmpError:
                    # never leave the guest stopped: resume it in a session of its own
                    with _qmp(vm) as qmp:
                        qmp.execute("cont")
                    raise
            vm.wait_phase(f"round {rounds + 1}", ROUND_TIMEOUT_S + 2 * rounds)
            with _qmp(vm) as qmp:
                vmm_status = qmp.execute("x-query-virtio-status", {"path": QOM_PATH})
        except QmpError as exc:
            raise LinuxVmError(f"QMP: {exc}") from None
        vm.wait_phase("done", ROUND_TIMEOUT_S)
        vm.wait_exit(ROUND_TIMEOUT_S)
        done = parse_serial(vm.serial_text())
        messages = qemu_messages(vm.qemu_log())
    events, raw = trace_events(vm.trace, vm.pid, vm.name, start_time)
    write_events(workdir / "events.jsonl", events)
    vmm = {f"pci-{bdf}": _needs_reset_status(vmm_status)} if bdf else {}
    result = LinuxRun(device=device, fault=flt, report=done, pci_bdf=bdf,
                      vmm_status=vmm_status, qemu_messages=messages, events=events,
                      raw_events=raw, workdir=workdir)
    result.correlation = correlate(events, vmm)
    result.wall_s = time.monotonic() - t0
    if not keep:
        # the events are in `result`; the work directory (the trace: ~5 MB) goes
        shutil.rmtree(workdir, ignore_errors=True)
        result.workdir = None
    return result


def _qmp(vm: LinuxVM) -> QmpClient:
    return QmpClient.connect(str(vm.qmp), timeout=QMP_TIMEOUT_S, budget_s=QMP_BUDGET_S)


def _qemu_bdf(query_pci: list[dict[str, Any]]) -> str:
    for bus in query_pci:
        for dev in bus.get("devices", []):
            if dev.get("qdev_id") == QDEV_ID:
                return f"0000:{bus.get('bus', 0):02x}:{dev['slot']:02x}.{dev['function']:x}"
    return ""


def main(device: str, fault: bool, workdir: Optional[Path], rounds: int) -> int:
    import sys

    try:
        result = run_linux(device, fault, workdir, rounds)
    except (LinuxVmError, FaultError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for line in result.report.errors:
        print(f"# guest error: {line}", file=sys.stderr)
    for m in result.qemu_messages:
        print(f"# qemu: {m}", file=sys.stderr)
    print(json.dumps(result.summary()))
    return 0
