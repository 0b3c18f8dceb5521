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
