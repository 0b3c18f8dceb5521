"""The ioctl family: VHOST_VDPA_SET/GET_STATUS are recognised in the kernel from the syscall
alone, so issuing them on a file that does not implement them exercises the real path."""
from __future__ import annotations

import errno
import fcntl
import os
import time

import pytest

from agent.events import Op, VhostStatus

VHOST_VDPA_GET_STATUS = 0x8001AF71   # _IOR(0xAF, 0x71, __u8)
VHOST_VDPA_SET_STATUS = 0x4001AF72   # _IOW(0xAF, 0x72, __u8)


@pytest.fixture
def ioctl_capture(bpf):
    from agent.capture import Capture
    with Capture(hooks={"ioctl"}) as cap:
        assert cap.hook_status["ioctl"].attached, cap.hook_status
        yield cap


def _poll_mine(cap, seconds=0.5):
    out, end = [], time.monotonic() + seconds
    while time.monotonic() < end:
        out += [e for e in cap.poll(50) if e.pid == os.getpid()]
    return out


def test_set_status_value_is_read_from_user_memory(ioctl_capture):
    before = ioctl_capture.counters()["vhost_ioctl"]
    fd = os.open("/dev/null", os.O_RDONLY)
    try:
        for value in (0x0F, 0x4F):
            with pytest.raises(OSError) as exc:
                fcntl.ioctl(fd, VHOST_VDPA_SET_STATUS, bytes([value]))
            assert exc.value.errno == errno.ENOTTY
        events = _poll_mine(ioctl_capture)
    finally:
        os.close(fd)
    assert events == [VhostStatus(ts_ns=e.ts_ns, pid=os.getpid(), tid=e.tid, op=Op.WRITE, fd=fd,
                                  value=v) for e, v in zip(events, (0x0F, 0x4F))]
    assert len(events) == 2
    assert ioctl_capture.counters()["vhost_ioctl"] - before >= 2


def test_failed_get_status_is_not_reported(ioctl_capture):
    fd = os.open("/dev/null", os.O_RDONLY)
    try:
        with pytest.raises(OSError):
            fcntl.ioctl(fd, VHOST_VDPA_GET_STATUS, bytes(1))
        events = _poll_mine(ioctl_capture)
    finally:
        os.close(fd)
    assert events == []
    # the in-flight entry was consumed at syscall exit
    assert ioctl_capture.stats().maps["inflight_ioctl"].entries == 0


# --- decode against what the kernel side writes, not against agent.capture.decode.encode() ----

def test_set_status_from_a_thread_names_process_and_thread_apart(ioctl_capture):
    """Bytes the BPF program wrote with values known here: the process id (tgid) and the id of
    the issuing thread (tid), which differ off the main thread, the fd, the op and the value.
    A decoder that swapped two fields of `struct event` would not find them where they are."""
    import threading

    fd = os.open("/dev/null", os.O_RDONLY)
    issued: dict[str, int] = {}

    def issue() -> None:
        issued["tid"] = threading.get_native_id()
        try:
            fcntl.ioctl(fd, VHOST_VDPA_SET_STATUS, bytes([0x4B]))
        except OSError as exc:
            issued["errno"] = exc.errno

    try:
        t = threading.Thread(target=issue)
        t.start()
        t.join()
        events = _poll_mine(ioctl_capture)
    finally:
        os.close(fd)
    assert issued["errno"] == errno.ENOTTY and issued["tid"] != os.getpid()
    assert [(e.pid, e.tid, e.op, e.fd, e.value) for e in events] == \
        [(os.getpid(), issued["tid"], Op.WRITE, fd, 0x4B)]


def test_decode_reads_each_field_where_bcc_lays_out_struct_event(ioctl_capture):
    """BCC's own layout of `struct event` (the ctypes class it builds from the compiled program
    for the ring buffer, clang's offsets): a record filled field by field through it, with a
    distinct value in each field, decodes to those values."""
    import ctypes

    from agent.capture import decode as dec
    from agent.events import ApicAccepted, RegisterAccess, Space

    from bcc.table import _get_event_class     # what RingBuf.event() casts records to

    leaf_class = _get_event_class(ioctl_capture.bpf[b"events"])
    names = [name for name, _ in leaf_class._fields_]
    assert names == ["ts", "addr", "value", "tgid", "tid", "repeats", "size", "type", "op",
                     "space", "reg", "pad"], leaf_class._fields_
    assert ctypes.sizeof(leaf_class) == dec.EVENT_SIZE

    def record(**values) -> bytes:
        leaf = leaf_class()
        for name, v in values.items():
            setattr(leaf, name, v)
        return bytes(leaf)

    access = dec.decode(record(ts=0x1111_2222_3333, addr=0xFEBF_0014, value=0x0B, tgid=4242,
                               tid=4343, repeats=7, size=1, type=dec.EV_ACCESS, op=1, space=0,
                               reg=0))
    assert isinstance(access, RegisterAccess)
    assert (access.ts_ns, access.addr, access.value, access.pid, access.tid, access.repeats,
            access.size, access.op, access.space) == \
        (0x1111_2222_3333, 0xFEBF_0014, 0x0B, 4242, 4343, 7, 1, Op.WRITE, Space.MMIO)
    apic = dec.decode(record(ts=5, addr=1, value=0x23, tgid=10, tid=11, size=0x100,
                             type=dec.EV_APIC))
    assert apic == ApicAccepted(ts_ns=5, pid=10, tid=11, apicid=1, vector=0x23,
                                delivery_mode=0x100)
