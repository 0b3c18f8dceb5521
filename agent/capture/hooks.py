"""The hook families of bpf/capture.c and what each needs from the kernel.

A family compiles (-DFAM_<NAME>) and attaches independently of the others; `check()` says
before compiling whether the kernel can have it at all, so a missing tracepoint or symbol is
reported as a reason instead of a compile error.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

TRACEFS_ROOTS = ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")


@dataclass(frozen=True, slots=True)
class HookStatus:
    name: str
    attached: bool
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Family:
    name: str
    macro: str
    tracepoints: tuple[tuple[str, str], ...] = ()  # (category, event)
    raw: bool = True            # uses raw tracepoints when the kernel allows
    kprobes: tuple[str, ...] = ()
    core: bool = False          # the agent is useless without it (doctor fails)
    description: str = ""


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("mmio", "FAM_MMIO", (("kvm", "kvm_mmio"),), core=True,
           description="guest MMIO reads/writes (modern virtio-pci, virtio-mmio status)"),
    Family("pio", "FAM_PIO", (("kvm", "kvm_pio"),), core=True,
           description="guest port I/O (legacy virtio-pci status)"),
    Family("fast_mmio", "FAM_FAST_MMIO", (("kvm", "kvm_fast_mmio"),),
           description="ioeventfd kicks on watched notify addresses"),
    Family("msi", "FAM_MSI", (("kvm", "kvm_msi_set_irq"),),
           description="MSI injections (config interrupt vectors)"),
    Family("gsi", "FAM_GSI", (("kvm", "kvm_set_irq"),),
           description="GSI / INTx line changes"),
    Family("apic", "FAM_APIC", (("kvm", "kvm_apic_accept_irq"),), core=True,
           description="local APIC accepted a vector (delivery evidence)"),
    Family("exit", "FAM_EXIT", (("sched", "sched_process_exit"),), core=True,
           description="VMM process exit"),
    Family("ioctl", "FAM_IOCTL", (("syscalls", "sys_enter_ioctl"),
                                  ("syscalls", "sys_exit_ioctl")), raw=False,
           description="vhost-vdpa SET/GET_STATUS and KVM irq ioctls"),
    Family("vhost_kprobe", "FAM_VHOST_KPROBE", kprobes=("vdpa_set_status",), raw=False,
           description="in-kernel vDPA status writes (kprobe)"),
)}


# Families `--hooks auto` attaches only where vDPA exists. The syscall ioctl tracepoints fire on
# every ioctl of every process on the host, KVM_RUN of each userspace exit included (~130 ns
# of BPF plus the slow syscall path per exit, docs/benchmarks.md); without vDPA they only
# count KVM irq ioctls.
ONLY_WITH_VDPA = ("ioctl",)


def vdpa_present(sys_root: str = "/sys", dev_root: str = "/dev") -> bool:
    """The vhost_vdpa module is loaded, or a vDPA bus device or vhost-vdpa node exists."""
    if os.path.isdir(os.path.join(sys_root, "module", "vhost_vdpa")):
        return True
    try:
        if os.listdir(os.path.join(sys_root, "bus", "vdpa", "devices")):
            return True
    except OSError:
        pass
    try:
        return any(n.startswith("vhost-vdpa-") for n in os.listdir(dev_root))
    except OSError:
        return False


def auto_families(sys_root: str = "/sys", dev_root: str = "/dev") -> tuple[set[str], list[str]]:
    """`--hooks auto`: (families to enable, families left off because this host has no vDPA)."""
    if vdpa_present(sys_root, dev_root):
        return set(FAMILIES), []
    return set(FAMILIES) - set(ONLY_WITH_VDPA), sorted(ONLY_WITH_VDPA)


def tracefs() -> str | None:
    for root in TRACEFS_ROOTS:
        if os.path.isdir(os.path.join(root, "events")):
            return root
    return None


def kallsyms_has(names: tuple[str, ...], path: str = "/proc/kallsyms") -> set[str]:
    wanted = set(names)
    found: set[str] = set()
    try:
        with open(path) as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 3 and parts[2] in wanted:
                    found.add(parts[2])
    except OSError:
        pass
    return found


def kprobes_problem() -> str | None:
    root = tracefs()
    if not os.path.exists("/sys/bus/event_source/devices/kprobe/type") and not (
            root and os.path.exists(os.path.join(root, "kprobe_events"))):
        return "kernel has no kprobe PMU or kprobe_events (built without CONFIG_KPROBES / KPROBE_EVENTS)"
    return None


def check(family: Family) -> str | None:
    """Why this family cannot be attached on this kernel, or None if it may be."""
    root = tracefs()
    for cat, ev in family.tracepoints:
        if root is None:
            return "tracefs is not mounted (mount -t tracefs nodev /sys/kernel/tracing)"
        if not os.path.isdir(os.path.join(root, "events", cat, ev)):
            return f"tracepoint {cat}:{ev} does not exist on this kernel"
    if family.kprobes:
        problem = kprobes_problem()
        if problem:
            return problem
        missing = set(family.kprobes) - kallsyms_has(family.kprobes)
        if missing:
            return (f"kernel symbol(s) {', '.join(sorted(missing))} not present "
                    "(vhost/vdpa module not loaded)")
    return None


def kvm_is_module() -> bool:
    return os.path.exists("/sys/module/kvm/initstate")
