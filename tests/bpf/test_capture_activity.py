"""Activity discovery (real QEMU + KVM + BPF): MSIs on vectors nobody watches and queue kicks are
forwarded, at most one per vector / notify address per interval, within a per-VM token bucket,
so correlation can learn config vectors and see whether a device makes progress while the guest
cannot flood userspace."""
from __future__ import annotations

import pytest

from agent.events import ApicAccepted, MsiInjected, QueueNotify
from lab.harness import GuestSpec

from capture_lab_support import capture_fixture, learn_devices, run_captured

INTERVAL_MS = 200


cap = capture_fixture(activity_interval_ms=INTERVAL_MS)


def test_unwatched_config_msi_and_folded_kicks_of_a_linux_guest(cap):
    hold_ms, kick_ms = 1500, 2
    spec = GuestSpec(transport="modern", scenario="linux", hold_ms=hold_ms, kick_ms=kick_ms)
    (dev,) = learn_devices(spec)
    run = run_captured(cap, spec)          # nothing watched at all
    guest = run.result
    assert guest.linux_kicks and guest.linux_kicks > 100

    # the config MSI of virtio_error(), on the vector the guest programmed, without any watch
    vectors = [e.data & 0xFF for e in run.events if isinstance(e, MsiInjected)]
    assert dev.msi_data_config & 0xFF in vectors
    # kicks at the guest's notify address: folded to one per interval, the rest in `repeats`
    kicks = [e for e in run.events if isinstance(e, QueueNotify) and e.addr == dev.notify_addr]
    assert kicks, "no kick forwarded"
    gaps = [b.ts_ns - a.ts_ns for a, b in zip(kicks, kicks[1:])]
    assert all(g >= INTERVAL_MS * 1_000_000 for g in gaps)
    assert len(kicks) <= hold_ms // INTERVAL_MS + 2
    # every kick is accounted for: forwarded ones plus the folded ones they carry (the last
    # interval's folded kicks may not have been carried by a later kick), plus the fault's
    carried = len(kicks) + sum(k.repeats for k in kicks)
    assert guest.linux_kicks - 2 * (INTERVAL_MS // kick_ms) <= carried <= guest.linux_kicks + 1
    assert run.delta("activity_folded") > 0 and run.delta("activity_forwarded") >= len(kicks)
    print(f"\nguest kicks {guest.linux_kicks}, forwarded {len(kicks)}, carried {carried}; "
          f"MSI vectors {sorted(set(vectors))}")


@pytest.mark.parametrize("transport", ["modern", "mmio"])
def test_the_delivery_of_a_discovered_msi_is_forwarded_once(cap, transport):
    """Nothing watched: each MSI activity discovery forwards is followed by its LAPIC delivery
    (same VMM and vector, within 1 ms) when KVM delivers it, and by no other delivery. On
    virtio-mmio (INTx on microvm's split irqchip) the one MSI QEMU injects is the spurious one
    of the guest's IOAPIC programming: never delivered, so no delivery is forwarded."""
    spec = GuestSpec(transport=transport, scenario="fault")
    run = run_captured(cap, spec)
    msis = [e for e in run.events if isinstance(e, MsiInjected)]
    apics = [e for e in run.events if isinstance(e, ApicAccepted)]
    if transport == "modern":
        (dev,) = run.result.devices
        config = [m for m in msis if m.data & 0xFF == dev.msi_data_config & 0xFF]
        assert config, msis
    for a in apics:
        before = [m for m in msis if m.data & 0xFF == a.vector and m.pid == a.pid
                  and 0 <= a.ts_ns - m.ts_ns < 1_000_000]
        assert len(before) == 1, (a, msis)
    # at most one delivery per forwarded MSI
    assert len(apics) <= len(msis)
    if transport == "modern":
        assert [a.vector for a in apics if a.ts_ns > config[0].ts_ns][:1] == \
            [dev.msi_data_config & 0xFF], apics
    else:
        assert apics == [], (apics, msis)


def test_activity_discovery_off():
    from conftest import require_bpf
    require_bpf()
    from agent.capture import Capture

    with pytest.raises(ValueError):
        Capture(activity_interval_ms=0)
    spec = GuestSpec(transport="modern", scenario="linux", hold_ms=500, kick_ms=5)
    with Capture(activity_rate=0) as c:
        run = run_captured(c, spec)
    assert not [e for e in run.events if isinstance(e, (MsiInjected, QueueNotify))]
    assert run.delta("activity_forwarded") == 0
