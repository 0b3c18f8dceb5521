"""Real QEMU + KVM runs of the lab guest: every transport, every scenario.

Expected values come from the virtio spec and from what QEMU reports (its stderr), not from
earlier runs: 0x4f = DRIVER_OK|FEATURES_OK|DRIVER|ACKNOWLEDGE plus NEEDS_RESET (0x40).
"""
from __future__ import annotations

import pytest

from lab.harness import (
    STATUS_DRIVER_OK, STATUS_FAILED, STATUS_NEEDS_RESET, GuestSpec, LabResult, run,
)

pytestmark = pytest.mark.kvm

READY = 0x0F            # ACKNOWLEDGE|DRIVER|FEATURES_OK|DRIVER_OK
REINIT = [0, 1, 3, 11, 15]
VIRTIO_ERROR = "Guest moved used index"


def _errors(r: LabResult) -> list[str]:
    return [m for m in r.virtio_errors if VIRTIO_ERROR in m]


def _assert_ordered(*ns: int | None) -> None:
    assert all(v is not None for v in ns), ns
    assert list(ns) == sorted(ns), ns


def _assert_bring_up(r: LabResult) -> None:
    for d in r.devices:
        writes = [w.value for w in r.status_writes if w.dev == d.idx and w.ep == -1]
        assert writes == REINIT


@pytest.mark.parametrize("transport", ["modern", "mmio"])
def test_fault_sets_needs_reset(kvm: None, transport: str) -> None:
    r = run(GuestSpec(transport=transport, scenario="fault"))
    _assert_bring_up(r)
    (e,) = r.episodes
    assert e.needs_reset_status == READY | STATUS_NEEDS_RESET == 0x4F
    assert r.final_status == {0: 0x4F}
    assert len(_errors(r)) == 1
    _assert_ordered(e.fault_ns, e.needs_reset_ns)
    assert r.boot is not None and r.boot.via == "pvh"


@pytest.mark.parametrize("transport, irq", [("modern", "msix"), ("modern", "intx"), ("mmio", "msix")])
def test_recover_reaches_driver_ok_again(kvm: None, transport: str, irq: str) -> None:
    r = run(GuestSpec(transport=transport, scenario="recover", irq=irq))
    (e,) = r.episodes
    assert e.needs_reset_status == 0x4F and not e.timed_out
    assert e.status_values == REINIT
    assert r.final_status == {0: READY}
    _assert_ordered(e.fault_ns, e.needs_reset_ns, e.reset_ns, e.reset_done_ns, e.driver_ok_ns)
    assert e.recovery_ns == e.driver_ok_ns - e.needs_reset_ns > 0
    assert len(_errors(r)) == 1
    if r.spec.effective_irq == "intx":
        assert e.isr is not None and e.isr & 0x2, "config-change bit missing from ISR"


@pytest.mark.parametrize("irq", ["msix", "intx"])
def test_legacy_fault_breaks_the_device_without_needs_reset(kvm: None, irq: str) -> None:
    # virtio_error() without VIRTIO_F_VERSION_1 only marks the device broken: status keeps its
    # value, no config interrupt; the guest's poll for NEEDS_RESET times out.
    r = run(GuestSpec(transport="legacy", scenario="recover", detect_ms=50, irq=irq))
    (dev,) = r.devices
    assert dev.transport == "legacy" and dev.space == "pio" and dev.features == 0
    assert dev.irq == irq and dev.gen_addr is None
    if irq == "msix":
        assert dev.msix_config == 0 and dev.msix_config_addr == dev.status_addr + 2
    (e,) = r.episodes
    assert e.timed_out and e.needs_reset_status is None
    assert len(_errors(r)) == 1
    assert e.status_values == REINIT  # the guest's watchdog-style reset still works
    assert r.final_status == {0: READY}


def test_legacy_stuck_keeps_status_without_needs_reset(kvm: None) -> None:
    r = run(GuestSpec(transport="legacy", scenario="stuck", detect_ms=50))
    assert r.final_status[0] & STATUS_NEEDS_RESET == 0
    assert r.final_status[0] == READY
    assert len(_errors(r)) == 1


def test_stuck_never_resets_and_holds(kvm: None) -> None:
    r = run(GuestSpec(transport="modern", scenario="stuck", hold_ms=300))
    (e,) = r.episodes
    assert e.writes == [] and e.needs_reset_status == 0x4F
    assert r.final_status == {0: 0x4F}
    assert r.done_ns is not None and r.done_ns - e.needs_reset_ns >= 300_000_000


def test_fail_writes_failed_then_resets(kvm: None) -> None:
    r = run(GuestSpec(transport="modern", scenario="fail"))
    (e,) = r.episodes
    assert e.status_values == [0x4F | STATUS_FAILED] + REINIT
    _assert_ordered(e.needs_reset_ns, e.failed_ns, e.reset_ns, e.driver_ok_ns)
    assert r.final_status == {0: READY}
    # QEMU's virtio-rng re-runs its queue on a status write with DRIVER_OK set (0xcf has it),
    # so the broken ring is reported again.
    assert len(_errors(r)) >= 1


def test_repeat_and_delay(kvm: None) -> None:
    r = run(GuestSpec(transport="modern", scenario="recover", repeat=3, delay_ms=5))
    assert [e.ep for e in r.episodes] == [0, 1, 2]
    for e in r.episodes:
        assert e.status_values == REINIT and e.needs_reset_status == 0x4F
        assert e.reaction_ns >= 5_000_000
    assert len(_errors(r)) == 3


def test_fault_delay_spaces_the_faults(kvm: None) -> None:
    r = run(GuestSpec(transport="mmio", scenario="recover", repeat=2, fault_delay_ms=30))
    first, second = r.episodes
    assert first.fault_ns is not None and second.fault_ns is not None
    assert second.fault_ns - first.driver_ok_ns >= 30_000_000
    assert len(_errors(r)) == 2


@pytest.mark.parametrize("transport", ["modern", "mmio"])
def test_one_of_three_devices_faults(kvm: None, transport: str) -> None:
    r = run(GuestSpec(transport=transport, scenario="recover", devices=3, fault_dev=1))
    assert [d.idx for d in r.devices] == [0, 1, 2]
    assert len({d.status_addr for d in r.devices}) == 3
    assert [e.dev for e in r.episodes] == [1]
    assert r.final_status == {0: READY, 1: READY, 2: READY}
    assert len(_errors(r)) == 1


def test_all_devices_fault(kvm: None) -> None:
    r = run(GuestSpec(transport="modern", scenario="recover", devices=2))
    assert sorted(e.dev for e in r.episodes) == [0, 1]
    assert all(e.status_values == REINIT for e in r.episodes)
    assert len(_errors(r)) == 2


def test_msix_vectors_reported_per_device(kvm: None) -> None:
    r = run(GuestSpec(transport="modern", scenario="init", devices=2))
    for d in r.devices:
        assert d.irq == "msix" and d.msix_config == 0 and d.msix_queue == 1
        assert d.msi_addr == 0xFEE00000
        assert d.gen_addr == d.status_addr + 1 and d.msix_config_addr == d.status_addr - 4
    assert len({d.msi_data_config for d in r.devices} | {d.msi_data_queue for d in r.devices}) == 4


def test_intx_device_has_no_msix(kvm: None) -> None:
    r = run(GuestSpec(transport="modern", scenario="init", irq="intx"))
    (d,) = r.devices
    assert d.irq == "intx" and d.msix_config is None and d.msi_data_config is None
    assert d.irq_line is not None and 0 < d.irq_line < 16  # a PIIX3 PIRQ -> ISA IRQ


def test_readstorm_reads_the_same_value(kvm: None) -> None:
    r = run(GuestSpec(transport="modern", scenario="readstorm", reads=5000))
    (s,) = r.storms
    assert (s.op, s.n, s.value, s.differing) == ("read", 5000, READY, 0)
    assert s.duration_ns > 0


def test_writestorm(kvm: None) -> None:
    r = run(GuestSpec(transport="mmio", scenario="writestorm", writes=2000))
    (s,) = r.storms
    assert (s.op, s.n, s.value) == ("write", 2000, READY)
    assert r.final_status == {0: READY}


def test_bitclear_clears_driver_ok_without_reset(kvm: None) -> None:
    r = run(GuestSpec(transport="modern", scenario="bitclear"))
    (e,) = r.episodes
    assert e.status_values == [READY & ~STATUS_DRIVER_OK]
    assert r.final_status == {0: READY & ~STATUS_DRIVER_OK}


def test_failreinit_reinitialises_without_reset(kvm: None) -> None:
    r = run(GuestSpec(transport="modern", scenario="failreinit"))
    (e,) = r.episodes
    assert e.status_values == [0x4F | STATUS_FAILED, 1, 3, 11, 15]
    assert e.reset_ns is None


def test_netkvm_skips_acknowledge_and_reset_wait(kvm: None) -> None:
    r = run(GuestSpec(transport="modern", scenario="netkvm", period_ms=2))
    (e,) = r.episodes
    assert e.needs_reset_status == 0x4F
    assert e.status_values == [0, 3, 11, 15] and e.reset_done_ns is None
    assert r.final_status == {0: READY}


def test_linux_never_reads_status_or_resets(kvm: None) -> None:
    r = run(GuestSpec(transport="modern", scenario="linux", hold_ms=60, kick_ms=5))
    (e,) = r.episodes
    assert e.writes == [] and e.needs_reset_ns is None
    assert r.final_status == {}  # not even the final report reads it
    assert r.linux_kicks is not None and r.linux_kicks >= 5
    assert len(_errors(r)) == 1  # a broken device ignores later kicks


def test_multiboot_boot(kvm: None) -> None:
    r = run(GuestSpec(transport="modern", scenario="init", boot="multiboot"))
    assert r.boot is not None and r.boot.via == "multiboot"
