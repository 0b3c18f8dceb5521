"""Helpers for capture tests on the lab guest: run a LabVM while polling a Capture."""
from __future__ import annotations

import time
from dataclasses import dataclass

import pytest

from agent.events import Event, ProcessExit, Register
from agent.model import WatchInterrupt, WatchRegister
from lab.harness import DeviceInfo, GuestSpec, LabResult, LabVM


def capture_fixture(**options):
    """A module-scoped `cap` fixture: one Capture(**options) for the module's tests (BPF
    required: skipped on a laptop, a failure under VRA_REQUIRE_KVM=1)."""
    @pytest.fixture(scope="module")
    def cap():
        from conftest import require_bpf
        require_bpf()
        from agent.capture import Capture
        with Capture(**options) as c:
            yield c
    return cap


@dataclass
class CapturedRun:
    result: LabResult
    pid: int
    events: list[Event]           # this VM's events, in the order poll() returned them
    counters_before: dict[str, int]
    counters_after: dict[str, int]
    final_state: dict[tuple[str, int], object]   # watched (space, addr) -> RegisterState at exit

    def delta(self, counter: str) -> int:
        return self.counters_after[counter] - self.counters_before[counter]


@dataclass(frozen=True)
class StormSpec(GuestSpec):
    """A `writestorm` on another register than status: the lab guest's `storm_reg` (config =
    the config-vector / InterruptACK register, ipi = self-IPIs on the config vector),
    `storm_values` (values cycled through) and `storm_final` (one more write after the storm),
    which lab/harness.py does not pass itself."""
    storm_reg: str = "status"
    storm_values: int = 1
    storm_final: int = 0

    def cmdline(self) -> str:
        return (f"{super().cmdline()} storm_reg={self.storm_reg} "
                f"storm_values={self.storm_values} storm_final={self.storm_final}")


def learn_devices(spec: GuestSpec) -> list[DeviceInfo]:
    """The guest's own report of where its registers and vectors are (an `init` run)."""
    from lab.harness import run
    init = GuestSpec(transport=spec.transport, devices=spec.devices, irq=spec.irq,
                     scenario="init")
    return run(init).devices


def watch_device(cap, pid: int, dev: DeviceInfo) -> None:
    cap.watch_register(WatchRegister(pid=pid, space=dev.space, addr=dev.status_addr,
                                     register=Register.STATUS))
    if dev.msi_data_config is not None:
        cap.watch_interrupt(WatchInterrupt(pid=pid, vector=dev.msi_data_config & 0xFF))
    if dev.irq_line is not None:
        cap.watch_interrupt(WatchInterrupt(pid=pid, gsi=dev.irq_line))


def run_captured(cap, spec: GuestSpec, watch: list[DeviceInfo] = (), timeout: float = 30.0,
                 exit_wait: float = 3.0, registers: list[tuple[str, int, int]] = ()) -> CapturedRun:
    """Run `spec` while polling `cap`. `watch`: devices whose status register and config
    interrupt are watched; `registers`: extra (space, addr, Register kind) to watch."""
    before = cap.counters()
    vm = LabVM.start(spec)
    # QEMU needs tens of milliseconds before the guest runs: the watches are in place by then
    for dev in watch:
        watch_device(cap, vm.pid, dev)
    for space, addr, kind in registers:
        cap.watch_register(WatchRegister(pid=vm.pid, space=space, addr=addr, register=kind))
    events: list[Event] = []
    try:
        deadline = time.monotonic() + timeout
        while vm.proc.poll() is None and time.monotonic() < deadline and not _exited(events, vm.pid):
            events += cap.poll(50)
        result = vm.wait(timeout=max(0.1, deadline - time.monotonic()))
    finally:
        vm.kill()
    end = time.monotonic() + exit_wait
    final = {}
    while time.monotonic() < end:
        # the pid's watches are still in the maps right after poll() returns its ProcessExit
        if _exited(events, vm.pid):
            break
        events += cap.poll(50)
    for space, addr in [(d.space, d.status_addr) for d in watch] + [r[:2] for r in registers]:
        final[(space, addr)] = cap.register_state(vm.pid, space, addr)
    after = cap.counters()
    return CapturedRun(result=result.raise_for_error(), pid=vm.pid,
                       events=[e for e in events if e.pid == vm.pid],
                       counters_before=before, counters_after=after, final_state=final)


def _exited(events: list[Event], pid: int) -> bool:
    return any(isinstance(e, ProcessExit) and e.pid == pid for e in events)
