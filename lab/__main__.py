"""`python -m lab run ...`: run one lab scenario and print the guest's lines and a summary.

    python -m lab run --transport modern --scenario recover --devices 2 --repeat 3
    python -m lab run --machine q35 --firmware seabios --irqchip split --extra blk --scenario recover
    python -m lab cmd --transport mmio --scenario fault     # print the QEMU command line only
    python -m lab bench --runs 5                              # wall/boot/recovery per transport
    python -m lab linux --device blk --fault                  # real Linux under TCG (lab/linux)
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
import tempfile
from pathlib import Path

from lab.harness import (
    EXTRAS, FIRMWARES, IRQ_MODES, IRQCHIPS, MACHINES, PCI_CFG_MECHANISMS, SCENARIOS, TRANSPORTS,
    BOOT_PROTOCOLS,
    GuestSpec, LabError, LabVM, ensure_guest, qemu_command,
)


def _spec(a: argparse.Namespace) -> GuestSpec:
    return GuestSpec(
        transport=a.transport, scenario=a.scenario, devices=a.devices, irq=a.irq, repeat=a.repeat,
        delay_ms=a.delay_ms, hold_ms=a.hold_ms, fault_dev=a.fault_dev, reads=a.reads,
        writes=a.writes, period_ms=a.period_ms, kick_ms=a.kick_ms,
        start_delay_ms=a.start_delay_ms, fault_delay_ms=a.fault_delay_ms,
        detect_ms=a.detect_ms, pit_ms=a.pit_ms, qmp=a.qmp, boot=a.boot,
        prefault=a.prefault, queue_gap_ms=a.queue_gap_ms, machine=a.machine,
        firmware=a.firmware, irqchip=a.irqchip, extra=a.extra,
        extra_transitional=a.extra_transitional, pcicfg=a.pcicfg, ioeventfd=a.ioeventfd,
        trace=tuple(a.trace or ()))


def _summary(result) -> dict:
    eps = []
    for e in result.episodes:
        eps.append({
            "dev": e.dev, "ep": e.ep, "status_at_detection": e.needs_reset_status,
            "timed_out": e.timed_out, "status_writes": e.status_values,
            "detect_latency_ns": e.detect_latency_ns, "reaction_ns": e.reaction_ns,
            "reset_latency_ns": e.reset_latency_ns, "reinit_ns": e.reinit_ns,
            "recovery_ns": e.recovery_ns, "total_ns": e.total_ns,
            "queue_via": e.queue_via, "queue_vector": e.queue_vector, "queue_isr": e.queue_isr,
            "queue_to_fault_ns": e.queue_to_fault_ns})
    return {
        "ok": result.ok, "exit_code": result.exit_code, "wall_s": round(result.wall_s, 3),
        "boot": dataclasses.asdict(result.boot) if result.boot else None,
        "devices": [dataclasses.asdict(d) for d in result.devices],
        "episodes": eps, "storms": [dataclasses.asdict(s) for s in result.storms],
        "final_status": result.final_status, "virtio_errors": result.virtio_errors,
        "pci_cfg": result.pci_cfg, "ecam_base": result.ecam_base,
        "guest_errors": result.guest_errors,
    }


def _bench(runs: int) -> int:
    """Median figures of `recover` runs per transport: QEMU wall time (start to exit), guest time
    from entry to its first device access (boot), and NEEDS_RESET seen -> DRIVER_OK."""
    from statistics import median

    from lab.harness import run
    print(f"{'transport':10} {'wall_ms':>8} {'entry->dev_ms':>13} {'entry->done_ms':>14} "
          f"{'recovery_us':>11} {'detect_us':>9}")
    for transport in TRANSPORTS:
        rows = []
        for _ in range(runs):
            r = run(GuestSpec(transport=transport, scenario="recover", detect_ms=50))
            e = r.episodes[0]
            rows.append((r.wall_s * 1e3, r.status_writes[0].ns / 1e6, r.done_ns / 1e6,
                         e.recovery_ns, e.detect_latency_ns))
        m = [median(col) if None not in col else None for col in zip(*rows)]

        def us(v: float | None) -> str:
            return "n/a" if v is None else f"{v / 1e3:.0f}"
        print(f"{transport:10} {m[0]:8.1f} {m[1]:13.2f} {m[2]:14.2f} {us(m[3]):>11} {us(m[4]):>9}"
              + ("   (legacy: no NEEDS_RESET)" if m[3] is None else ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lab", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=("run", "cmd", "build", "bench", "linux"))
    p.add_argument("--device", choices=("rng", "net", "blk"), default="rng",
                   help="linux: the virtio device of the real Linux guest (lab/linux)")
    p.add_argument("--fault", action="store_true", help="linux: break the device from the host")
    p.add_argument("--rounds", type=int, default=6, help="linux: traffic rounds after ready")
    p.add_argument("--runs", type=int, default=5, help="bench: runs per transport")
    p.add_argument("--transport", choices=TRANSPORTS, default="modern")
    p.add_argument("--scenario", choices=SCENARIOS, default="recover")
    p.add_argument("--devices", type=int, default=1)
    p.add_argument("--irq", choices=IRQ_MODES, default="msix")
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--delay-ms", type=int, default=0)
    p.add_argument("--hold-ms", type=int, default=0)
    p.add_argument("--fault-dev", type=int, default=None)
    p.add_argument("--reads", type=int, default=100000)
    p.add_argument("--writes", type=int, default=100000)
    p.add_argument("--period-ms", type=int, default=10)
    p.add_argument("--kick-ms", type=int, default=5, help="linux: kick period")
    p.add_argument("--start-delay-ms", type=int, default=0)
    p.add_argument("--fault-delay-ms", type=int, default=0,
                   help="fault/stuck/recover/fail: wait this long before each fault")
    p.add_argument("--detect-ms", type=int, default=2000)
    p.add_argument("--pit-ms", type=int, default=0)
    p.add_argument("--boot", choices=BOOT_PROTOCOLS, default=None,
                   help="default: multiboot under SeaBIOS, else pvh")
    p.add_argument("--no-prefault", dest="prefault", action="store_false",
                   help="fault/stuck/recover/fail: no config reads and queue request before "
                        "each fault")
    p.add_argument("--queue-gap-ms", type=int, default=2,
                   help="the pre-fault queue interrupt -> the fault")
    p.add_argument("--machine", choices=MACHINES, default=None,
                   help="default: pc (virtio-pci), microvm (mmio)")
    p.add_argument("--firmware", choices=FIRMWARES, default="qboot")
    p.add_argument("--irqchip", choices=IRQCHIPS, default=None,
                   help="-machine kernel-irqchip=; default: the machine's")
    p.add_argument("--extra", choices=EXTRAS, default="",
                   help="one more virtio device (net or blk), brought up, never faulted")
    p.add_argument("--extra-transitional", action="store_true",
                   help="the extra device is transitional (PCI id 0x1000/0x1001)")
    p.add_argument("--pcicfg", choices=PCI_CFG_MECHANISMS, default="cf8",
                   help="the guest's PCI config accesses: 0xCF8/0xCFC ports or q35's ECAM")
    p.add_argument("--no-ioeventfd", dest="ioeventfd", action="store_false",
                   help="every virtio device with ioeventfd=off")
    p.add_argument("--qmp", action="store_true")
    p.add_argument("--trace", action="append", help="QEMU -trace pattern (repeatable)")
    p.add_argument("--timeout", type=float, default=60.0)
    p.add_argument("--workdir", type=Path, help="keep serial.log, qemu.log, stderr.log here")
    p.add_argument("--json", action="store_true", help="print the summary as JSON only")
    a = p.parse_args(argv)
    try:
        if a.command == "build":
            print(ensure_guest())
            return 0
        if a.command == "bench":
            return _bench(a.runs)
        if a.command == "linux":
            from lab.linux.run import main as linux_main
            return linux_main(a.device, a.fault, a.workdir, a.rounds)
        spec = _spec(a)
        if a.command == "cmd":
            workdir = a.workdir or Path(tempfile.gettempdir()) / "vra-lab"
            print(shlex.join(qemu_command(spec, workdir)))
            return 0
        vm = LabVM.start(spec, workdir=a.workdir)
        print(f"# qemu pid {vm.pid}", file=sys.stderr)
        result = vm.wait(a.timeout)
    except (ValueError, LabError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not a.json:
        for line in result.serial_lines:
            print(line)
        for m in result.qemu_messages:
            print(f"# qemu: {m.text}")
    print(json.dumps(_summary(result), indent=None if not a.json else 2))
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
