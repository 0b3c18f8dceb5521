"""agent.vmm.qmp protocol handling, against a unix-socket peer that replays QEMU's recorded lines
(tests/unit/fixtures/qmp, captured from QEMU 7.2 by tests/lab/test_qmp_live.py), and the
command-line socket discovery. The same client runs against real QEMU in tests/lab/test_qmp_live.py."""
from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path
from typing import Callable, Optional

import pytest

from agent.vmm import qmp

FIXTURES = Path(__file__).parent / "fixtures" / "qmp"
TIMER_SLACK_S = 0.01    # socket timeouts are rounded to the poll() millisecond


def recorded(name: str) -> bytes:
    return (FIXTURES / f"{name}.json").read_bytes()


class Peer:
    """A unix socket server: sends `greeting`, then answers each request with `respond(req)`,
    a list of raw chunks (None: hang up). A reply that is not an event gets the request's id, as QEMU does."""

    def __init__(self, path: str, respond: Callable[[dict], Optional[list[bytes]]],
                 greeting: Optional[bytes] = None):
        self.requests: list[dict] = []
        self._respond = respond
        self._greeting = recorded("greeting") if greeting is None else greeting
        self._srv = socket.socket(socket.AF_UNIX)
        self._srv.bind(path)
        self._srv.listen(1)
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        conn, _ = self._srv.accept()
        with conn, conn.makefile("rb") as f:
            if self._greeting:
                conn.sendall(self._greeting)
            for line in f:
                req = json.loads(line)
                self.requests.append(req)
                chunks = self._respond(req)
                if chunks is None:      # hang up without replying
                    return
                try:
                    for chunk in chunks:
                        conn.sendall(chunk)
                except (BrokenPipeError, ConnectionResetError):
                    return      # the client gave up first (timeout, session limit)

    def close(self) -> None:
        self._srv.close()


def with_id(raw: bytes, req: dict) -> bytes:
    msg = json.loads(raw)
    if "event" not in msg:
        msg["id"] = req["id"]
    return json.dumps(msg).encode() + b"\r\n"


def replay(table: dict[str, list[str]]) -> Callable[[dict], list[bytes]]:
    def respond(req: dict) -> list[bytes]:
        return [with_id(recorded(name), req) for name in table[req["execute"]]]
    return respond


@pytest.fixture
def sock_path(tmp_path):
    return str(tmp_path / "qmp.sock")


def test_greeting_capabilities_and_a_command(sock_path):
    peer = Peer(sock_path, replay({"qmp_capabilities": ["qmp_capabilities"],
                                   "x-query-virtio": ["x-query-virtio"]}))
    with qmp.QmpClient.connect(sock_path) as c:
        assert c.version == qmp.QmpVersion(7, 2, 22, "Debian 1:7.2+dfsg-7+deb12u18+b3")
        ret = c.execute("x-query-virtio")
    assert [d["name"] for d in ret] == ["virtio-balloon", "virtio-rng", "virtio-net", "virtio-rng"]
    assert [r["execute"] for r in peer.requests] == ["qmp_capabilities", "x-query-virtio"]
    assert len({r["id"] for r in peer.requests}) == 2
    peer.close()


def test_error_reply_raises_typed_error_and_session_survives(sock_path):
    peer = Peer(sock_path, replay({"qmp_capabilities": ["qmp_capabilities"],
                                   "x-query-virtio-status": ["x-query-virtio-status.error"],
                                   "cont": ["cont"]}))
    with qmp.QmpClient.connect(sock_path) as c:
        with pytest.raises(qmp.QmpCommandError) as ei:
            c.execute("x-query-virtio-status", {"path": "/machine/peripheral/rp1"})
        assert c.execute("cont") == {}
    assert ei.value.error_class == "GenericError"
    assert ei.value.desc == "Path /machine/peripheral/rp1 is not a VirtIODevice"
    assert ei.value.command == "x-query-virtio-status"
    assert peer.requests[1]["arguments"] == {"path": "/machine/peripheral/rp1"}
    peer.close()


def test_events_before_the_reply_are_skipped_and_bounded(sock_path):
    peer = Peer(sock_path, replay({"qmp_capabilities": ["qmp_capabilities"],
                                   "cont": ["events"] * 5 + ["cont"]}))
    with qmp.QmpClient.connect(sock_path, max_events=3) as c:
        assert c.execute("cont") == {}
    assert len(c.events) == 3 and c.events_dropped == 2
    assert all(e["event"] == "STOP" for e in c.events)
    peer.close()


def test_reply_split_into_single_bytes(sock_path):
    def respond(req):
        return [bytes([b]) for b in with_id(recorded(req["execute"]), req)]
    peer = Peer(sock_path, respond)
    with qmp.QmpClient.connect(sock_path) as c:
        assert len(c.execute("query-pci")[0]["devices"]) == 8
    peer.close()


def test_two_replies_in_one_chunk(sock_path):
    """The event and the reply arrive in one recv(): both must be taken from the buffer."""
    def respond(req):
        if req["execute"] == "cont":
            return [recorded("events") + with_id(recorded("cont"), req)]
        return [with_id(recorded(req["execute"]), req)]
    peer = Peer(sock_path, respond)
    with qmp.QmpClient.connect(sock_path) as c:
        assert c.execute("cont") == {}
    assert len(c.events) == 1
    peer.close()


@pytest.mark.parametrize("greeting", [b'{"return": {}}\r\n', b"SSH-2.0-OpenSSH\r\n", b"[1]\r\n"])
def test_bad_greeting(sock_path, greeting):
    peer = Peer(sock_path, lambda req: [], greeting=greeting)
    with pytest.raises(qmp.QmpProtocolError):
        qmp.QmpClient.connect(sock_path)
    peer.close()


def test_silent_peer_times_out(sock_path):
    # Without the timeout connect() would wait forever: QmpTimeout at all is the proof; how long
    # it took is a benchmark (a busy host adds its scheduling delay).
    peer = Peer(sock_path, lambda req: [], greeting=b"")
    t0 = time.monotonic()
    with pytest.raises(qmp.QmpTimeout):
        qmp.QmpClient.connect(sock_path, timeout=0.2, budget_s=None)
    elapsed = time.monotonic() - t0
    assert elapsed >= 0.2 - TIMER_SLACK_S
    print(f"greeting timeout 0.2 s raised after {elapsed:.3f} s")
    peer.close()


def test_peer_closing_mid_reply(sock_path):
    def respond(req):
        if req["execute"] == "query-pci":
            return None
        return [with_id(recorded(req["execute"]), req)]
    peer = Peer(sock_path, respond)
    with qmp.QmpClient.connect(sock_path) as c:
        with pytest.raises(qmp.QmpProtocolError, match="closed"):
            c.execute("query-pci")
    peer.close()


def test_reply_with_a_foreign_id(sock_path):
    def respond(req):
        if req["execute"] == "cont":
            return [b'{"return": {}, "id": "someone-else"}\r\n']
        return [with_id(recorded(req["execute"]), req)]
    peer = Peer(sock_path, respond)
    with qmp.QmpClient.connect(sock_path) as c:
        with pytest.raises(qmp.QmpProtocolError, match="unexpected id"):
            c.execute("cont")
    peer.close()


def test_oversized_message_is_refused(sock_path, monkeypatch):
    monkeypatch.setattr(qmp, "MAX_LINE", 1000)
    peer = Peer(sock_path, lambda req: [with_id(recorded(req["execute"]), req)])
    with qmp.QmpClient.connect(sock_path) as c:
        with pytest.raises(qmp.QmpProtocolError, match="longer than"):
            c.execute("query-pci")      # 3.4 KB recorded reply
    peer.close()


def test_missing_socket_is_a_connect_error(tmp_path):
    with pytest.raises(qmp.QmpConnectError, match="No such file"):
        qmp.QmpClient.connect(str(tmp_path / "absent.sock"))


def test_query_helper_connects_per_call(sock_path):
    peer = Peer(sock_path, replay({"qmp_capabilities": ["qmp_capabilities"],
                                   "x-query-virtio": ["x-query-virtio"]}))
    assert len(qmp.query(sock_path, "x-query-virtio")) == 4
    peer._thread.join(2)
    assert not peer._thread.is_alive(), "query() must close the connection"
    peer.close()


# --- socket discovery --------------------------------------------------------------------------

def test_qmp_option_forms():
    argv = ["qemu-system-x86_64", "-S", "-qmp", "unix:/run/vm/a.sock,server=on,wait=off",
            "-nodefaults", "--qmp", "unix:/run/vm/b.sock,server,nowait",
            "-qmp-pretty", "unix:rel.sock,server=on",
            "-qmp", "unix:/run/vm/client.sock",                  # client mode: QEMU connects out
            "-qmp", "tcp:127.0.0.1:4444,server=on,wait=off",     # not a unix socket
            "-qmp", "unix:/run/vm/odd,,name.sock,server=on"]
    assert qmp.qmp_sockets_from_cmdline(argv) == [
        qmp.QmpSocket("/run/vm/a.sock", "-qmp"),
        qmp.QmpSocket("/run/vm/b.sock", "-qmp"),
        qmp.QmpSocket("rel.sock", "-qmp-pretty"),
        qmp.QmpSocket("/run/vm/odd,name.sock", "-qmp"),
    ]


def test_chardev_with_control_monitor_forms():
    argv = ["qemu",
            "-chardev", "socket,id=qmp0,path=/run/q0.sock,server=on,wait=off",
            "-mon", "chardev=qmp0,mode=control",
            "-chardev", "socket,id=hmp,path=/run/hmp.sock,server=on,wait=off",
            "-mon", "hmp",                                        # readline (HMP): not QMP
            "-chardev", "socket,path=/run/q1.sock,server=on,id=qmp1,abstract=on",
            "-mon", "qmp1,mode=control,pretty=on",
            "-chardev", "socket,id=cl,path=/run/cl.sock",        # client mode
            "-mon", "chardev=cl,mode=control",
            "-mon", "chardev=undefined,mode=control"]
    assert qmp.qmp_sockets_from_cmdline(argv) == [
        qmp.QmpSocket("/run/q0.sock", "-chardev", "qmp0"),
        qmp.QmpSocket("/run/q1.sock", "-chardev", "qmp1", abstract=True),
    ]


def test_libvirt_monitor_is_never_ours():
    # As libvirt starts QEMU (fd-passed in newer versions, a path in older ones).
    argv = ["/usr/bin/qemu-system-x86_64", "-name", "guest=vm1,debug-threads=on", "-S",
            "-chardev", "socket,id=charmonitor,fd=31,server=on,wait=off",
            "-mon", "chardev=charmonitor,id=monitor,mode=control"]
    assert qmp.qmp_sockets_from_cmdline(argv) == []
    old = ["qemu", "-chardev",
           "socket,id=charmonitor,path=/var/lib/libvirt/qemu/domain-1-vm1/monitor.sock,server,nowait",
           "-mon", "chardev=charmonitor,id=monitor,mode=control"]
    assert qmp.qmp_sockets_from_cmdline(old) == []


def test_option_at_the_end_without_value():
    assert qmp.qmp_sockets_from_cmdline(["qemu", "-qmp"]) == []
    assert qmp.qmp_sockets_from_cmdline([]) == []


def test_reachable_path():
    assert qmp.reachable_path(qmp.QmpSocket("/run/a.sock", "-qmp"), 42) == "/proc/42/root/run/a.sock"
    assert qmp.reachable_path(qmp.QmpSocket("a.sock", "-qmp"), 42, "/host/proc") == \
        "/host/proc/42/cwd/a.sock"
    assert qmp.reachable_path(qmp.QmpSocket("x", "-qmp", abstract=True), 42) == "\0x"


def test_long_path_goes_through_an_o_path_descriptor(tmp_path):
    deep = tmp_path / ("d" * 100)
    deep.mkdir()
    path = str(deep / "qmp.sock")
    assert len(path) > 108
    # bind() itself cannot take the long path: bind via a short symlinked directory
    short = tmp_path / "s"
    os.symlink(deep, short)
    peer = Peer(str(short / "qmp.sock"), replay({"qmp_capabilities": ["qmp_capabilities"]}))
    with qmp.QmpClient.connect(path) as c:
        assert c.version is not None
    peer.close()


# --- the session's overall time limit ----------------------------------------------------------

def slow(delay_s: float) -> Callable[[dict], list[bytes]]:
    def respond(req: dict) -> list[bytes]:
        if req["execute"] != "qmp_capabilities":
            time.sleep(delay_s)
        return [with_id(recorded(req["execute"] if req["execute"] != "query-status" else "cont"),
                        req)]
    return respond


def test_session_limit_bounds_many_commands_each_within_its_timeout(sock_path):
    """0.15 s per reply is far within the 2 s per-command timeout; the session's 0.5 s is not."""
    peer = Peer(sock_path, slow(0.15))
    t0 = time.monotonic()
    with qmp.QmpClient.connect(sock_path, timeout=2.0, budget_s=0.5) as c:
        with pytest.raises(qmp.QmpDeadline):
            for _ in range(20):
                c.execute("cont")
        elapsed = time.monotonic() - t0
        # not before the limit, however idle the host; how far after it is a benchmark
        assert elapsed >= 0.5 - TIMER_SLACK_S
        print(f"session limit 0.5 s stopped the commands after {elapsed:.3f} s")
        sent = len(peer.requests)
        # once the limit has passed nothing more is sent
        with pytest.raises(qmp.QmpDeadline, match="has passed"):
            c.execute("cont")
        assert len(peer.requests) == sent and c.time_left() < 0
    # capabilities + at most 4 commands: each reply takes >= 0.15 s however busy the host, so no
    # more fit in 0.5 s (unbounded: all 20)
    assert 2 <= sent <= 6
    assert issubclass(qmp.QmpDeadline, qmp.QmpTimeout)
    peer.close()


def test_session_limit_covers_the_greeting(sock_path):
    peer = Peer(sock_path, lambda req: [], greeting=b"")
    t0 = time.monotonic()
    # the silent greeting would wait out the 60 s timeout: QmpDeadline (not a plain timeout)
    # says the 0.2 s session limit cut it
    with pytest.raises(qmp.QmpDeadline):
        qmp.QmpClient.connect(sock_path, timeout=60.0, budget_s=0.2)
    elapsed = time.monotonic() - t0
    assert elapsed >= 0.2 - TIMER_SLACK_S
    print(f"session limit 0.2 s cut the greeting wait after {elapsed:.3f} s")
    peer.close()


def test_per_command_timeout_is_still_a_plain_timeout(sock_path):
    peer = Peer(sock_path, slow(0.5))
    with qmp.QmpClient.connect(sock_path, timeout=2.0, budget_s=5.0) as c:
        with pytest.raises(qmp.QmpTimeout) as ei:
            c.execute("cont", timeout=0.1)
    assert not isinstance(ei.value, qmp.QmpDeadline)
    peer.close()


def test_session_limit_default_and_validation(sock_path):
    peer = Peer(sock_path, replay({"qmp_capabilities": ["qmp_capabilities"]}))
    t0 = time.monotonic()
    with qmp.QmpClient.connect(sock_path) as c:
        assert c.deadline is not None
        limit = qmp.DEFAULT_SESSION_S
        assert t0 + limit - 0.5 < c.deadline <= time.monotonic() + limit
    peer.close()
    for bad in (0, -1.0, float("nan")):
        with pytest.raises(ValueError):
            qmp.QmpClient.connect(sock_path, budget_s=bad)


def test_no_session_limit_when_asked(sock_path):
    peer = Peer(sock_path, replay({"qmp_capabilities": ["qmp_capabilities"], "cont": ["cont"]}))
    with qmp.QmpClient.connect(sock_path, budget_s=None) as c:
        assert c.deadline is None and c.time_left() is None
        assert c.execute("cont") == {}
    peer.close()


# --- garbage from the peer stays inside the module's error types ------------------------------

def deep(n: int) -> bytes:
    return b"[" * n + b"]" * n


@pytest.mark.parametrize("greeting", [
    deep(100_000) + b"\r\n",                                           # RecursionError in json
    b'{"QMP": ' + deep(5000) + b"}\r\n",
    b'{"QMP": {"version": {"qemu": {"major": Infinity, "minor": 2, "micro": 0}}}}\r\n',
    b'{"QMP": {"version": {"qemu": {"major": NaN, "minor": 2, "micro": 0}}}}\r\n',
    b'{"QMP": {"version": {"qemu": {"major": 7.5, "minor": 2, "micro": 0}}}}\r\n',
    b'{"QMP": {"version": {"qemu": {"major": 7, "minor": 2, "micro": 0}, "package": []}}}\r\n',
    b'{"QMP": {"version": []}}\r\n',
])
def test_garbage_greeting_is_a_protocol_error(sock_path, greeting):
    peer = Peer(sock_path, lambda req: [], greeting=greeting)
    with pytest.raises(qmp.QmpProtocolError):
        qmp.QmpClient.connect(sock_path, timeout=1.0)
    peer.close()


def nested(n: int):
    x: list = []
    for _ in range(n):
        x = [x]
    return x


@pytest.mark.parametrize("reply", [
    deep(100_000) + b"\r\n",
    b'{"return": ' + deep(100_000) + b', "id": "vra-2"}\r\n',
])
def test_deeply_nested_reply_is_a_protocol_error(sock_path, reply):
    def respond(req):
        if req["execute"] == "cont":
            return [reply]
        return [with_id(recorded(req["execute"]), req)]
    peer = Peer(sock_path, respond)
    with qmp.QmpClient.connect(sock_path) as c:
        with pytest.raises(qmp.QmpProtocolError, match="nested too deeply"):
            c.execute("cont")
    peer.close()


def test_nested_values_in_messages_are_shown_bounded():
    """Error messages describe peer data with short_repr: never RecursionError, never huge."""
    x = nested(100_000)
    with pytest.raises(RecursionError):
        repr(x)
    assert len(qmp.short_repr(x)) <= 300
    assert len(qmp.short_repr("a" * 10_000)) <= 300
    with pytest.raises(qmp.QmpProtocolError):
        qmp.parse_greeting({"QMP": x})
    with pytest.raises(qmp.QmpProtocolError):
        qmp.parse_greeting({"QMP": {"version": {"qemu": {"major": float("inf"), "minor": 1,
                                                         "micro": 0}}}})


def test_odd_id_and_error_fields_are_typed_errors(sock_path):
    def respond(req):
        if req["execute"] == "cont":
            return [json.dumps({"return": {}, "id": {"a": [[["x"] * 50]]}}).encode() + b"\r\n"]
        if req["execute"] == "stop":
            return [json.dumps({"error": {"class": [1, 2], "desc": {"d": 1}},
                                "id": req["id"]}).encode() + b"\r\n"]
        return [with_id(recorded(req["execute"]), req)]
    peer = Peer(sock_path, respond)
    with qmp.QmpClient.connect(sock_path) as c:
        with pytest.raises(qmp.QmpProtocolError, match="unexpected id"):
            c.execute("cont")
    peer.close()
    os.unlink(sock_path)
    peer = Peer(sock_path, respond)
    with qmp.QmpClient.connect(sock_path) as c:
        with pytest.raises(qmp.QmpCommandError) as ei:
            c.execute("stop")
    assert ei.value.error_class == "[1, 2]" and ei.value.desc == "{'d': 1}"
    peer.close()
