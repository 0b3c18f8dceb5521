"""Lab guests that look like real drivers: machines (pc, q35, microvm), firmware (qboot, SeaBIOS),
kernel-irqchip on/split, a second device of another type (virtio-net / virtio-blk, modern or
transitional), and the queue interrupt a running driver takes shortly before the fault.

Every variant runs once, all VMs at the same time (SeaBIOS boots take ~3 s, qboot ~0.2 s). The
expected PCI addresses and device ids come from QEMU (QMP `query-pci`, asked while the guest
waits in its start delay), not from the guest.
"""
from __future__ import annotations

import os
import re
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from agent.vmm.qmp import QmpClient
from lab.__main__ import main as lab_main
from lab.harness import (
    GuestSpec, LabError, LabResult, LabVM, parse_serial, qemu_command,
)

READY = 0x0F
REINIT = [0, 1, 3, 11, 15]
HOLD_MS = 1500                      # start delay: time to ask QMP before the guest acts
QUEUE_TO_FAULT_MAX_NS = 200_000_000  # "shortly before": the agent's window is longer than this

# expected PCI device ids: (type, flavour) -> id; modern = 0x1040 + type
MODERN_ID = {"rng": 0x1044, "net": 0x1041, "blk": 0x1042}
TRANSITIONAL_ID = {"rng": 0x1005, "net": 0x1000, "blk": 0x1001}
TYPE = {"rng": 4, "net": 1, "blk": 2}

VARIANTS: dict[str, GuestSpec] = {
    # machine x firmware (SeaBIOS boots the multiboot image)
    "pc-qboot-msix-net": GuestSpec(scenario="recover", extra="net"),
    "q35-qboot-intx-blk-transitional": GuestSpec(scenario="recover", machine="q35", irq="intx",
                                                 extra="blk", extra_transitional=True),
    "pc-seabios-intx-blk": GuestSpec(scenario="recover", firmware="seabios", irq="intx",
                                     extra="blk"),
    "q35-seabios-msix-net-transitional-ecam": GuestSpec(scenario="recover", machine="q35",
                                                        firmware="seabios", extra="net",
                                                        extra_transitional=True, pcicfg="ecam"),
    # kernel-irqchip=split: MSI-X and INTx, two episodes each
    "pc-split-msix": GuestSpec(scenario="recover", irqchip="split", repeat=2),
    "pc-split-intx": GuestSpec(scenario="recover", irqchip="split", irq="intx", repeat=2),
    "q35-split-intx-blk-ecam": GuestSpec(scenario="recover", machine="q35", irqchip="split",
                                         irq="intx", extra="blk", pcicfg="ecam"),
    # two rngs, only one faults, the extra in between nothing
    "pc-2rng-msix-blk-transitional": GuestSpec(scenario="recover", devices=2, fault_dev=1,
                                               extra="blk", extra_transitional=True),
    # legacy rng (no NEEDS_RESET) with a transitional extra driven as legacy
    "pc-legacy-msix-net-transitional": GuestSpec(scenario="recover", transport="legacy",
                                                 extra="net", extra_transitional=True,
                                                 detect_ms=50),
    # virtio-mmio on microvm with an extra device
    "mmio-net": GuestSpec(scenario="recover", transport="mmio", extra="net"),
    "mmio-blk": GuestSpec(scenario="recover", transport="mmio", extra="blk", repeat=2),
}


@dataclass
class Outcome:
    spec: GuestSpec
    result: LabResult
    pci: list[dict] = field(default_factory=list)     # query-pci bus 0 devices


def _with_hold(spec: GuestSpec) -> GuestSpec:
    kw = {f: getattr(spec, f) for f in spec.__dataclass_fields__}
    kw.update(qmp=True, start_delay_ms=HOLD_MS)
    return GuestSpec(**kw)


@pytest.fixture(scope="module")
def outcomes() -> dict[str, Outcome]:
    from conftest import require_kvm
    require_kvm()
    vms = {name: LabVM.start(_with_hold(spec)) for name, spec in VARIANTS.items()}
    pci: dict[str, list[dict]] = {}
    try:
        deadline = time.monotonic() + 30
        while len(pci) < len(vms):
            for name, vm in vms.items():
                if name in pci:
                    continue
                if vm.proc.poll() is not None:
                    raise LabError(f"{name}: QEMU exited ({vm.proc.returncode}) early: "
                                   f"{vm.serial_text()[-800:]}")
                if "VRA found" not in vm.serial_text():
                    continue
                assert vm.qmp_path is not None
                with QmpClient.connect(str(vm.qmp_path), timeout=5) as c:
                    buses = c.execute("query-pci") if VARIANTS[name].transport != "mmio" else []
                pci[name] = [d for b in buses for d in b["devices"]]
            assert time.monotonic() < deadline, f"no 'found' line from {set(vms) - set(pci)}"
            time.sleep(0.02)
        results = {name: vm.wait(60) for name, vm in vms.items()}
    finally:
        for vm in vms.values():
            vm.kill()
    return {name: Outcome(VARIANTS[name], results[name], pci[name]) for name in VARIANTS}


def _names(pred) -> list[str]:
    return [n for n, s in VARIANTS.items() if pred(s)]


@pytest.mark.kvm
@pytest.mark.parametrize("name", list(VARIANTS))
def test_devices_are_where_qemu_says(outcomes: dict[str, Outcome], name: str) -> None:
    o = outcomes[name]
    r = o.result.raise_for_error()
    spec = o.spec
    assert r.boot is not None
    assert r.boot.via == ("multiboot" if spec.firmware == "seabios" else "pvh")
    # PCI configuration through q35's ECAM window, which both firmwares enable at 0xB0000000
    assert r.pci_cfg == spec.pcicfg
    if spec.pcicfg == "ecam":
        assert (r.ecam_base, r.ecam_enabled_by) == (0xB0000000, "firmware")
    rngs = [d for d in r.devices if not d.extra]
    extras = [d for d in r.devices if d.extra]
    assert [d.idx for d in rngs] == list(range(spec.devices))
    assert [d.type for d in rngs] == [4] * spec.devices
    assert [(d.idx, d.type_name) for d in extras] == ([(spec.devices, spec.extra)] if spec.extra else [])
    if spec.transport == "mmio":
        assert len({d.mmio_base for d in r.devices}) == len(r.devices)
        assert all(d.mmio_version == 2 and d.features == 1 << 32 for d in r.devices)
        return
    by_qdev = {d["qdev_id"]: d for d in o.pci if d.get("qdev_id")}
    for d in r.devices:
        q = by_qdev["extra0" if d.extra else f"vrng{d.idx}"]
        assert d.bdf == f"00:{q['slot']:02x}.{q['function']}", (d, q)
        assert d.pci_id == q["id"]["device"]
        legacy_id = spec.transport == "legacy" or (d.extra and spec.extra_transitional)
        assert d.pci_id == (TRANSITIONAL_ID if legacy_id else MODERN_ID)[d.type_name]
        assert d.transport == spec.transport  # a transitional extra is driven as the rng is
        # the status register lies in the BAR QEMU reports for it
        bars = [reg for reg in q["regions"] if reg["type"] == ("io" if d.space == "pio" else "memory")]
        assert any(b["address"] <= d.status_addr < b["address"] + b["size"] for b in bars), (d, bars)
        if d.transport == "modern":
            # QEMU's modern layout: common cfg at +0, ISR +0x1000, device cfg +0x2000 of one BAR
            assert d.isr_addr == d.status_addr - 0x14 + 0x1000
            assert d.devcfg_addr == d.status_addr - 0x14 + 0x2000
            assert d.features == 1 << 32
        if spec.irq == "intx":
            assert d.irq == "intx" and d.msix_config is None and d.line_vector
            expected_line = None
            slot, pin = int(d.bdf[3:5], 16), 1
            if spec.effective_machine == "q35":
                expected_line = 16 + (slot + pin - 1) % 4 + 4    # ich9: PIRQ E-H on GSI 20-23
            assert d.irq_line is not None
            if expected_line is not None:
                assert d.irq_line == expected_line
            else:
                assert d.irq_line in (10, 11)  # i440fx PIRQs routed to ISA IRQ 10/11
        else:
            assert d.irq == "msix" and (d.msix_config, d.msix_queue) == (0, 1)
            assert d.msi_data_config != d.msi_data_queue


@pytest.mark.kvm
@pytest.mark.parametrize("name", _names(lambda s: s.extra))
def test_extra_device_is_up_and_never_faulted(outcomes: dict[str, Outcome], name: str) -> None:
    r = outcomes[name].result.raise_for_error()
    (extra,) = [d for d in r.devices if d.extra]
    writes = [w.value for w in r.status_writes if w.dev == extra.idx]
    assert writes == REINIT  # reset, ACK, DRIVER, FEATURES_OK, DRIVER_OK; nothing after
    assert r.final_status[extra.idx] == READY
    assert not r.episodes_of(extra.idx)
    if extra.transport != "legacy":
        assert extra.features == 1 << 32  # VERSION_1 and nothing else
    if extra.irq == "msix":
        assert (extra.msix_config, extra.msix_queue) == (0, 1)


@pytest.mark.kvm
@pytest.mark.parametrize("name", list(VARIANTS))
def test_queue_interrupt_shortly_before_each_fault(outcomes: dict[str, Outcome], name: str) -> None:
    r = outcomes[name].result.raise_for_error()
    spec = outcomes[name].spec
    faulting = [spec.fault_dev] if spec.fault_dev is not None else list(range(spec.devices))
    assert sorted({e.dev for e in r.episodes}) == faulting
    assert len(r.episodes) == spec.repeat * len(faulting)
    for e in r.episodes:
        d = r.device(e.dev)
        assert None not in (e.queue_kick_ns, e.queue_irq_ns, e.fault_ns), e
        assert e.queue_kick_ns < e.queue_irq_ns < e.fault_ns
        assert spec.queue_gap_ms * 1_000_000 <= e.queue_to_fault_ns < QUEUE_TO_FAULT_MAX_NS
        assert e.queue_used == 1  # the request completed (the ring is new after each reset)
        if d.irq == "msix":
            # on the queue's own vector, not the config vector
            assert e.queue_via == "msix" and e.queue_vector == d.msi_data_queue
            assert e.queue_vector != d.msi_data_config
        else:
            # the same line as the config interrupt, told apart by ISR bit 0
            assert e.queue_via == "line" and e.queue_vector == d.line_vector
            assert e.queue_isr == 0x1
        if spec.transport == "legacy":
            assert e.timed_out  # no VERSION_1: virtio_error() sets no NEEDS_RESET
            continue
        assert not e.timed_out and e.needs_reset_status == 0x4F
        assert e.status_values == REINIT
        if d.irq == "intx":
            assert e.isr is not None and e.isr & 0x2  # the config interrupt's ISR read
    gens = [e.queue_gen for e in r.episodes]
    if spec.transport != "legacy":
        # each NEEDS_RESET notification bumps config_generation; the guest read it each time
        assert gens == sorted(gens) and len(set(gens)) == len(gens)


def test_prefault_off_and_linux_do_no_queue_io(kvm: None) -> None:
    from lab.harness import run
    r = run(GuestSpec(transport="mmio", scenario="recover", prefault=False))
    (e,) = r.episodes
    assert e.queue_irq_ns is None and not any(ln.startswith("VRA queue") for ln in r.serial_lines)
    r = run(GuestSpec(scenario="linux", hold_ms=20, kick_ms=5))
    assert not any(ln.startswith("VRA queue") for ln in r.serial_lines)


def test_a_device_from_extra_args_is_still_the_scenarios(kvm: None) -> None:
    """Without `extra`, every virtio device the guest finds is the scenario's, as before: a
    virtio-net from extra_args is faulted too (tests/lab/test_net_outage_e2e.py relies on it),
    without the pre-fault request, which only virtio-rngs get."""
    from lab.harness import run
    net = ("-netdev", "hubport,id=n0,hubid=0",
           "-device", "virtio-net-pci,id=net0,netdev=n0,romfile=,disable-legacy=on")
    r = run(GuestSpec(scenario="fault", detect_ms=50, extra_args=net))
    rng, nic = r.devices
    assert (rng.type_name, rng.extra, nic.type_name, nic.extra) == ("rng", False, "net", False)
    e_rng, e_nic = r.episodes
    assert e_rng.dev == 0 and e_rng.queue_irq_ns is not None and e_rng.needs_reset_status == 0x4F
    # the RX ring's avail index moved, but no frame comes to make QEMU pop it: no error yet
    assert e_nic.dev == 1 and e_nic.queue_irq_ns is None and e_nic.fault_ns is not None
    assert e_nic.timed_out


# --- KVM's view (tracefs): the queue interrupt and the config interrupt under split irqchip ----

TRACEFS = Path("/sys/kernel/tracing")


def _traced(spec: GuestSpec, events: list[str]) -> tuple[LabResult, list[str]]:
    inst = TRACEFS / "instances" / f"vra-variants-{uuid.uuid4().hex[:8]}"
    inst.mkdir()
    try:
        (inst / "trace_clock").write_text("x86-tsc")
        for ev in events:
            (inst / "events" / "kvm" / ev / "enable").write_text("1")
        vm = LabVM.start(spec)
        try:
            vm.wait_for_line("found", timeout=10)
            tids = {t for t in os.listdir(f"/proc/{vm.pid}/task")}
            result = vm.wait(30).raise_for_error()
        finally:
            vm.kill()
        for ev in events:
            (inst / "events" / "kvm" / ev / "enable").write_text("0")
        text = (inst / "trace").read_text()
    finally:
        os.rmdir(inst)
    mine = [ln for ln in text.splitlines() if (m := re.search(r"-(\d+)\s+\[", ln)) and m.group(1) in tids]
    return result, mine


@pytest.mark.bpf
@pytest.mark.parametrize("irq", ["msix", "intx"])
def test_split_irqchip_injections_seen_by_kvm(bpf: None, irq: str) -> None:
    """Under kernel-irqchip=split the guest's vectors still reach KVM's local APIC: MSI-X queue
    vector, then config vector; INTx through QEMU's IOAPIC (the entry the guest programmed) as
    kvm_set_irq on the GSI it reports, then the MSI of that entry. The ISR reads are at the ISR
    capability's address: bit 0 in the queue interrupt's handler, bit 1 after NEEDS_RESET."""
    spec = GuestSpec(scenario="fault", irqchip="split", irq=irq, start_delay_ms=300)
    result, lines = _traced(spec, ["kvm_set_irq", "kvm_apic_accept_irq", "kvm_mmio"])
    (d,) = result.devices
    accepted = [int(m.group(1)) for ln in lines
                if (m := re.search(r"kvm_apic_accept_irq: apicid 0 vec (\d+)", ln))]
    if irq == "msix":
        assert accepted == [d.msi_data_queue, d.msi_data_config], accepted
        return
    raised = [int(m.group(1)) for ln in lines
              if (m := re.search(r"kvm_set_irq: gsi (\d+) level 1", ln))]
    assert raised.count(d.irq_line) == 2, raised   # queue, then config
    assert accepted == [d.line_vector, d.line_vector]
    isr_reads = [int(m.group(1), 16) for ln in lines
                 if (m := re.search(rf"kvm_mmio: mmio read len 1 gpa {d.isr_addr:#x} val 0x([0-9a-f]+)", ln))]
    assert isr_reads == [0x1, 0x3], isr_reads


# --- pure: spec, command line, CLI, parsing -------------------------------------------------

@pytest.mark.parametrize("kwargs, needle", [
    ({"machine": "q35", "transport": "mmio"}, "machine"),
    ({"machine": "microvm"}, "machine"),
    ({"machine": "isapc"}, "machine"),
    ({"firmware": "ovmf"}, "firmware"),
    ({"firmware": "seabios", "transport": "mmio"}, "seabios"),
    ({"irqchip": "off"}, "irqchip"),
    ({"extra": "gpu"}, "extra"),
    ({"extra_transitional": True}, "extra_transitional"),
    ({"extra": "net", "extra_transitional": True, "transport": "mmio"}, "extra_transitional"),
    ({"devices": 8, "extra": "blk"}, "extra"),
    ({"queue_gap_ms": -1}, "queue_gap_ms"),
    ({"machine": "q35", "extra": "net"}, "seabios"),  # qboot halts on q35 with a NIC
    ({"pcicfg": "ecam"}, "q35"),
    ({"machine": "q35", "pcicfg": "mmconfig"}, "pcicfg"),
])
def test_bad_variant_specs(kwargs: dict, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        GuestSpec(**kwargs)


def test_command_lines(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("VRA_QEMU", "/usr/bin/qemu-system-x86_64")
    cmd = qemu_command(GuestSpec(machine="q35", firmware="seabios", irqchip="split",
                                 extra="blk", extra_transitional=True), tmp_path)
    assert cmd[cmd.index("-M") + 1] == "q35" and "-bios" not in cmd
    assert cmd[cmd.index("-machine") + 1] == "kernel-irqchip=split"
    assert cmd[cmd.index("-kernel") + 1].endswith("guest-multiboot.elf")
    devices = [cmd[i + 1] for i, a in enumerate(cmd) if a == "-device"]
    assert devices[1].startswith("virtio-rng-pci,id=vrng0,")
    assert devices[2] == ("virtio-blk-pci,id=extra0,drive=extrablk0,romfile=,"
                          "disable-legacy=off,disable-modern=off")
    assert f"file={tmp_path / 'extra-blk.img'},format=raw,if=none,id=extrablk0" in cmd
    kv = dict(t.split("=", 1) for t in cmd[cmd.index("-append") + 1].split())
    assert kv["prefault"] == "1" and kv["queue_gap_ms"] == "2" and "pcicfg" not in kv
    assert kv["extra_type"] == "2"  # virtio-blk: not the scenario's
    kv = dict(t.split("=", 1) for t in GuestSpec(machine="q35", pcicfg="ecam").cmdline().split())
    assert kv["pcicfg"] == "ecam"

    cmd = qemu_command(GuestSpec(transport="mmio", extra="net", irq="intx"), tmp_path)
    devices = [cmd[i + 1] for i, a in enumerate(cmd) if a == "-device"]
    assert devices[-1] == "virtio-net-device,id=extra0,netdev=extranet0"
    assert "-machine" not in cmd and "kernel-irqchip" not in " ".join(cmd)

    cmd = qemu_command(GuestSpec(irq="intx", extra="net", prefault=False), tmp_path)
    assert cmd[cmd.index("-bios") + 1].endswith("qboot.rom")
    assert [cmd[i + 1] for i, a in enumerate(cmd) if a == "-device"][-1] == (
        "virtio-net-pci,id=extra0,netdev=extranet0,romfile=,disable-legacy=on,"
        "disable-modern=off,vectors=0")
    assert "prefault=0" in cmd[cmd.index("-append") + 1]


def test_cli_flags(capsys, monkeypatch) -> None:
    monkeypatch.setenv("VRA_QEMU", "/usr/bin/qemu-system-x86_64")
    assert lab_main(["cmd", "--machine", "q35", "--firmware", "seabios", "--irqchip", "split",
                     "--extra", "net", "--extra-transitional", "--no-prefault",
                     "--queue-gap-ms", "4", "--pcicfg", "ecam", "--workdir", "/tmp/x"]) == 0
    out = capsys.readouterr().out
    for needle in ("-M q35", "kernel-irqchip=split", "virtio-net-pci,id=extra0", "prefault=0",
                   "queue_gap_ms=4", "pcicfg=ecam", "guest-multiboot.elf"):
        assert needle in out
    assert "-bios" not in out
    assert lab_main(["cmd", "--transport", "mmio", "--firmware", "seabios"]) == 2


def test_parse_queue_line_and_extra_device() -> None:
    hz = 2_000_000_000
    text = "\n".join([
        f"VRA boot via=pvh tsc_hz={hz} tsc_src=cpuid_40000010 tsc_hz_cpuid={hz} tsc_hz_pit=0 tsc=0",
        "VRA dev idx=1 transport=modern bdf=00:03.0 pci_id=0x1000 type=1 space=mmio "
        "status_addr=0xc0008014 status_size=1 devcfg_addr=0xc000a000 irq=intx irq_line=11 "
        "line_vector=0x42 extra=1 qsize=0 features=0x100000000",
        "VRA queue dev=0 ep=0 via=line vector=0x40 isr=0x1 used=1 gen=0x0 cfg=0xff "
        "tsc_kick=2000 tsc=4000",
        "VRA fault dev=0 ep=0 tsc=4004000",
        "VRA pci cfg=ecam ecam_base=0xb0000000 enabled_by=guest",
        "VRA timeout dev=0 ep=1 what=queue reads=0 tsc=9000000",
    ])
    r = LabResult(spec=GuestSpec(), exit_code=1, wall_s=0.1)
    parse_serial(text, r)
    (d,) = r.devices
    assert d.extra and d.type_name == "net" and d.line_vector == 0x42 and d.devcfg_addr == 0xC000A000
    e, later = r.episodes
    assert (e.queue_kick_ns, e.queue_irq_ns, e.queue_to_fault_ns) == (1000, 2000, 2_000_000)
    assert later.ep == 1 and later.queue_irq_ns is None
    assert (e.queue_via, e.queue_vector, e.queue_isr, e.queue_used) == ("line", 0x40, 1, 1)
    assert r.guest_errors and "no queue interrupt" in r.guest_errors[0]
    assert (r.pci_cfg, r.ecam_base, r.ecam_enabled_by) == ("ecam", 0xB0000000, "guest")
