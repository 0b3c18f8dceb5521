"""NEEDS_RESET that the guest never reads: suspicion from kernel evidence, VMM confirmation,
and retention of exited VMs' devices (agent/correlate, agent/vmm/confirm)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent import events as E
from agent.vmm.confirm import match
from agent.correlate import Correlator, CorrelatorConfig
from agent.model import (
    EpisodeEnded, EpisodeStuck, Evidence, NeedsResetSuspected, Outcome, WatchInterrupt,
)
from agent.vmm.probe import ProbedDevice, VmProbe, parse_pci, parse_virtio_status, VirtioDevice
from pciguest import Function, Guest as PciGuest

MS = 1_000_000
S = 1_000_000_000
PID = 7
BASE = 0xC0004000          # modern common cfg (QEMU: notify at BASE + 0x3000)
STATUS, GEN, NOTIFY = BASE + 0x14, BASE + 0x15, BASE + 0x3000
DEV = "pci-0000:00:03.0"   # the guest enumerated it (pciguest): named by its PCI address
CONFIG_VEC, QUEUE_VEC = 0x40, 0x41
FIXTURES = Path(__file__).parent / "fixtures" / "qmp"


class Guest:
    """Events of a one-device modern virtio-pci VM (like the lab guest's). `programmed`: the
    guest's PCI enumeration and MSI-X programming (config vector CONFIG_VEC in entry 0, queue 0
    on QUEUE_VEC) happen where the agent sees them, before the driver initialises."""

    def __init__(self, t0: int = 1 * S, pid: int = PID, start_time: int = 100,
                 base: int = BASE, programmed: bool = True) -> None:
        self.t, self.pid, self.base, self.programmed = t0, pid, base, programmed
        self.events: list[E.Event] = [E.VmStarted(t0, pid, start_time, f"vm{pid}")]

    def at(self, dt: int = 1_000) -> int:
        self.t += dt
        return self.t

    def program(self) -> None:
        fn = Function(3 << 3, bar4=self.base)
        PciGuest(self.pid, self.pid + 1, self.at, self.events.append).program(
            fn, CONFIG_VEC, QUEUE_VEC)

    def status(self, op: str, value: int, dt: int = 10_000) -> None:
        self.events.append(E.RegisterAccess(self.at(dt), self.pid, self.pid + 1, E.Space.MMIO, op,
                                            self.base + 0x14, 1, value))

    def init(self) -> None:
        if self.programmed:
            self.program()
            self.programmed = False
        for v in (0, 1, 3, 11, 15):
            self.status(E.Op.WRITE, v)

    def msi(self, vector: int, dt: int = 10_000) -> int:
        """An MSI and its delivery (the LAPIC accepts it): the delivery's time."""
        t = self.at(dt)
        self.events.append(E.MsiInjected(t, self.pid, self.pid, 0xFEE00000, vector))
        self.events.append(E.ApicAccepted(self.at(1), self.pid, self.pid, 0, vector))
        return self.t

    def generation(self, value: int, dt: int = 10_000) -> None:
        self.events.append(E.RegisterAccess(self.at(dt), self.pid, self.pid + 1, E.Space.MMIO,
                                            E.Op.READ, self.base + 0x15, 1, value,
                                            register=E.Register.CONFIG_GENERATION))

    def kicks(self, n: int, every: int = 100 * MS, completion: int | None = None) -> None:
        for _ in range(n):
            self.events.append(E.QueueNotify(self.at(every), self.pid, self.pid + 1,
                                             self.base + 0x3000))
            if completion is not None:
                self.msi(completion, dt=50_000)

    def exit(self, dt: int = 10 * MS) -> None:
        self.events.append(E.ProcessExit(self.at(dt), self.pid))


def run(events, config: CorrelatorConfig | None = None, until: int | None = None):
    c = Correlator(config or CorrelatorConfig())
    out = []
    for ev in events:
        out += c.feed(ev)
    if until is not None:
        out += c.tick(until)
    return c, out


def of(out, cls):
    return [o for o in out if isinstance(o, cls)]


def linux_fault(g: Guest, kicks: int = 20) -> int:
    """init, the config MSI of virtio_error(), a changed config_generation, kicks forever."""
    g.init()
    g.generation(0, dt=5 * MS)          # probe-time config read (no MSI before it)
    t_irq = g.msi(CONFIG_VEC, dt=500 * MS)
    g.generation(1, dt=3 * MS)
    g.kicks(kicks)
    return t_irq


def test_linux_guest_fault_is_suspected_once_from_kernel_evidence():
    g = Guest()
    t_irq = linux_fault(g)
    c, out = run(g.events, until=g.t + 100 * MS)
    [s] = of(out, NeedsResetSuspected)
    assert s.device == DEV and s.since_ns == t_irq and s.vm.name == f"vm{PID}"
    # the config vector is the one the guest programmed in MSI-X entry msix_config
    assert WatchInterrupt(PID, vector=CONFIG_VEC) in out
    [view] = c.snapshot(g.t).devices
    assert view.suspected_since_ns == t_irq and view.open_episode is None
    assert view.config_interrupts_total == 1 and view.needs_reset_total == 0
    assert c.snapshot(g.t).suspicions == 1
    # later ticks do not repeat it
    assert of(c.tick(g.t + 5 * S), NeedsResetSuspected) == []


def test_suspicion_needs_the_window_of_kicks_without_completion():
    g = Guest()
    linux_fault(g, kicks=5)     # 0.5 s of kicks < the 1 s window
    c, out = run(g.events, until=g.t)
    assert of(out, NeedsResetSuspected) == []
    g2 = Guest()
    linux_fault(g2, kicks=5)
    c2, out2 = run(g2.events, until=g2.t + 800 * MS)   # time passes without events
    assert len(of(out2, NeedsResetSuspected)) == 1


def test_config_change_with_completions_is_not_suspected():
    """set_link-like: config MSI and a new generation, but kicks complete (queue MSIs)."""
    g = Guest()
    g.init()
    g.msi(CONFIG_VEC, dt=500 * MS)
    g.generation(1, dt=3 * MS)
    g.kicks(30, completion=QUEUE_VEC)
    c, out = run(g.events, until=g.t + 5 * S)
    assert of(out, NeedsResetSuspected) == []
    assert c.snapshot(g.t).devices[0].suspected_since_ns is None
    assert c.stats()["suspicions_cleared_by_progress"] == 1


def test_progress_after_the_suspicion_withdraws_it():
    g = Guest()
    linux_fault(g)
    g.kicks(3, completion=QUEUE_VEC)
    c, out = run(g.events, until=g.t + 100 * MS)
    assert len(of(out, NeedsResetSuspected)) == 1
    assert c.snapshot(g.t).devices[0].suspected_since_ns is None


def test_an_idle_device_is_not_suspected_and_the_wait_is_dropped():
    g = Guest()
    linux_fault(g, kicks=0)
    c, out = run(g.events, until=g.t + 31 * S)
    assert of(out, NeedsResetSuspected) == [] and c.stats()["pending_suspicions"] == 0


def test_a_guest_that_reads_status_is_judged_by_the_state_machine():
    """NetKVM-like: the status read shows 0x40: an ordinary episode, no suspicion."""
    g = Guest()
    linux_fault(g, kicks=3)
    g.status(E.Op.READ, 0x4F)
    g.kicks(20)
    c, out = run(g.events, until=g.t + 100 * MS)
    assert of(out, NeedsResetSuspected) == []
    [view] = c.snapshot(g.t).devices
    assert view.open_episode is not None and view.open_episode.evidence == Evidence.STATUS_READ


def test_no_vector_is_learned_from_a_generation_read_before_driver_ok():
    g = Guest(programmed=False)
    for v in (0, 1, 3):
        g.status(E.Op.WRITE, v)
    g.msi(QUEUE_VEC)
    g.generation(0)
    c, out = run(g.events, until=g.t + 100 * MS)
    assert of(out, WatchInterrupt) == []


def test_vmm_confirmation_opens_a_vmm_episode_that_ends_like_any_other():
    g = Guest()
    t_irq = linux_fault(g)
    cfg = CorrelatorConfig(stuck_after_ns=5 * S)
    c, out = run(g.events, cfg, until=g.t + 100 * MS)
    assert len(of(out, NeedsResetSuspected)) == 1
    out = c.vmm_status(PID, DEV, g.t + 110 * MS, needs_reset=True, type="rng")
    [view] = c.snapshot(g.t + 120 * MS).devices
    ep = view.open_episode
    assert ep.evidence == Evidence.VMM and ep.start_ns == t_irq and ep.guest_saw_ns is None
    assert view.type == "rng" and view.suspected_since_ns is None and view.needs_reset_total == 1
    assert c.snapshot(g.t).episodes_started == {Evidence.VMM: 1}
    # stuck, then the guest finally resets (0 ... DRIVER_OK): recovered
    stuck = of(c.tick(t_irq + 6 * S), EpisodeStuck)
    assert len(stuck) == 1 and stuck[0].episode.evidence == Evidence.VMM
    g2 = Guest()
    g2.events, g2.t = [], t_irq + 7 * S
    g2.init()
    out = []
    for ev in g2.events:
        out += c.feed(ev)
    out += c.flush()
    [ended] = of(out, EpisodeEnded)
    assert ended.episode.outcome == Outcome.RECOVERED and ended.episode.evidence == Evidence.VMM
    assert ended.episode.reset_written_ns is not None


def test_vmm_confirmed_episode_is_abandoned_on_exit():
    g = Guest()
    linux_fault(g)
    c, out = run(g.events, until=g.t + 100 * MS)
    c.vmm_status(PID, DEV, g.t + 110 * MS, needs_reset=True)
    g.events = []
    g.exit(dt=200 * MS)
    out = []
    for ev in g.events:
        out += c.feed(ev)
    out += c.flush()
    [ended] = of(out, EpisodeEnded)
    assert ended.episode.outcome == Outcome.ABANDONED and ended.episode.evidence == Evidence.VMM


def test_vmm_saying_clear_drops_the_suspicion_without_an_episode():
    g = Guest()
    linux_fault(g)
    c, _ = run(g.events, until=g.t + 100 * MS)
    assert of(c.vmm_status(PID, DEV, g.t, needs_reset=False), EpisodeEnded) == []
    [view] = c.snapshot(g.t).devices
    assert view.suspected_since_ns is None and view.open_episode is None
    assert c.vmm_status(PID, "mmio-0x1", g.t, needs_reset=True) == []    # unknown device


# -- retention of exited VMs ------------------------------------------------------------------

def test_exited_vm_devices_stay_for_the_retention_time_then_go():
    g = Guest()
    g.init()
    g.status(E.Op.READ, 0x4F)
    g.exit()
    cfg = CorrelatorConfig(retain_exited_ns=120 * S)
    c, out = run(g.events, cfg)
    out += c.flush()
    exit_ns = g.t
    [view] = c.snapshot(exit_ns + 1 * S).devices
    assert view.exited and view.needs_reset_total == 1 and view.resets_total == 1
    assert view.open_episode is None and c.snapshot(exit_ns).vms == 0
    c.tick(exit_ns + 119 * S)
    assert len(c.snapshot(exit_ns + 119 * S).devices) == 1
    c.tick(exit_ns + 121 * S)
    assert c.snapshot(exit_ns + 121 * S).devices == [] and c.stats()["retired_vms"] == 0


def test_retention_is_bounded_by_max_vms_and_off_with_zero():
    events = []
    for i in range(6):
        g = Guest(t0=(i + 1) * S, pid=100 + i)
        g.init()
        g.exit()
        events += g.events
    c, _ = run(events, CorrelatorConfig(max_vms=4, reorder_window_ns=0))
    c.flush()
    snap = c.snapshot(7 * S)
    assert len(snap.devices) == 4 and all(v.exited for v in snap.devices)
    assert sorted(v.vm.pid for v in snap.devices) == [102, 103, 104, 105]
    c0, _ = run(events, CorrelatorConfig(retain_exited_ns=0))
    c0.flush()
    assert c0.snapshot(7 * S).devices == []


def test_a_reused_pid_gets_a_fresh_device_while_the_old_one_is_retained():
    g = Guest()
    g.init()
    g.exit()
    g2 = Guest(t0=g.t + S, start_time=999)
    g2.init()
    c, _ = run(g.events + g2.events)
    c.flush()
    views = c.snapshot(g2.t).devices
    assert sorted((v.vm.start_time, v.exited) for v in views) == [(100, True), (999, False)]


# -- matching the VMM's answer to a device (recorded QEMU 7.2 replies of the lab guest) -------

def _ret(name: str):
    return json.loads((FIXTURES / f"{name}.json").read_bytes())["return"]


def lab_probe() -> VmProbe:
    pci = parse_pci(_ret("query-pci.lab"))
    devices = []
    for qid, fix in (("vrng0", "lab-rng0"), ("net0", "lab-net0")):
        path = f"/machine/peripheral/{qid}/virtio-backend"
        v = VirtioDevice(path, "virtio-rng" if qid == "vrng0" else "virtio-net")
        pd = [p for p in pci if p.qdev_id == qid]
        devices.append(ProbedDevice(v, parse_virtio_status(path, _ret(f"x-query-virtio-status.{fix}")),
                                    pd[0] if pd else None))
    return VmProbe(None, tuple(devices), tuple(pci))


def test_match_maps_the_common_cfg_base_to_the_probed_device():
    probe = lab_probe()
    # com1.lab.log: vrng0 common cfg at 0xc0004000 (broken), net0 at 0xc0014000 (healthy)
    rng = match(probe, "mmio-0xc0004000")
    net = match(probe, "mmio-0xc0014000")
    assert rng.status.needs_reset and rng.status.type == "rng"
    assert not net.status.needs_reset and net.status.type == "net"
    assert match(probe, "mmio-0xdead0000") is None and match(probe, "vhost-fd3") is None


@pytest.mark.parametrize("bad", ["", "mmio-0xzz", "pci-0000:00:03.0"])
def test_match_rejects_ids_that_are_not_addresses(bad):
    assert match(lab_probe(), bad) is None


# -- VmmConfirmer: only on suspicion, rate-limited per VM, off the loop ------------------------

def _suspicion(pid: int = PID, device: str = "mmio-0xc0004000", start_time: int = 100):
    from agent.model import VmIdentity
    vm = VmIdentity(pid=pid, start_time=start_time, name=f"vm{pid}")
    return NeedsResetSuspected(0, vm, device, 0)


# Condition waits return as soon as the condition holds; the limit only stops a hung test.
WAIT_S = 60.0


def _wait_verdicts(confirmer, n: int, timeout_s: float = WAIT_S):
    import time
    got, deadline = [], time.monotonic() + timeout_s
    while len(got) < n and time.monotonic() < deadline:
        got += confirmer.poll()
        time.sleep(0.01)
    return got


def _wait_until(condition, what: str, timeout_s: float = WAIT_S) -> None:
    import time
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"still not {what} after {timeout_s} s"
        time.sleep(0.01)


def test_confirmer_asks_once_per_vm_interval_and_answers_waiting_devices():
    from agent.vmm.confirm import VmmConfirmer

    clock = [0.0]
    probes = []

    def probe(path, timeout):
        probes.append(path)
        return lab_probe()          # recorded QEMU 7.2 replies: vrng0 broken, net0 healthy

    c = VmmConfirmer(interval_s=10, socket_for=lambda vm: f"/run/{vm.name}.qmp", probe_fn=probe)
    c.limiter._clock = lambda: clock[0]
    assert c.poll() == [] and probes == []          # nothing suspicious: no QMP traffic
    c.submit(_suspicion())
    [v] = _wait_verdicts(c, 1)
    assert (v.device, v.needs_reset, v.type) == ("mmio-0xc0004000", True, "rng")
    # a second device of the same VM within the interval waits, then rides the next probe
    c.submit(_suspicion(device="mmio-0xc0014000"))
    # rate-limited: poll() dispatches nothing (no probe), so no verdict can come
    assert c.skipped["rate_limited"] == 1 and c.poll() == [] and not c._inflight
    assert len(probes) == 1
    clock[0] = 11.0
    [v2] = _wait_verdicts(c, 1)
    assert (v2.device, v2.needs_reset, v2.type) == ("mmio-0xc0014000", False, "net")
    assert probes == ["/run/vm7.qmp", "/run/vm7.qmp"]
    assert c.queries == {"needs_reset": 1, "clear": 1}
    c.close()


def test_confirmer_without_a_socket_or_with_a_failing_monitor_counts_and_moves_on():
    from agent.vmm.confirm import VmmConfirmer
    from agent.vmm.qmp import QmpTimeout

    c = VmmConfirmer(socket_for=lambda vm: None, probe_fn=lambda p, t: lab_probe())
    c.submit(_suspicion())
    _wait_until(lambda: c.skipped["no_socket"] == 1 and not c._inflight, "counted as no_socket")
    assert c.poll() == [] and sum(c.queries.values()) == 0

    def busy(path, timeout):
        raise QmpTimeout("no greeting (monitor busy)")

    c2 = VmmConfirmer(socket_for=lambda vm: "/x", probe_fn=busy)
    c2.submit(_suspicion(device="mmio-0xdead0000"))
    _wait_until(lambda: c2.queries["error"] == 1 and not c2._inflight, "counted as an error")
    assert c2.poll() == []
    c3 = VmmConfirmer(socket_for=lambda vm: "/x", probe_fn=lambda p, t: lab_probe())
    c3.submit(_suspicion(device="mmio-0xdead0000"))
    _wait_until(lambda: c3.queries["unmatched"] == 1 and not c3._inflight, "counted unmatched")
    assert c3.poll() == []
    for x in (c, c2, c3):
        x.close()


def test_confirmer_forgets_an_exited_vm():
    from agent.vmm.confirm import VmmConfirmer

    c = VmmConfirmer(interval_s=10, socket_for=lambda vm: "/x", probe_fn=lambda p, t: lab_probe())
    c.submit(_suspicion())
    _wait_verdicts(c, 1)
    c.submit(_suspicion(device="mmio-0xc0014000"))     # rate-limited: waits
    c.forget_pid(PID)
    # the waiting device went with its VM: nothing is left to dispatch or to answer
    assert c.poll() == [] and not c._inflight and len(c.limiter) == 0
    c.close()


def test_virtio_mmio_progress_is_seen_through_interrupt_status_reads():
    """virtio-mmio: config and queue interrupts share one line; the InterruptACK write with the
    configuration-change bit is the config interrupt (when it was raised is unknown: the line's
    GSI is not in any register), InterruptStatus reads with the used-buffer bit are progress
    (capture forwards identical ones once per interval)."""
    base = 0xFEB02E00
    g = Guest(base=base - 0x70 + 0x14, programmed=False)   # status at base + 0x70

    def mmio(op, off, value, dt=10_000, reg=E.Register.UNKNOWN):
        g.events.append(E.RegisterAccess(g.at(dt), PID, PID + 1, E.Space.MMIO, op, base + off,
                                         4, value, register=reg))

    for v in (0, 1, 3, 11, 15):
        mmio(E.Op.WRITE, 0x70, v)
    g.msi(0x44, dt=500 * MS)
    mmio(E.Op.READ, 0x60, 0x2, reg=E.Register.ISR)            # config change
    mmio(E.Op.WRITE, 0x64, 0x2, reg=E.Register.INTERRUPT_ACK)
    t_irq = g.t
    mmio(E.Op.READ, 0xFC, 1, dt=1 * MS, reg=E.Register.CONFIG_GENERATION)
    healthy = list(g.events)
    for i in range(20):
        g.events.append(E.QueueNotify(g.at(100 * MS), PID, PID + 1, base + 0x50))
        g.msi(0x44, dt=50_000)
        mmio(E.Op.READ, 0x60, 0x1, dt=20_000, reg=E.Register.ISR)
        mmio(E.Op.WRITE, 0x64, 0x1, reg=E.Register.INTERRUPT_ACK)
    c, out = run(g.events, until=g.t + 2 * S)
    assert of(out, NeedsResetSuspected) == []
    [view] = c.snapshot(g.t).devices
    assert view.transport == "mmio" and view.config_interrupts_total >= 1
    # the same without the InterruptStatus reads: suspected, since the config interrupt
    g.events = healthy
    g.t = healthy[-1].ts_ns
    for i in range(20):
        g.events.append(E.QueueNotify(g.at(100 * MS), PID, PID + 1, base + 0x50))
    c, out = run(g.events, until=g.t + 2 * S)
    [s] = of(out, NeedsResetSuspected)
    assert s.device == f"mmio-0x{base:x}" and s.since_ns == t_irq


def test_a_busy_queue_vector_is_not_taken_for_the_config_vector():
    g = Guest(programmed=False)
    g.init()
    for _ in range(3):
        g.msi(QUEUE_VEC, dt=250 * MS)       # a queue vector that keeps firing
    g.generation(5, dt=1 * MS)              # a config read for another reason
    c, out = run(g.events, until=g.t + 100 * MS)
    assert of(out, WatchInterrupt) == [] and c.snapshot(g.t).devices[0].config_interrupts_total == 0


def test_interrupts_of_a_device_found_from_traffic_are_never_guessed():
    """No enumeration seen (the agent started later, no QMP): an MSI right before a changed
    config_generation is not taken for the config vector; the device is watched, its
    interrupts are unknown, and nothing is suspected from them."""
    g = Guest(programmed=False)
    linux_fault(g)
    c, out = run(g.events, until=g.t + 100 * MS)
    assert of(out, WatchInterrupt) == [] and of(out, NeedsResetSuspected) == []
    [view] = c.snapshot(g.t).devices
    assert view.device == f"mmio-0x{BASE:x}" and view.config_interrupts_total == 0
