"""Check every prerequisite of the capture and say how to fix what is missing.

Prints one row per check (ok / FAIL / unavailable / warn) with the detail and the fix. Exits
non-zero when a core prerequisite fails (privileges, host PID namespace, tracefs, kernel headers
or BTF, BCC, a core hook family); optional features (kprobes, fentry, vhost, bpf stats) only warn.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
from dataclasses import asdict, dataclass
from typing import Optional

OK, FAIL, UNAVAILABLE, WARN = "ok", "FAIL", "unavailable", "warn"

CAP_SYS_ADMIN, CAP_PERFMON, CAP_BPF = 21, 38, 39
# The inode of the initial PID namespace, fixed in the kernel (PROC_PID_INIT_INO,
# include/linux/proc_ns.h); every other namespace gets one from 0xF0000000 up.
HOST_PID_NS_INODE = 0xEFFFFFFC
HOST_PID_FIX = ("run the agent in the host PID namespace: `hostPID: true` in the pod spec "
                "(deploy/base/daemonset.yaml sets it), `--pid=host` for docker or podman")


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    status: str
    detail: str
    fix: str = ""
    core: bool = False


def _cap_eff() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return int(line.split()[1], 16)
    except OSError:
        pass
    return 0


def check_privileges() -> Check:
    caps = _cap_eff()
    has = lambda bit: bool(caps >> bit & 1)  # noqa: E731
    if has(CAP_SYS_ADMIN) or (has(CAP_BPF) and has(CAP_PERFMON)):
        who = "root" if os.geteuid() == 0 else f"uid {os.geteuid()}"
        return Check("privileges", OK, f"{who}, CapEff={caps:#x}", core=True)
    return Check("privileges", FAIL, f"uid {os.geteuid()}, CapEff={caps:#x}: lacks CAP_BPF+CAP_PERFMON "
                 "(or CAP_SYS_ADMIN)", "run as root with CAP_BPF and CAP_PERFMON (kernel >= 5.8; "
                 "CAP_SYS_ADMIN before), as deploy/base/daemonset.yaml grants them", core=True)


def host_pid_problem(proc_root: str = "/proc") -> Optional[str]:
    """Why the pids BPF reports would not name this /proc's processes, or None.

    BPF reports every process by its pid in the host's (initial) PID namespace; VM identity
    reads /proc/<that pid>. Both hold only when this process is in the initial namespace (its
    ns/pid link names the kernel's fixed inode, whatever the container runtime) and /proc is
    mounted for it (/proc/self is this process's own pid there)."""
    link_path = os.path.join(proc_root, "self", "ns", "pid")
    try:
        link = os.readlink(link_path)
    except OSError as exc:
        return f"cannot read {link_path} ({exc.strerror})"
    if link != f"pid:[{HOST_PID_NS_INODE}]":
        return (f"not in the host PID namespace (this process is in {link}; the host's is "
                f"pid:[{HOST_PID_NS_INODE}]): the VMM pids BPF reports are host pids that this "
                "process cannot find in /proc, so VMs could not be identified")
    try:
        self_pid = int(os.readlink(os.path.join(proc_root, "self")))
    except (OSError, ValueError):
        self_pid = None
    if self_pid != os.getpid():
        return (f"{proc_root} is mounted for another PID namespace than this process's "
                f"(its self is {self_pid}, this process is {os.getpid()}): VM identity would be "
                "read from the wrong processes")
    return None


def check_host_pid() -> Check:
    problem = host_pid_problem()
    if problem:
        return Check("host PID namespace", FAIL, problem, HOST_PID_FIX, core=True)
    return Check("host PID namespace", OK,
                 f"pid:[{HOST_PID_NS_INODE}], /proc is the host's", core=True)


def check_tracefs() -> Check:
    from agent.capture.hooks import tracefs
    root = tracefs()
    if root is None:
        return Check("tracefs", FAIL, "no tracefs with events/ found",
                     "mount -t tracefs nodev /sys/kernel/tracing (in a pod: hostPath-mount "
                     "/sys/kernel/tracing)", core=True)
    if not os.path.isdir(os.path.join(root, "events", "kvm")):
        return Check("tracefs", FAIL, f"{root} has no kvm events", "load kvm (modprobe kvm_intel "
                     "or kvm_amd); the host must run KVM guests", core=True)
    return Check("tracefs", OK, f"{root}, kvm events present", core=True)


def check_headers() -> Check:
    rel = platform.release()
    build = f"/lib/modules/{rel}/build"
    btf = os.path.exists("/sys/kernel/btf/vmlinux")
    kheaders = os.path.exists("/sys/kernel/kheaders.tar.xz")
    parts = []
    if os.path.isdir(build):
        target = os.path.realpath(build)
        parts.append(f"headers {target}")
        if rel.split("-")[0] not in target:
            parts.append(f"(not an exact {rel} tree: fine for these tracepoint programs)")
    if kheaders:
        parts.append("kheaders module")
    if btf:
        parts.append("BTF /sys/kernel/btf/vmlinux")
    if os.path.isdir(build) or kheaders:
        return Check("kernel headers / BTF", OK, ", ".join(parts), core=True)
    detail = f"no kernel headers at {build}, no kheaders module"
    if btf:
        detail += " (BTF /sys/kernel/btf/vmlinux is present, but BCC compiles against headers)"
    return Check("kernel headers / BTF", FAIL, detail,
                 f"install linux-headers-{rel} (or modprobe kheaders); BCC compiles against them "
                 "(in a pod: hostPath-mount /lib/modules and /usr/src)", core=True)


def check_bcc() -> Check:
    try:
        import bcc
    except Exception as exc:
        return Check("BCC", FAIL, f"import bcc failed: {exc}",
                     "apt-get install python3-bpfcc (and make it visible to this Python)",
                     core=True)
    return Check("BCC", OK, f"bcc {getattr(bcc, '__version__', '?')} from {bcc.__file__}",
                 core=True)


def check_kvm() -> Check:
    # The agent never opens /dev/kvm (a pod does not even see it): the kvm tracepoints checked
    # under tracefs are what it needs, so a missing device node is only a warning.
    if not os.path.exists("/dev/kvm"):
        return Check("KVM", WARN, "/dev/kvm not visible here (fine in a container: the agent "
                     "uses the kvm tracepoints, not the device)", "on the host itself, load "
                     "kvm_intel/kvm_amd", core=False)
    qemu = shutil.which("qemu-system-x86_64")
    return Check("KVM", OK, "/dev/kvm present" + (f", {qemu}" if qemu else ""), core=False)


def check_bpf_stats() -> Check:
    from agent.capture.stats import bpf_stats_enabled
    if bpf_stats_enabled():
        return Check("bpf stats", OK, "kernel.bpf_stats_enabled=1: per-program run time reported")
    return Check("bpf stats", WARN, "kernel.bpf_stats_enabled=0: no per-program run time",
                 "sysctl -w kernel.bpf_stats_enabled=1 (small overhead per BPF run)")


def check_kprobes() -> Check:
    from agent.capture.hooks import kprobes_problem
    problem = kprobes_problem()
    if problem:
        return Check("kprobes", UNAVAILABLE, problem, "a kernel with CONFIG_KPROBES and "
                     "CONFIG_KPROBE_EVENTS (only the optional vhost_kprobe family needs it)")
    return Check("kprobes", OK, "kprobe PMU present")


def check_fentry() -> Check:
    try:
        from bcc import BPF
    except Exception as exc:
        return Check("fentry", UNAVAILABLE, f"BCC missing: {exc}")
    if not BPF.support_kfunc():
        return Check("fentry", UNAVAILABLE, "no BPF trampoline support",
                     "kernel >= 5.5 with CONFIG_DEBUG_INFO_BTF (optional)")
    from agent.daemon.native_output import native_output_captured

    try:
        # libbcc prints its own complaint; it must not break the table
        with native_output_captured():
            b = BPF(text="KFUNC_PROBE(vfs_read) { return 0; }")
            b.cleanup()
    except Exception as exc:
        msg = str(exc).strip().splitlines()[-1][:120] if str(exc).strip() else type(exc).__name__
        if "super-user" in msg and os.geteuid() == 0:
            msg = "the kernel refused the program with EPERM although we are root"
        return Check("fentry", UNAVAILABLE, f"loading an fentry program failed ({msg})",
                     "kernel with BPF trampolines (CONFIG_FUNCTION_TRACER, "
                     "CONFIG_DYNAMIC_FTRACE_WITH_DIRECT_CALLS); optional, nothing uses it today")
    return Check("fentry", OK, "fentry program loaded")


def check_vhost() -> Check:
    mods = [m for m in ("vhost", "vhost_vdpa", "vhost_net") if os.path.isdir(f"/sys/module/{m}")]
    devs = [d for d in os.listdir("/dev") if d.startswith("vhost")] if os.path.isdir("/dev") else []
    if not mods and not devs:
        return Check("vhost", UNAVAILABLE, "no vhost module or /dev/vhost-* device: "
                     "vhost-vdpa status capture has nothing to see",
                     "modprobe vhost_vdpa (only if guests use vDPA devices)")
    return Check("vhost", OK, f"modules {mods or '-'}, devices {devs or '-'}")


def check_hooks() -> list[Check]:
    from agent.capture import FAMILIES, Capture
    from agent.daemon.native_output import native_output_captured

    try:
        with native_output_captured() as said:
            cap = Capture()
            statuses = cap.start()
    except Exception as exc:
        return [Check("hooks", FAIL, f"capture failed to load: {exc}; libbcc: "
                      f"{' | '.join(said.lines()[-5:])}", "see the failures above", core=True)]
    try:
        raw = cap.raw_tracepoints
    finally:
        cap.close()
    out = [Check("raw tracepoints", OK if raw else WARN,
                 "used (cheaper)" if raw else "not usable: falling back to regular tracepoints",
                 "" if raw else "kernel >= 4.17 (>= 5.x for tracepoints in modules)")]
    for name in sorted(FAMILIES, key=lambda n: (not FAMILIES[n].core, n)):
        fam = FAMILIES[name]
        st = statuses.get(name)
        if st is not None and st.attached:
            out.append(Check(f"hook {name}", OK, f"{st.reason}: {fam.description}",
                             core=fam.core))
        else:
            reason = st.reason if st else "not tried"
            status = FAIL if fam.core else UNAVAILABLE
            fix = ("needs a kernel with this tracepoint and BPF raw/regular tracepoint support"
                   if fam.core else "optional: " + fam.description + " will not be captured")
            out.append(Check(f"hook {name}", status, reason, fix, core=fam.core))
    return out


def load_failure_checks(bcc_output: str = "") -> list[Check]:
    """What doctor would say about a capture whose core hook families did not load: the
    failing prerequisites, else a diagnosis from what libbcc printed (`bcc_output`)."""
    failed = [c for c in (check_privileges(), check_host_pid(), check_tracefs(),
                          check_headers(), check_bcc()) if c.status == FAIL]
    return failed or [diagnose_bcc_output(bcc_output)]


def diagnose_bcc_output(bcc_output: str) -> Check:
    """A failed BPF build or load, from what libbcc printed, when no prerequisite failed."""
    text = bcc_output.lower()
    if "operation not permitted" in text or "eperm" in text:
        return Check("BPF load", FAIL, "the kernel refused bpf() with EPERM",
                     "allow the bpf and perf_event_open syscalls: an unconfined seccomp "
                     "profile (seccompProfile: Unconfined) and CAP_BPF, CAP_PERFMON "
                     "(CAP_SYS_ADMIN before kernel 5.8)", core=True)
    if "kernel headers" in text or ("/build" in text and "no such file" in text):
        rel = platform.release()
        return Check("kernel headers / BTF", FAIL, f"BCC found no headers for {rel}",
                     f"install linux-headers-{rel} (or modprobe kheaders) and mount "
                     "/lib/modules and /usr/src into the container", core=True)
    return Check("hooks", FAIL, "the BPF programs did not compile or load",
                 "run `virtio-recovery-agent doctor` on the host and read libbcc's output",
                 core=True)


def run_checks() -> list[Check]:
    checks = [check_privileges(), check_host_pid(), check_tracefs(), check_headers(),
              check_bcc(), check_kvm()]
    prerequisites_ok = all(c.status == OK for c in checks if c.core)
    if prerequisites_ok:
        checks += check_hooks()
    else:
        checks.append(Check("hooks", FAIL, "not tried: a prerequisite above failed",
                            "fix the failures above", core=True))
    checks += [check_bpf_stats(), check_kprobes()]
    if prerequisites_ok:
        checks.append(check_fentry())
    checks.append(check_vhost())
    return checks


def format_table(checks: list[Check]) -> str:
    rows = [("CHECK", "STATUS", "DETAIL", "")] + [
        (c.name, c.status, c.detail, c.fix) for c in checks]
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    lines = []
    for r in rows:
        line = f"{r[0]:<{w0}}  {r[1]:<{w1}}  {r[2]}"
        if r[3]:
            line += f"\n{'':<{w0}}  {'':<{w1}}  fix: {r[3]}"
        lines.append(line)
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the checks as JSON")


def main(args: argparse.Namespace) -> int:
    checks = run_checks()
    failed = [c for c in checks if c.core and c.status == FAIL]
    if getattr(args, "json", False):
        print(json.dumps([asdict(c) for c in checks], indent=2))
    else:
        print(format_table(checks))
        print()
        print(f"{len(failed)} core prerequisite(s) failed" if failed
              else "all core prerequisites OK")
    return 1 if failed else 0


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    add_arguments(p)
    sys.exit(main(p.parse_args()))
