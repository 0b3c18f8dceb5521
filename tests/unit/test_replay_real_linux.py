"""Replay of real Linux guests: Debian's 6.1 kernel driving QEMU's virtio-rng, -net and -blk
(lab/linux, under TCG), one clean and one faulted boot per device type.

The fixtures (tests/unit/fixtures/linux, recorded by `python -m lab.linux.fixtures`) are QEMU's
trace of each run converted to agent.events and filtered to what capture would forward, with
what the guest and QEMU said beside them (*.guest.json: /sys/bus/virtio/devices and
/proc/interrupts in the guest, QEMU's query-pci, virtio_error messages and
x-query-virtio-status). Checked here against that truth:

- the device model: PCI address and type, and the MSI-X programming of Linux's own driver
  (config entry and queue entries as /proc/interrupts numbers them, hwirq = bdf << 11 | entry);
- config interrupts counted by correlation = the guest's `virtioN-config` count;
- the silent NEEDS_RESET (Linux never reads status after the fault): suspected from the
  config interrupt and the kicks that got no completion, before any status read; clean runs
  report nothing.
"""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from agent import events as E
from agent.correlate import Correlator, CorrelatorConfig
from agent.model import EpisodeEnded, NeedsResetSuspected, Violation
from agent.replay import parse_line, replay
from lab.linux.run import feed_ticked   # ticks between events, as `run`'s loop does

FIXTURES = Path(__file__).parent / "fixtures" / "linux"
DEVICES = ("rng", "net", "blk")
# net-fault-nokick: a faulted virtio-net run where Linux never kicked again after the config
# interrupt (it kicks only past the avail_event QEMU stopped moving)
FAULTS = [(d, "fault") for d in DEVICES] + [("net", "fault-nokick")]
RUNS = [(d, "clean") for d in DEVICES] + FAULTS
NEEDS_RESET = 0x40


def load(device: str, kind: str) -> tuple[list[E.Event], dict]:
    stem = FIXTURES / f"{device}-{kind}"
    with gzip.open(f"{stem}.events.jsonl.gz", "rt", encoding="utf-8") as f:
        events = [parse_line(line) for line in f if line.strip()]
    return events, json.loads(Path(f"{stem}.guest.json").read_text())


def correlate_ticked(events: list[E.Event]) -> tuple[Correlator, list]:
    """Feed events with ticks in between, as the agent's loop does; all outputs."""
    cfg = CorrelatorConfig()
    c = Correlator(cfg)
    out: list = []
    feed_ticked(c, events, out.extend)
    out += c.flush()
    out += c.tick(events[-1].ts_ns + cfg.notify_window_ns + cfg.reorder_window_ns + 1)
    return c, out


def model_before_exit(events: list[E.Event]):
    """The VM's device model as correlation built it (the exit would drop it)."""
    c = Correlator()
    for ev in events:
        if not isinstance(ev, E.ProcessExit):
            c.feed(ev)
    c.flush()
    return c.pci_model(events[0].pid)


def bdf_of(pci: str) -> int:
    _, bus, devfn = pci.split(":")
    dev, fn = devfn.split(".")
    return int(bus, 16) << 8 | int(dev, 16) << 3 | int(fn, 16)


def guest_irqs(truth: dict, phase: str) -> tuple[dict, dict]:
    """(config line, {entry: line} of the queues) of the guest's only virtio device."""
    lines = truth["guest_irqs"][phase]
    config = [ln for ln in lines if ln["name"].endswith("-config")]
    assert len(config) == 1, lines
    return config[0], {ln["hwirq"] & 0x7FF: ln for ln in lines if ln is not config[0]}


def silence_from(events: list[E.Event], irq_ns: int) -> int:
    """When the device's silence started counting: at the config interrupt if it was kicked
    within the window before it (it was in use), else at the first kick after it."""
    window = CorrelatorConfig().suspect_window_ns
    kicks = [e.ts_ns for e in events if isinstance(e, E.QueueNotify)]
    if [k for k in kicks if irq_ns - window <= k <= irq_ns]:
        return irq_ns
    after = [k for k in kicks if k > irq_ns]
    assert after, "no kick the suspicion could wait on"
    return after[0]


@pytest.mark.parametrize("device,kind", RUNS)
def test_fixture_is_what_the_guest_ran(device, kind):
    """The fixture is a real run of that device: the guest bound Linux's driver, QEMU placed
    the device where the guest saw it, and only the faulted run broke it."""
    events, truth = load(device, kind)
    [guest] = truth["guest_devices"]
    assert (guest["type"], guest["driver"]) == (device, f"virtio_{device}")
    assert guest["pci"] == truth["qemu_pci"]
    assert isinstance(events[0], E.VmStarted) and isinstance(events[-1], E.ProcessExit)
    assert truth["events"]["forwarded"] == len(events) < truth["events"]["converted"]
    [end] = truth["guest_status_at_end"]
    if kind.startswith("fault"):
        assert truth["qemu_virtio_errors"] and truth["vmm_status"]["broken"] is True
        assert end["status"] & NEEDS_RESET
    else:
        assert truth["qemu_virtio_errors"] == [] and truth["vmm_status"]["broken"] is False
        assert end["status"] == 0x0F


@pytest.mark.parametrize("device,kind", RUNS)
def test_replay_names_and_types_the_device_as_linux_did(device, kind):
    events, truth = load(device, kind)
    [guest] = truth["guest_devices"]
    _, _, snap, stats, bad = replay(
        iter(E.to_json(e) + "\n" for e in events), "fixture", CorrelatorConfig())
    assert bad == []
    assert [(d.device, d.type, d.transport) for d in snap.devices] == \
        [(f"pci-{guest['pci']}", guest["type"], "pci-modern")]
    assert stats.get("devices_renamed", 0) == 0       # known from its enumeration, not traffic


@pytest.mark.parametrize("device,kind", RUNS)
def test_msix_programming_matches_the_guests_interrupts(device, kind):
    """Entries and vectors as Linux programmed them: msix_config is the entry /proc/interrupts
    calls virtioN-config; each queue's entry is one of the guest's queue lines; the vector of
    each entry is what the device's MSIs carried."""
    events, truth = load(device, kind)
    [guest] = truth["guest_devices"]
    bdf = bdf_of(guest["pci"])
    config_line, queue_lines = guest_irqs(truth, "final")
    assert config_line["hwirq"] >> 11 == bdf
    fn = model_before_exit(events).function(bdf)
    assert fn is not None and fn.msix_enabled is True
    assert fn.msix_config == config_line["hwirq"] & 0x7FF
    queue_entries = {e for e in fn.queue_vectors.values() if e != 0xFFFF}
    assert queue_entries == set(queue_lines)
    vectors = {entry: fn.vector_of(entry) for entry in queue_entries | {fn.msix_config}}
    assert all(v is not None for v in vectors.values()), vectors
    assert len({v[1] for v in vectors.values()}) == len(vectors)   # one vector per entry
    msi_vectors = {e.data & 0xFF for e in events if isinstance(e, E.MsiInjected)}
    assert {v[1] for e, v in vectors.items() if queue_lines.get(e, {}).get("count")} \
        <= msi_vectors


@pytest.mark.parametrize("device,kind", RUNS)
def test_config_interrupts_counted_as_the_guest_counted_them(device, kind):
    events, truth = load(device, kind)
    config_line, _ = guest_irqs(truth, "final")
    _, _, snap, _, _ = replay(iter(E.to_json(e) + "\n" for e in events), "fixture",
                              CorrelatorConfig())
    [dev] = snap.devices
    assert dev.config_interrupts_total == config_line["count"] == (kind != "clean")


@pytest.mark.parametrize("device,kind", FAULTS)
def test_silent_needs_reset_is_suspected_before_any_status_read(device, kind):
    """Linux takes the config interrupt, re-reads config, never reads status, and kicks the
    dead queue once more or not at all: the suspicion comes from kernel evidence alone, a window
    of silence after the interrupt (the device was in use just before it) or after the first
    kick that followed it, and before the guest's own status read (our init's final sysfs
    report) ever shows 0x40."""
    events, truth = load(device, kind)
    [guest] = truth["guest_devices"]
    name = f"pci-{guest['pci']}"
    _, out = correlate_ticked(events)
    suspicions = [o for o in out if isinstance(o, NeedsResetSuspected)]
    assert [s.device for s in suspicions] == [name]
    [s] = suspicions
    fn = model_before_exit(events).function(bdf_of(guest["pci"]))
    config_vector = fn.vector_of(fn.msix_config)[1]
    [irq] = [e for e in events if isinstance(e, E.ApicAccepted) and e.vector == config_vector]
    assert s.since_ns == irq.ts_ns
    assert s.ts_ns - silence_from(events, irq.ts_ns) >= CorrelatorConfig().suspect_window_ns
    status_reads = [e for e in events if isinstance(e, E.RegisterAccess)
                    and e.register == E.Register.STATUS and e.op == E.Op.READ
                    and e.value & NEEDS_RESET]
    assert status_reads and status_reads[0].ts_ns > s.ts_ns
    # no completion after the fault: nothing the agent could take for progress
    assert not [e for e in events if isinstance(e, E.MsiInjected) and e.ts_ns > irq.ts_ns
                and e.data & 0xFF != config_vector]


@pytest.mark.parametrize("device,kind", FAULTS)
def test_vmm_confirmation_opens_the_episode_at_the_config_interrupt(device, kind):
    """With QEMU's answer (x-query-virtio-status said NEEDS_RESET), the suspicion becomes an
    episode (evidence `vmm`) starting at the config interrupt; it ends `abandoned` when the
    guest powers off without a DRIVER_OK."""
    events, truth = load(device, kind)
    assert any("NEEDS_RESET" in s for s in truth["vmm_status"]["status"]["statuses"])
    c = Correlator(CorrelatorConfig())
    ended: list = []
    suspected: list = []

    def take(outputs: list) -> None:
        for o in outputs:
            if isinstance(o, NeedsResetSuspected):
                suspected.append(o)        # what `run` does: ask QEMU, feed its answer back
                take(c.vmm_status(o.vm.pid, o.device, o.ts_ns, True))
            elif isinstance(o, EpisodeEnded):
                ended.append(o)

    feed_ticked(c, events, take)
    take(c.flush())
    [s] = suspected
    [ep] = [o.episode for o in ended]
    assert (ep.evidence, ep.outcome, ep.start_ns) == ("vmm", "abandoned", s.since_ns)
    assert ep.type == device


@pytest.mark.parametrize("device", DEVICES)
def test_clean_run_reports_nothing(device):
    events, _ = load(device, "clean")
    _, out = correlate_ticked(events)
    assert [o for o in out if isinstance(o, (NeedsResetSuspected, EpisodeEnded, Violation))] == []
    episodes, violations, _, _, _ = replay(iter(E.to_json(e) + "\n" for e in events),
                                           "fixture", CorrelatorConfig())
    assert episodes == [] and violations == []


@pytest.mark.parametrize("device,kind", FAULTS)
def test_replay_of_the_faulted_run_has_one_episode_from_the_guests_status_read(device, kind):
    """Without QEMU's word, `replay` opens the episode only when the guest reads 0x4f (our init's
    final sysfs report): evidence status_read, ended by the power-off."""
    events, truth = load(device, kind)
    episodes, _, _, _, _ = replay(iter(E.to_json(e) + "\n" for e in events), "fixture",
                                  CorrelatorConfig())
    [ep] = episodes
    assert ep.device == f"pci-{truth['guest_devices'][0]['pci']}"
    assert (ep.evidence, ep.outcome, ep.driver_ok_ns) == ("status_read", "abandoned", None)


@pytest.mark.parametrize("device,kind", RUNS)
def test_mmio_addresses_lie_in_the_bars_linux_programmed(device, kind):
    """The converter takes QEMU's absolute addresses as guest-physical: every device access
    and kick falls in a memory BAR of the function, as the guest's own config writes placed it
    (the MSI-X table in BAR 1, the virtio structures in BAR 4)."""
    events, truth = load(device, kind)
    fn_bars = model_before_exit(events).memory_bars(bdf_of(truth["guest_devices"][0]["pci"]))
    bars = [(base, size) for base, size in fn_bars if size]
    assert len(bars) == 2, fn_bars
    addrs = {e.addr for e in events if isinstance(e, E.QueueNotify)
             or isinstance(e, E.RegisterAccess) and e.space == E.Space.MMIO}
    assert addrs and all(any(b <= a < b + s for b, s in bars) for a in addrs)


# Lines of a real trace (QEMU 7.2, `-msg timestamp=on`), net run: config-space sizing of BAR 4,
# an IOAPIC delivery (serial, pin 4), a kick, an MSI and its delivery.
TRACE = """\
9186@1796561156.521654:memory_region_ops_write cpu 0 mr 0x55930a3e2f80 addr 0xcf8 value 0x80001020 size 4 name 'pci-conf-idx'
9186@1796561156.521659:memory_region_ops_write cpu 0 mr 0x55930a3e3090 addr 0xcfc value 0xffffffff size 4 name 'pci-conf-data'
9186@1796561156.521659:memory_region_ops_read cpu 0 mr 0x55930a3e3090 addr 0xcfe value 0xffff size 2 name 'pci-conf-data'
9186@1796561156.566746:ioapic_set_irq vector: 4 level: 1
9186@1796561156.566748:memory_region_ops_write cpu 0 mr 0x55930a31fca0 addr 0xfee01004 value 0x25 size 4 name 'apic-msi'
9186@1796561156.566749:apic_deliver_irq dest 1 dest_mode 1 delivery_mode 0 vector 37 trigger_mode 0
9186@1796561156.566750:memory_region_ops_write cpu 0 mr 0x55930a31fca0 addr 0xfee000b0 value 0x0 size 4 name 'apic-msi'
9186@1796561156.566751:memory_region_ops_read cpu 0 mr 0x55930a70ca40 addr 0x3f9 value 0x2 size 1 name 'serial'
9186@1796561163.660569:memory_region_ops_write cpu 0 mr 0x55930ae5c930 addr 0xfebfb004 value 0x1 size 2 name 'virtio-pci-notify-virtio-net'
9183@1796561167.392694:memory_region_ops_write cpu -1 mr 0x55930a31fca0 addr 0xfee01004 value 0x28 size 4 name 'apic-msi'
9183@1796561167.392698:apic_deliver_irq dest 1 dest_mode 1 delivery_mode 0 vector 40 trigger_mode 0
qemu-system-x86_64: some other message
"""


def test_converter_turns_qemu_trace_lines_into_the_events_kvm_would_show():
    from lab.linux.trace import convert

    evs = list(convert(TRACE.splitlines(keepends=True), pid=9183))
    cfg = [e for e in evs if isinstance(e, E.RegisterAccess) and e.space == E.Space.PCICFG]
    # 0xCF8 latch 0x80001020 = 00:02.0 register 0x20; a 2-byte read at 0xCFE is offset 0x22
    assert [(E.pcicfg_split(e.addr), e.op, e.size, e.value) for e in cfg] == [
        ((0x10, 0x20), E.Op.WRITE, 4, 0xFFFFFFFF), ((0x10, 0x22), E.Op.READ, 2, 0xFFFF)]
    assert cfg[0].ts_ns + 1 == cfg[1].ts_ns     # same µs: log order, 1 ns apart
    # the IOAPIC's write to apic-msi is not an MSI; the LAPIC register write and serial are
    # not converted; the device's MSI is, with its delivery
    assert [e.gsi for e in evs if isinstance(e, E.IrqLine)] == [4]
    assert [(e.address, e.data) for e in evs if isinstance(e, E.MsiInjected)] == \
        [(0xFEE01004, 0x28)]
    assert [e.vector for e in evs if isinstance(e, E.ApicAccepted)] == [37, 40]
    [kick] = [e for e in evs if isinstance(e, E.RegisterAccess) and e.space == E.Space.MMIO]
    assert (kick.addr, kick.size, kick.value, kick.op, kick.tid) == (0xFEBFB004, 2, 1, "write",
                                                                    9186)
    assert {e.pid for e in evs} == {9183}


def test_converter_rejects_a_trace_without_timestamps():
    from lab.linux.trace import TraceFormatError, convert

    bare = "".join(line.split(":", 1)[1] for line in TRACE.splitlines(keepends=True)[:9]) * 3
    with pytest.raises(TraceFormatError, match="-msg timestamp=on"):
        list(convert(bare.splitlines(keepends=True), pid=1))
