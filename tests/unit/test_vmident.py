"""agent.vmm.vmident on /proc trees built in tmp dirs."""
from __future__ import annotations

import os

import pytest

from agent.vmm.vmident import ProcessGone, qemu_opts, read_vm, start_time, vm_started

SECRET = "hunter2-s3cret"


def fake_proc(root, pid, argv, comm=None, starttime=4242, cgroup="0::/machine.slice/x\n",
              stat_comm=None):
    d = root / str(pid)
    d.mkdir(parents=True)
    (d / "cmdline").write_bytes(b"\0".join(a.encode() for a in argv) + b"\0")
    comm = comm if comm is not None else os.path.basename(argv[0])[:15]
    (d / "comm").write_text(comm + "\n")
    stat_comm = stat_comm if stat_comm is not None else comm
    fields = ["S", "1", str(pid), str(pid)] + ["0"] * 15 + [str(starttime)] + ["0"] * 30
    (d / "stat").write_text(f"{pid} ({stat_comm}) " + " ".join(fields) + "\n")
    (d / "cgroup").write_text(cgroup)
    return str(root)


def test_libvirt_qemu_name_uuid_and_qmp_from_chardev(tmp_path):
    argv = ["/usr/bin/qemu-system-x86_64", "-name", "guest=web-01,debug-threads=on",
            "-S", "-object", f"secret,id=masterKey0,format=raw,data={SECRET}",
            "-uuid", "5f4d3c2b-1a09-4876-b5c4-d3e2f1a0b9c8",
            "-chardev", "socket,id=charmonitor,path=/var/lib/libvirt/qemu/domain-1-web-01/monitor.sock,server=on,wait=off",
            "-mon", "chardev=charmonitor,id=monitor,mode=control"]
    root = fake_proc(tmp_path, 1234, argv, comm="qemu-system-x86")
    info = read_vm(1234, root)
    i = info.identity
    assert (i.pid, i.start_time, i.name, i.namespace, i.vmm) == (1234, 4242, "web-01", "", "qemu")
    assert i.uuid == "5f4d3c2b-1a09-4876-b5c4-d3e2f1a0b9c8"
    assert SECRET not in repr(info) and SECRET not in repr(info.to_event(1))


def test_plain_qemu_name(tmp_path):
    argv = ["qemu-system-x86_64", "-accel", "kvm", "-name", "lab,,one,process=q",
            "-qmp", "unix:/tmp/q.sock,server,nowait", "-nographic"]
    info = read_vm(7, fake_proc(tmp_path, 7, argv))
    assert info.identity.name == "lab_one"    # ",," is a comma; cleaned for labels


def test_kubevirt_domain_name_gives_namespace_and_vm(tmp_path):
    argv = ["/usr/libexec/qemu-kvm", "-name", "guest=prod-ns_my_vm,debug-threads=on",
            "-chardev", "socket,id=charmonitor,fd=20,server=on,wait=off",
            "-mon", "chardev=charmonitor,id=monitor,mode=control"]
    cg = "0::/kubepods.slice/kubepods-burstable.slice/cri-containerd-abc.scope\n"
    info = read_vm(99, fake_proc(tmp_path, 99, argv, comm="qemu-kvm", cgroup=cg))
    assert (info.identity.namespace, info.identity.name) == ("prod-ns", "my_vm")


def test_libvirt_name_with_underscore_outside_kubernetes_is_kept_whole(tmp_path):
    argv = ["qemu-system-x86_64", "-name", "guest=db_primary,debug-threads=on"]
    info = read_vm(5, fake_proc(tmp_path, 5, argv))
    assert (info.identity.namespace, info.identity.name) == ("", "db_primary")


def test_firecracker_id(tmp_path):
    argv = ["/usr/bin/firecracker", "--api-sock", "/run/fc.sock", "--id", "sandbox-42"]
    info = read_vm(11, fake_proc(tmp_path, 11, argv))
    assert (info.identity.name, info.identity.vmm) == ("sandbox-42", "firecracker")


def test_cloud_hypervisor_name_from_api_socket_dir(tmp_path):
    argv = ["/usr/bin/cloud-hypervisor", "--api-socket", "path=/run/vc/vm/ab12cd/clh-api.sock",
            "--kernel", "/k"]
    info = read_vm(12, fake_proc(tmp_path, 12, argv, comm="cloud-hyperviso"))
    assert (info.identity.name, info.identity.vmm) == ("ab12cd", "cloud-hypervisor")


def test_fallback_and_unknown_vmm(tmp_path):
    info = read_vm(13, fake_proc(tmp_path, 13, ["/usr/bin/qemu-system-x86_64", "-m", "64"]))
    assert info.identity.name == "pid-13"
    info = read_vm(14, fake_proc(tmp_path, 14, ["/opt/other", f"--password={SECRET}"]))
    assert (info.identity.name, info.identity.vmm) == ("pid-14", "unknown")
    assert SECRET not in repr(info)


def test_stat_comm_with_spaces_and_parentheses(tmp_path):
    argv = ["qemu-system-x86_64", "-name", "a"]
    root = fake_proc(tmp_path, 15, argv, stat_comm="qemu) (evil 1 2", starttime=987654)
    assert read_vm(15, root).identity.start_time == 987654
    assert start_time("1 (x) S" + " 0" * 18 + " 777 0 0") == 777
    with pytest.raises(ValueError, match="fields"):
        start_time("1 (x) S 0 0")


def test_gone_process(tmp_path):
    with pytest.raises(ProcessGone):
        read_vm(4242, str(tmp_path))
    assert vm_started(4242, 1, str(tmp_path)) is None


def test_vm_started_event_carries_identity(tmp_path):
    root = fake_proc(tmp_path, 16, ["qemu-system-x86_64", "-name", "guest=n1"], starttime=31)
    ev = vm_started(16, 555, root)
    assert (ev.ts_ns, ev.pid, ev.start_time, ev.name, ev.vmm) == (555, 16, 31, "n1", "qemu")


def test_qemu_opts():
    assert qemu_opts("a,,b,c=d,e") == ("a,b", {"c": "d", "e": "on"})
    assert qemu_opts("guest=x") == (None, {"guest": "x"})


def test_this_process_is_readable_from_the_real_proc():
    info = read_vm(os.getpid())
    with open(f"/proc/{os.getpid()}/stat") as f:
        assert info.identity.start_time == int(f.read().rsplit(")", 1)[1].split()[19])


def test_a_real_qemu_process(kvm, tmp_path):
    import subprocess
    import time

    sock = tmp_path / "qmp.sock"
    proc = subprocess.Popen(
        ["qemu-system-x86_64", "-machine", "none", "-S", "-nodefaults", "-display", "none",
         "-name", "guest=real-guest,debug-threads=on", "-uuid", "00000000-0000-4000-8000-000000000001",
         "-qmp", f"unix:{sock},server=on,wait=off"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while not sock.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert proc.poll() is None, proc.stderr.read().decode()
        info = read_vm(proc.pid)
        assert (info.identity.name, info.identity.vmm) == ("real-guest", "qemu")
        assert info.identity.uuid == "00000000-0000-4000-8000-000000000001"
    finally:
        proc.kill()
        proc.wait()


def test_identify_vm_for_run(tmp_path):
    import time

    from agent.vmm.vmident import identify_vm

    root = fake_proc(tmp_path, 17, ["firecracker", "--id", "fc1"])
    before = time.monotonic_ns()
    ev = identify_vm(17, root)
    assert ev.name == "fc1" and ev.ts_ns >= before
    assert identify_vm(18, root) is None


def _set_state(root, pid, state):
    stat = root / str(pid) / "stat"
    head, rest = stat.read_text().rsplit(") ", 1)
    stat.write_text(f"{head}) {state} {rest.split(' ', 1)[1]}")


def test_process_gone_only_when_certain(tmp_path):
    from agent.vmm.vmident import process_gone

    root = fake_proc(tmp_path, 31, ["qemu-system-x86_64"], starttime=500)
    assert not process_gone(31, 500, root)
    assert not process_gone(31, 0, root)          # start time unknown: the pid is there
    assert process_gone(31, 501, root)            # another process under the pid
    assert process_gone(32, 500, root)            # no /proc entry
    _set_state(tmp_path, 31, "Z")                 # exited, not yet reaped
    assert process_gone(31, 500, root) and process_gone(31, 0, root)
    _set_state(tmp_path, 31, "X")
    assert process_gone(31, 500, root)
    _set_state(tmp_path, 31, "R")
    assert not process_gone(31, 500, root)
    (tmp_path / "33" / "stat").mkdir(parents=True)   # unreadable: not known to be gone
    assert not process_gone(33, 500, root)
    (tmp_path / "34").mkdir()
    (tmp_path / "34" / "stat").write_text("34 (qemu\n")  # malformed: not known to be gone
    assert not process_gone(34, 500, root)
