"""`make demo`: the agent watching lab VMs fault and recover, next to the guests' own clocks.

Starts `virtio-recovery-agent run` as a subprocess (real BPF on this host's KVM), runs lab VMs
(lab/harness.py: a tiny virtio driver guest under QEMU) through DEVICE_NEEDS_RESET faults with
different transports and recovery delays, plus one guest that never recovers (stuck, then
abandoned when it exits), then prints selected metrics and one row per episode: what the agent
measured from the host, and what the guest measured with its own TSC. Each VM starts paused
(-S) until QEMU was asked for its devices (query-pci): every device's `device` and `type` labels
must be QEMU's (the agent saw every enumeration); a mismatch makes the demo exit 1.

Needs root, /dev/kvm, QEMU and BCC (`make demo` runs scripts/setup-host first).
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from agent.export.episode_log import read_records

ROOT = Path(__file__).resolve().parents[1]

# Offset of the status register in the register block a device id names (agent.correlate.layout)
STATUS_OFFSET = {"pci-modern": 0x14, "pci-legacy": 18, "mmio": 0x70}


class AgentProcessError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class AgentProcess:
    """`python -m agent run` on a loopback port; stdout (the episode log) goes to a file."""

    def __init__(self, stuck_after_s: float = 60.0, extra_args: Sequence[str] = (),
                 port: Optional[int] = None, tls_ca: Optional[str] = None,
                 state_file: Optional[str] = None) -> None:
        """tls_ca: the agent serves HTTPS (pass --tls-cert/--tls-key in extra_args); trust this.
        state_file: --state-file (default: one of this process's own, so agents started side by
        side do not take over each other's state; pass an old agent's to restart it)."""
        self.port = port or free_port()
        self._ssl = None
        if tls_ca:
            import ssl

            self._ssl = ssl.create_default_context(cafile=tls_ca)
        self.stuck_after_s = stuck_after_s
        self.extra_args = list(extra_args)
        self._tmp = tempfile.TemporaryDirectory(prefix="vra-agent-")
        self.stdout_path = Path(self._tmp.name) / "stdout.jsonl"
        self.stderr_path = Path(self._tmp.name) / "stderr.log"
        self.state_file = state_file or str(Path(self._tmp.name) / "state.json")
        self.proc: Optional[subprocess.Popen] = None
        self.returncode: Optional[int] = None

    @property
    def url(self) -> str:
        return f"{'https' if self._ssl else 'http'}://127.0.0.1:{self.port}"

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 60.0) -> "AgentProcess":
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        cmd = [sys.executable, "-m", "agent", "run", "--listen", self.target,
               "--stuck-after", str(self.stuck_after_s), "--log-format", "text",
               "--state-file", self.state_file, *self.extra_args]
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=err,
                                         stdin=subprocess.DEVNULL, env=env)
        deadline = time.monotonic() + timeout_s
        last = ""
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AgentProcessError(f"agent exited with {self.proc.returncode}: "
                                        f"{self.stderr_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/healthz", timeout=2,
                                            context=self._ssl) as r:
                    if r.status == 200:
                        return self
            except urllib.error.HTTPError as exc:
                last = exc.read().decode(errors="replace").strip()
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)
        self.stop()
        raise AgentProcessError(f"agent not ready after {timeout_s}s ({last}): "
                                f"{self.stderr_tail()}")

    def metrics_text(self) -> str:
        with urllib.request.urlopen(self.url + "/metrics", timeout=10,
                                    context=self._ssl) as r:
            return r.read().decode()

    def records(self) -> list[dict]:
        return read_records(self.stdout_path.read_text(errors="replace").splitlines())

    def stderr_tail(self, n: int = 15) -> str:
        try:
            return "\n".join(self.stderr_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def errors_logged(self) -> list[str]:
        try:
            text = self.stderr_path.read_text(errors="replace")
        except OSError:
            return []
        return [line for line in text.splitlines() if " ERROR " in line]

    def stop(self, timeout_s: float = 20.0) -> int:
        """SIGTERM, wait; returns the exit code (the agent must exit 0 on SIGTERM)."""
        if self.proc is not None and self.returncode is None:
            self.proc.terminate()
            try:
                self.returncode = self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                self.returncode = -9
        return -1 if self.returncode is None else self.returncode

    def close(self) -> None:
        self.stop()
        self._tmp.cleanup()

    def __enter__(self) -> "AgentProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()


# --- matching the agent's episodes with the guests' --------------------------------------------

@dataclass
class Row:
    vm: str
    transport: str
    dev: int
    ep: int
    outcome: str                   # the agent's: recovered | stuck | abandoned | missing
    # what the guest measured, seen by the agent: its first read showing 0x40 -> DRIVER_OK
    agent_s: Optional[float]
    guest_s: Optional[float]       # guest: first read showing NEEDS_RESET -> DRIVER_OK written
    # the agent's recovery time (episode start -> DRIVER_OK, as in the histograms): longer than
    # agent_s by the notify phase (config interrupt -> the guest's read) when evidence is
    # config_interrupt
    agent_total_s: Optional[float] = None
    agent_notify_s: Optional[float] = None
    agent_react_s: Optional[float] = None
    agent_reset_s: Optional[float] = None
    agent_reinit_s: Optional[float] = None
    delay_ms: int = 0
    # the guest's uncertainty: how long its detecting read spent in the host (issue -> return;
    # wide when its vCPU was preempted there)
    guest_window_s: Optional[float] = None


def _device_status_addr(record: dict) -> Optional[int]:
    try:
        base = int(record["device"].rsplit("-0x", 1)[1], 16)
    except (IndexError, ValueError):
        return None
    off = STATUS_OFFSET.get(record["transport"])
    return None if off is None else base + off


def same_device(label: str, transport: str, dev) -> bool:
    """Is the agent's device `label` (with its transport label) the lab guest's device `dev`
    (a lab.harness.DeviceInfo)? A PCI device whose enumeration the agent saw is named by its
    PCI address (`pci-0000:00:03.0`, the guest reports `00:03.0`); any other by its register
    block (`mmio-0x…` / `pio-0x…`), matched by status register address."""
    if label.startswith("pci-"):
        return dev.bdf is not None and label == f"pci-0000:{dev.bdf}"
    return _device_status_addr({"device": label, "transport": transport}) == dev.status_addr


def _phase(rec: dict, a: str, b: str) -> Optional[float]:
    if rec.get(a) is None or rec.get(b) is None:
        return None
    return (rec[b] - rec[a]) / 1e9


def match_episodes(vm_name: str, result, records: list[dict]) -> list[Row]:
    """One Row per guest episode (dev, ep) of `result` (a lab.harness.LabResult), with the agent's
    final record for the same device, in order. Agent records nobody asked for are ignored."""
    mine = [r for r in records if r["vm"] == vm_name]
    rows = []
    for dev in result.devices:
        recs = sorted((r for r in mine if same_device(r["device"], r["transport"], dev)),
                      key=lambda r: (r["start_ns"], r["outcome"] != "stuck"))
        # a stuck episode is logged twice (stuck, then abandoned/recovered): keep the last word
        final: list[dict] = []
        for r in recs:
            if final and final[-1]["start_ns"] == r["start_ns"]:
                final[-1] = r
            else:
                final.append(r)
        for i, g in enumerate(result.episodes_of(dev.idx)):
            rec = final[i] if i < len(final) else None
            guest_s = g.recovery_ns / 1e9 if g.recovery_ns is not None else None
            rows.append(Row(
                vm=vm_name, transport=dev.transport, dev=dev.idx, ep=g.ep,
                outcome=rec["outcome"] if rec else "missing",
                agent_s=_phase(rec, "guest_saw_ns", "driver_ok_ns") if rec else None,
                guest_s=guest_s,
                agent_total_s=rec["recovery_seconds"] if rec else None,
                agent_notify_s=rec.get("notify_seconds") if rec else None,
                agent_react_s=_phase(rec, "guest_saw_ns", "reset_written_ns") if rec else None,
                agent_reset_s=_phase(rec, "reset_written_ns", "reset_done_ns") if rec else None,
                agent_reinit_s=_phase(rec, "reset_done_ns", "driver_ok_ns") if rec else None,
                delay_ms=result.spec.delay_ms,
                guest_window_s=(g.needs_reset_window_ns / 1e9
                                if g.needs_reset_window_ns is not None else None)))
    return rows


def _ms(v: Optional[float]) -> str:
    return "-" if v is None else f"{v * 1e3:.3f}"


def format_table(rows: list[Row]) -> str:
    head = ("vm", "transport", "dev", "ep", "delay", "outcome", "agent ms", "guest ms", "diff ms",
            "notify", "react", "reset", "reinit", "read window")
    lines = [head]
    for r in rows:
        diff = (r.agent_s - r.guest_s) if r.agent_s is not None and r.guest_s is not None else None
        lines.append((r.vm, r.transport, str(r.dev), str(r.ep), f"{r.delay_ms}ms", r.outcome,
                      _ms(r.agent_s), _ms(r.guest_s), _ms(diff), _ms(r.agent_notify_s),
                      _ms(r.agent_react_s),
                      _ms(r.agent_reset_s), _ms(r.agent_reinit_s), _ms(r.guest_window_s)))
    widths = [max(len(row[i]) for row in lines) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) if i < 6 else c.rjust(w)
                               for i, (c, w) in enumerate(zip(row, widths))) for row in lines)


# --- device names and types against QEMU's -------------------------------------------------------

@dataclass
class DeviceCheck:
    vm: str
    device: str                    # the agent's label, or QEMU's name of a device it lacks
    agent_type: Optional[str]      # None: the agent does not export the device
    qemu_type: Optional[str]       # None: QEMU has no such virtio device
    verdict: str                   # ok | unchecked (virtio-mmio type unknown) | MISMATCH

    @property
    def mismatch(self) -> bool:
        return self.verdict == "MISMATCH"


def qemu_virtio_devices(qmp_path: Path, timeout_s: float = 30.0) -> dict[str, str]:
    """Ask a VM started with -S (paused before its first instruction) for its virtio devices,
    then let it run: PCI address (`pci-0000:bb:dd.f`, query-pci) -> virtio type; on a machine
    without PCI (microvm) `qdev:<id>` -> type (x-query-virtio)."""
    from agent.vmm.probe import pci_map, virtio_devices
    from agent.vmm.qmp import QmpClient, QmpConnectError

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            c = QmpClient.connect(str(qmp_path), timeout=10, budget_s=timeout_s)
            break
        except QmpConnectError:
            # not there yet, or there a moment before QEMU listens on it
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)
    with c:
        found = {d.device_key: d.virtio_type for d in pci_map(c) if d.virtio_id is not None}
        if not found:
            found = {f"qdev:{d.qdev_id}": d.name.removeprefix("virtio-")
                     for d in virtio_devices(c)}
        c.execute("cont")
    return found


def agent_devices(metrics_text: str, vm: str) -> dict[str, str]:
    """device -> type of `vm`'s devices, from virtio_device_info."""
    from prometheus_client.parser import text_string_to_metric_families

    return {s.labels["device"]: s.labels["type"]
            for fam in text_string_to_metric_families(metrics_text) for s in fam.samples
            if s.name == "virtio_device_info" and s.labels.get("vm") == vm}


def check_devices(vm: str, qemu: dict[str, str], agent: dict[str, str]) -> list[DeviceCheck]:
    """The agent saw every demo guest enumerate its devices (it starts before them), so each of
    QEMU's virtio PCI functions must be exported under its PCI address with its type, and every
    device the agent exports for the VM must be one of them. virtio-mmio devices (no PCI) are
    named by their register window; their type must be QEMU's or `unknown` (capture does not
    forward the DeviceID read), and they must be as many as QEMU's."""
    rows = []
    pci = {k: t for k, t in qemu.items() if k.startswith("pci-")}
    for key, qtype in sorted(pci.items()):
        atype = agent.get(key)
        rows.append(DeviceCheck(vm, key, atype, qtype, "ok" if atype == qtype else "MISMATCH"))
    others = sorted(d for d in agent if d not in pci)
    mmio_types = sorted(t for k, t in qemu.items() if not k.startswith("pci-"))
    for dev in others:
        atype = agent[dev]
        if pci or not dev.startswith("mmio-"):
            # a PCI VM's device named by its registers: its enumeration was not recognised
            rows.append(DeviceCheck(vm, dev, atype, None, "MISMATCH"))
        elif atype in mmio_types:
            rows.append(DeviceCheck(vm, dev, atype, atype, "ok"))
        else:
            rows.append(DeviceCheck(vm, dev, atype, "/".join(mmio_types) or None,
                                    "unchecked" if atype == "unknown" and mmio_types
                                    else "MISMATCH"))
    if not pci and len(others) != len(mmio_types):
        rows.append(DeviceCheck(vm, f"{len(mmio_types)} virtio-mmio device(s) in QEMU",
                                f"{len(others)} exported", "/".join(mmio_types), "MISMATCH"))
    return rows


def format_device_checks(rows: list[DeviceCheck]) -> str:
    head = ("vm", "device", "agent type", "QEMU type", "result")
    lines = [head] + [(r.vm, r.device, r.agent_type or "(not exported)",
                       r.qemu_type or "(none)", r.verdict) for r in rows]
    widths = [max(len(row[i]) for row in lines) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in lines)


# --- the demo ----------------------------------------------------------------------------------

def demo_specs():
    from lab.harness import GuestSpec

    def named(name: str, **kw):
        # -S: paused until the demo asked QEMU for its devices (qemu_virtio_devices)
        return name, GuestSpec(extra_args=("-name", name, "-S"), qmp=True, **kw)

    # fault_delay_ms: a running guest does not fault again within milliseconds of recovering
    recover = [
        named("demo-modern-fast", transport="modern", scenario="recover", repeat=3, delay_ms=1,
              fault_delay_ms=250),
        # and a virtio-blk the guest only brings up: a device of another type to name
        named("demo-modern-slow", transport="modern", scenario="recover", devices=2, delay_ms=30,
              extra="blk"),
        named("demo-mmio", transport="mmio", scenario="recover", repeat=2, delay_ms=8,
              fault_delay_ms=250),
        named("demo-modern-intx", transport="modern", scenario="recover", irq="intx",
              delay_ms=3),
    ]
    stuck = named("demo-stuck", transport="modern", scenario="stuck", hold_ms=3500)
    return recover, stuck


SHOWN_METRICS = (
    "virtio_episodes_ended_total", "virtio_recovery_duration_seconds_count",
    "virtio_recovery_duration_seconds_sum", "virtio_recovery_phase_duration_seconds_sum",
    "virtio_devices_stuck", "virtio_device_stuck", "virtio_device_unrecovered_seconds",
    "virtio_agent_events_total", "virtio_agent_hook_attached",
    "virtio_agent_kernel_events_filtered_total",
)


def selected_lines(text: str, names: Sequence[str] = SHOWN_METRICS) -> list[str]:
    out = []
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in names and not line.endswith(" 0.0"):
            out.append(line)
    return out


def main() -> int:
    from agent.vmm.probe import ProbeFormatError
    from agent.vmm.qmp import QmpError
    from lab.harness import LabError, LabVM

    t0 = time.monotonic()
    if os.geteuid() != 0:
        print("demo: needs root (BPF); run `sudo make demo`", file=sys.stderr)
        return 1
    recover, (stuck_name, stuck_spec) = demo_specs()
    print("starting the agent (compiling BPF)...", flush=True)
    try:
        agent = AgentProcess(stuck_after_s=1.5).start()
    except AgentProcessError as exc:
        print(f"demo: {exc}\nrun `virtio-recovery-agent doctor`", file=sys.stderr)
        return 1
    results = {}
    qemu_devices: dict[str, dict[str, str]] = {}
    stuck_snapshot: list[str] = []
    stuck_vm = None
    try:
        print(f"agent ready on {agent.url} after {time.monotonic() - t0:.1f}s; "
              f"starting {stuck_name} (never recovers) and {len(recover)} recovering VMs",
              flush=True)
        stuck_vm = LabVM.start(stuck_spec)
        qemu_devices[stuck_name] = qemu_virtio_devices(stuck_vm.qmp_path)

        def stuck_seen() -> bool:
            """While the stuck guest holds, past --stuck-after, its gauge goes up."""
            nonlocal stuck_snapshot
            if not any(ln.startswith("virtio_devices_stuck ") for ln in stuck_snapshot) \
                    and stuck_vm.proc.poll() is None:
                stuck_snapshot = [line for line in selected_lines(agent.metrics_text())
                                  if "stuck" in line or "unrecovered" in line]
            return any(ln.startswith("virtio_devices_stuck ") for ln in stuck_snapshot)

        for name, spec in recover:
            with LabVM.start(spec) as vm:
                qemu_devices[name] = qemu_virtio_devices(vm.qmp_path)
                results[name] = vm.wait(30).raise_for_error()
            stuck_seen()
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline and stuck_vm.proc.poll() is None and not stuck_seen():
            time.sleep(0.2)
        results[stuck_name] = stuck_vm.wait(30).raise_for_error()
        time.sleep(0.5)  # reorder window + tick: the exit becomes an abandoned episode
        final_metrics = agent.metrics_text()
    except (LabError, AgentProcessError, QmpError, ProbeFormatError, OSError) as exc:
        print(f"demo: a lab VM failed: {exc}", file=sys.stderr)
        if stuck_vm is not None:
            stuck_vm.kill()
        agent.close()
        return 1
    code = agent.stop()
    records = agent.records()
    errors = agent.errors_logged()
    agent.close()

    print("\n== while demo-stuck was holding (stuck threshold 1.5 s) ==")
    print("\n".join(stuck_snapshot) or "(no stuck series seen)")
    print("\n== selected metrics at the end ==")
    print("\n".join(selected_lines(final_metrics)))
    rows = []
    for name, _spec in recover + [(stuck_name, stuck_spec)]:
        rows += match_episodes(name, results[name], records)
    print("\n== episodes: agent (host, BPF) vs guest (its own TSC) ==")
    print(format_table(rows))
    print("\nagent ms: the guest's first read showing 0x40 to its DRIVER_OK write, as the host saw "
          "them;\nguest ms: the same, timed by the guest's TSC;\nnotify: the config interrupt "
          "(episode start) to that read; the agent's recovery time (metrics, log) is notify + "
          "agent ms.")
    print("\nepisode log (stdout of `run`), first lines:")
    for rec in records[:3]:
        print("  " + json.dumps(rec, separators=(",", ":")))
    checks = []
    for name, _spec in recover + [(stuck_name, stuck_spec)]:
        checks += check_devices(name, qemu_devices[name], agent_devices(final_metrics, name))
    bad = [c for c in checks if c.mismatch]
    print("\n== devices: the agent's device and type labels vs QEMU (query-pci, asked before "
          "each guest ran) ==")
    print(format_device_checks(checks))
    unchecked = sum(c.verdict == "unchecked" for c in checks)
    print(f"device check: {len(checks)} devices, {len(bad)} mismatch(es)"
          + (f"; {unchecked} virtio-mmio type(s) unknown to the agent (not checked)"
             if unchecked else ""))
    if errors:
        print(f"\nagent logged {len(errors)} error(s), first: {errors[0]}")
    print(f"\nagent exit code on SIGTERM: {code}; demo took {time.monotonic() - t0:.1f}s")
    missing = [r for r in rows if r.outcome == "missing"]
    if bad:
        print(f"demo: {len(bad)} device(s) misnamed or mistyped by the agent", file=sys.stderr)
    return 0 if code == 0 and not missing and not bad else 1


if __name__ == "__main__":
    sys.exit(main())

