"""agent.demo.match_episodes: how the lab tests pair the guest's episodes with the agent's log.

Five lab test files judge the agent through these pairs, so the pairing is tested on its own,
from what each side writes: the guest's report (lab.harness dataclasses) and the agent's episode
log lines (docs/episode-log fields). The status register offsets come from the virtio spec,
written here, not from the module: 4.1.4.3 (modern common config: device_status at 0x14),
4.1.4.8 (legacy header: device status at 18), 4.2.2 (virtio-mmio: Status at 0x070).
"""
from __future__ import annotations

import pytest

from agent.demo import match_episodes, same_device
from lab.harness import DeviceInfo, Episode, GuestSpec, LabResult

MODERN_STATUS_OFF = 0x14
LEGACY_STATUS_OFF = 18
MMIO_STATUS_OFF = 0x70
VM = "vm-under-test"
MS = 1_000_000


def device(idx: int, transport: str, status_addr: int, bdf: str | None = None) -> DeviceInfo:
    space = "pio" if transport == "legacy" else "mmio"
    return DeviceInfo(idx=idx, transport=transport, type=4, space=space, status_addr=status_addr,
                      status_size=1, irq="msix", qsize=8, features=0, bdf=bdf)


def episode(dev: int, ep: int, saw_ms: float, ok_ms: float | None, window_us: float = 3.0
            ) -> Episode:
    saw = int(saw_ms * MS)
    return Episode(dev=dev, ep=ep, needs_reset_issue_ns=saw - int(window_us * 1000),
                   needs_reset_ns=saw, reset_ns=saw + 1 * MS,
                   driver_ok_ns=None if ok_ms is None else int(ok_ms * MS))


def result(devices: list[DeviceInfo], episodes: list[Episode], delay_ms: int = 5) -> LabResult:
    return LabResult(spec=GuestSpec(delay_ms=delay_ms), exit_code=0, wall_s=0.1,
                     devices=devices, episodes=episodes)


def record(label: str, transport: str, start_ns: int, outcome: str = "recovered",
           saw_ns: int | None = None, reset_ns: int | None = None, done_ns: int | None = None,
           ok_ns: int | None = None, vm: str = VM, notify_s: float | None = None) -> dict:
    return {"vm": vm, "device": label, "transport": transport, "start_ns": start_ns,
            "outcome": outcome, "guest_saw_ns": saw_ns, "reset_written_ns": reset_ns,
            "reset_done_ns": done_ns, "driver_ok_ns": ok_ns, "notify_seconds": notify_s,
            "recovery_seconds": None if ok_ns is None else (ok_ns - start_ns) / 1e9}


def test_each_guest_episode_gets_the_agent_record_of_its_device_in_order():
    base = 0xFEB00000
    dev = device(0, "mmio", base + MMIO_STATUS_OFF)
    res = result([dev], [episode(0, 0, 10, 14), episode(0, 1, 50, 57)])
    label = f"mmio-0x{base:x}"
    # host clock: 1 s after the guest's; records out of order, others' records around them
    recs = [record(label, "mmio", 2_050 * MS, saw_ns=2_050 * MS, reset_ns=2_052 * MS,
                   done_ns=2_053 * MS, ok_ns=2_057 * MS),
            record(label, "mmio", 1_009 * MS, saw_ns=1_010 * MS, reset_ns=1_011 * MS,
                   done_ns=1_012 * MS, ok_ns=1_014 * MS, notify_s=0.001),
            record(label, "mmio", 1_009 * MS, ok_ns=1_020 * MS, vm="another-vm"),
            record(f"mmio-0x{base + 0x1000:x}", "mmio", 1_005 * MS, ok_ns=1_006 * MS)]
    rows = match_episodes(VM, res, recs)
    assert [(r.dev, r.ep, r.outcome) for r in rows] == [(0, 0, "recovered"), (0, 1, "recovered")]
    first, second = rows
    assert first.agent_s == pytest.approx(0.004) and first.guest_s == pytest.approx(0.004)
    assert first.agent_total_s == pytest.approx(0.005) and first.agent_notify_s == 0.001
    assert first.agent_react_s == pytest.approx(0.001)
    assert first.agent_reset_s == pytest.approx(0.001)
    assert first.agent_reinit_s == pytest.approx(0.002)
    assert first.guest_window_s == pytest.approx(3e-6)
    assert second.agent_s == pytest.approx(0.007) and second.guest_s == pytest.approx(0.007)
    assert first.vm == VM and first.transport == "mmio" and first.delay_ms == 5


def test_a_stuck_line_and_the_final_line_of_one_episode_are_one_row():
    """A stuck episode is logged twice, same start: `stuck`, then its end. The row has the end."""
    dev = device(0, "modern", 0xC000_4000 + MODERN_STATUS_OFF)
    res = result([dev], [episode(0, 0, 10, 2_010)])
    label = "mmio-0xc0004000"
    recs = [record(label, "pci-modern", 7 * MS, outcome="recovered", saw_ns=7 * MS,
                   ok_ns=2_007 * MS),
            record(label, "pci-modern", 7 * MS, outcome="stuck", saw_ns=7 * MS)]
    (row,) = match_episodes(VM, res, recs)
    assert row.outcome == "recovered" and row.agent_s == pytest.approx(2.0)


def test_an_episode_the_agent_did_not_log_is_missing_not_dropped():
    dev = device(0, "modern", 0xC000_4000 + MODERN_STATUS_OFF)
    res = result([dev], [episode(0, 0, 10, 12), episode(0, 1, 30, 33)])
    recs = [record("mmio-0xc0004000", "pci-modern", 10 * MS, saw_ns=10 * MS, ok_ns=12 * MS)]
    rows = match_episodes(VM, res, recs)
    assert [r.outcome for r in rows] == ["recovered", "missing"]
    assert rows[1].agent_s is None and rows[1].agent_total_s is None
    assert rows[1].guest_s == pytest.approx(0.003)


def test_unknown_phases_stay_unknown():
    """A record without the guest's read or DRIVER_OK (abandoned) has no agent figure, and a
    guest episode that never reached DRIVER_OK has no guest figure: None, not 0."""
    dev = device(0, "modern", 0xC000_4000 + MODERN_STATUS_OFF)
    res = result([dev], [episode(0, 0, 10, None)])
    recs = [record("mmio-0xc0004000", "pci-modern", 10 * MS, outcome="abandoned",
                   saw_ns=10 * MS, reset_ns=11 * MS)]
    (row,) = match_episodes(VM, res, recs)
    assert row.outcome == "abandoned" and row.guest_s is None
    assert row.agent_s is None and row.agent_reinit_s is None and row.agent_reset_s is None
    assert row.agent_react_s == pytest.approx(0.001)


def test_two_devices_of_one_vm_are_kept_apart():
    pio, mmio = 0xC040, 0xFEB00000
    devs = [device(0, "legacy", pio + LEGACY_STATUS_OFF), device(1, "mmio", mmio + MMIO_STATUS_OFF)]
    res = result(devs, [episode(0, 0, 10, 12), episode(1, 0, 10, 19)])
    recs = [record(f"mmio-0x{mmio:x}", "mmio", 10 * MS, saw_ns=10 * MS, ok_ns=19 * MS),
            record(f"pio-0x{pio:x}", "pci-legacy", 10 * MS, saw_ns=10 * MS, ok_ns=12 * MS)]
    rows = match_episodes(VM, res, recs)
    assert [(r.dev, round(r.agent_s, 6)) for r in rows] == [(0, 0.002), (1, 0.009)]


def test_device_names_follow_the_spec_register_offsets_and_pci_addresses():
    modern = device(0, "modern", 0xC000_4000 + MODERN_STATUS_OFF, bdf="00:03.0")
    legacy = device(1, "legacy", 0xC040 + LEGACY_STATUS_OFF)
    mmio = device(2, "mmio", 0xFEB00000 + MMIO_STATUS_OFF)
    assert same_device("pci-0000:00:03.0", "pci-modern", modern)
    assert not same_device("pci-0000:00:04.0", "pci-modern", modern)
    assert not same_device("pci-0000:00:03.0", "pci-legacy", legacy)        # no bdf known
    assert same_device("mmio-0xc0004000", "pci-modern", modern)
    assert same_device("pio-0xc040", "pci-legacy", legacy)
    assert same_device("mmio-0xfeb00000", "mmio", mmio)
    # the right block under another transport's layout is another register
    assert not same_device("mmio-0xfeb00000", "pci-modern", mmio)
    assert not same_device("pio-0xc040", "mmio", legacy)
    assert not same_device("vhost-fd3", "pci-modern", modern)
