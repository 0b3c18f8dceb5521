"""VM identity of a VMM process from /proc/PID (the proc root is injectable, for tests).

What is read: /proc/PID/stat (start time, field 22; the comm field may hold spaces and
parentheses), /proc/PID/cmdline (only the flags that name the VM), /proc/PID/comm and
/proc/PID/cgroup (to tell KubeVirt apart). The raw command line is never returned or logged:
it can carry secrets (passwords in -object secret,data=..., -drive ...,password=...).

Names, by VMM:
- QEMU: `-name guest=NAME,debug-threads=on` (libvirt) or `-name NAME[,...]`; `-uuid UUID`.
  KubeVirt runs QEMU through libvirt with the domain name `<namespace>_<vm>`; a Kubernetes
  namespace cannot contain "_", so the first "_" splits it. KubeVirt is recognised from the
  process cgroup (kubepods) or kubevirt paths in the command line.
- Firecracker: `--id ID`.
- Cloud Hypervisor: no name flag; the directory of `--api-socket` (Kata: /run/vc/vm/<id>/...) or
  the socket file name.
- otherwise `pid-<pid>`.
A QEMU's QMP socket is found by agent.vmm.qmp.qmp_sockets_from_cmdline (agent.vmm.confirm), not here.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Optional

from agent.events import VmStarted
from agent.model import VmIdentity

MAX_NAME = 128
_UNSAFE = re.compile(r"[^\w.:@+-]")   # keep label values printable and short


class ProcessGone(LookupError):
    """The process exited (or never existed) before it could be identified."""


@dataclass(frozen=True, slots=True)
class VmInfo:
    identity: VmIdentity

    def to_event(self, ts_ns: int) -> VmStarted:
        i = self.identity
        return VmStarted(ts_ns=ts_ns, pid=i.pid, start_time=i.start_time, name=i.name,
                         namespace=i.namespace, uuid=i.uuid, vmm=i.vmm)


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except (FileNotFoundError, ProcessLookupError):
        raise ProcessGone(path) from None


def start_time(stat: str) -> int:
    """Field 22 (starttime, clock ticks after boot) of a /proc/PID/stat line.

    Field 2 (comm) is in parentheses and may itself contain spaces and ")", so split after the
    LAST ")".
    """
    close = stat.rfind(")")
    if close < 0:
        raise ValueError("malformed /proc/PID/stat: no ')' after comm")
    rest = stat[close + 1:].split()
    # rest[0] is field 3 (state): field 22 is rest[19]
    if len(rest) < 20:
        raise ValueError(f"malformed /proc/PID/stat: {len(rest) + 2} fields, want >= 22")
    return int(rest[19])


def process_gone(pid: int, start: int, proc_root: str = "/proc") -> bool:
    """Has the process (pid, start time) certainly exited: no /proc entry, a zombie, or another
    process under its pid? (start 0: unknown, only the first two tell.) Unreadable is not gone."""
    try:
        with open(os.path.join(proc_root, str(pid), "stat")) as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return True
    except OSError:
        return False
    try:
        state = stat[stat.rindex(")") + 1:].split()[0]
        return state in ("Z", "X") or (start != 0 and start_time(stat) != start)
    except (ValueError, IndexError):
        return False


def qemu_opts(value: str) -> tuple[Optional[str], dict[str, str]]:
    """Split a QEMU option string: the implied first value (if any) and key=value pairs.
    ",," is an escaped comma."""
    parts, cur, i = [], [], 0
    while i < len(value):
        ch = value[i]
        if ch == ",":
            if value[i + 1:i + 2] == ",":
                cur.append(",")
                i += 2
                continue
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
        i += 1
    parts.append("".join(cur))
    implied: Optional[str] = None
    opts: dict[str, str] = {}
    for n, part in enumerate(parts):
        if "=" in part:
            k, v = part.split("=", 1)
            opts[k] = v
        elif n == 0:
            implied = part
        elif part:
            opts[part] = "on"
    return implied, opts


def _flags(argv: list[str]) -> list[tuple[str, Optional[str]]]:
    """(flag, value) pairs; `--flag` is folded to `-flag`, `--flag=value` split."""
    out = []
    i = 1
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("-"):
            flag = "-" + arg.lstrip("-")
            if "=" in flag and arg.startswith("--"):
                flag, val = flag.split("=", 1)
                out.append((flag, val))
                i += 1
                continue
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            if nxt is not None and not nxt.startswith("-"):
                out.append((flag, nxt))
                i += 2
                continue
            out.append((flag, None))
        i += 1
    return out


def _vmm(argv0: str, comm: str) -> str:
    base = os.path.basename(argv0).lower()
    for probe in (base, comm.lower()):
        if "qemu" in probe or probe == "kvm":
            return "qemu"
        if "firecracker" in probe:
            return "firecracker"
        if "cloud-hypervisor" in probe or probe == "cloud-hyperviso":
            return "cloud-hypervisor"
        if "crosvm" in probe:
            return "crosvm"
    return "unknown"


def clean_name(name: str) -> str:
    return _UNSAFE.sub("_", name)[:MAX_NAME]


def _qemu(flags: list[tuple[str, Optional[str]]]) -> tuple[str, str]:
    name, uuid = "", ""
    for flag, val in flags:
        if val is None:
            continue
        if flag == "-name":
            implied, opts = qemu_opts(val)
            name = opts.get("guest") or implied or name
        elif flag == "-uuid":
            uuid = val
    return name, uuid


def _cloud_hypervisor_name(flags: list[tuple[str, Optional[str]]]) -> str:
    for flag, val in flags:
        if flag == "-api-socket" and val:
            _, opts = qemu_opts(val)
            path = opts.get("path") or (val if "=" not in val else "")
            if not path:
                continue
            parent = os.path.basename(os.path.dirname(path))
            if parent and parent not in ("run", "tmp", "var", "sock", "sockets"):
                return parent
            return os.path.splitext(os.path.basename(path))[0]
    return ""


def read_vm(pid: int, proc_root: str = "/proc") -> VmInfo:
    """Identify the VMM process `pid`. Raises ProcessGone if it is not there (any more)."""
    base = os.path.join(proc_root, str(pid))
    stat = _read(os.path.join(base, "stat")).decode("utf-8", "replace")
    started = start_time(stat)
    argv = [a.decode("utf-8", "replace") for a in _read(os.path.join(base, "cmdline")).split(b"\0")]
    if argv and argv[-1] == "":
        argv.pop()
    try:
        comm = _read(os.path.join(base, "comm")).decode("utf-8", "replace").strip()
    except ProcessGone:
        comm = ""
    try:
        cgroup = _read(os.path.join(base, "cgroup")).decode("utf-8", "replace")
    except ProcessGone:
        cgroup = ""
    vmm = _vmm(argv[0] if argv else "", comm)
    flags = _flags(argv)
    name, namespace, uuid = "", "", ""
    if vmm == "qemu":
        name, uuid = _qemu(flags)
        kubevirt = "kubepods" in cgroup or any("kubevirt" in a for a in argv)
        if kubevirt and "_" in name:
            namespace, name = name.split("_", 1)
    elif vmm == "firecracker":
        name = next((v for f, v in flags if f == "-id" and v), "")
    elif vmm == "cloud-hypervisor":
        name = _cloud_hypervisor_name(flags)
    name = clean_name(name) or f"pid-{pid}"
    identity = VmIdentity(pid=pid, start_time=started, name=name,
                          namespace=clean_name(namespace), uuid=clean_name(uuid), vmm=vmm)
    return VmInfo(identity=identity)


def vm_started(pid: int, ts_ns: int, proc_root: str = "/proc") -> Optional[VmStarted]:
    """The VmStarted event for `pid`, or None if the process is already gone."""
    try:
        return read_vm(pid, proc_root).to_event(ts_ns)
    except ProcessGone:
        return None


def identify_vm(pid: int, proc_root: str = "/proc", ts_ns: Optional[int] = None) -> Optional[VmStarted]:
    """What `run` calls at the first event of a pid: its VmStarted, or None if it is gone.

    ts_ns defaults to CLOCK_MONOTONIC now (the clock of bpf_ktime_get_ns), which is after the
    event that revealed the pid: correlation then renames the `pid-<pid>` VM that event made,
    and a reused pid's VmStarted still sorts after the previous process's exit.
    """
    import time

    return vm_started(pid, time.monotonic_ns() if ts_ns is None else ts_ns, proc_root)
