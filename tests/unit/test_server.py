"""The HTTP endpoint over real sockets, with the real curl: /metrics (text, OpenMetrics, gzip,
HEAD), /healthz, headers, the listen backlog, the connection bound, TLS, listen-address parsing.
Client certificates, basic auth and reloads: test_server_auth.py."""
from __future__ import annotations

import gzip
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request

import pytest
from prometheus_client import CollectorRegistry, Gauge, Histogram
from prometheus_client.parser import text_string_to_metric_families

from agent.export import server as server_mod
from agent.export.server import ListenAddressError, MetricsServer, listen_backlog, parse_listen
from tests.unit.tlsfiles import Pki, curl


def registry() -> CollectorRegistry:
    """A few hundred lines of real prometheus_client metrics (gzip has something to do)."""
    reg = CollectorRegistry()
    Gauge("vra_test_build_info", "Build metadata.", ["version"], registry=reg).labels("0.1").set(1)
    h = Histogram("vra_test_recovery_seconds", "Recovery time.", ["vm", "device"], registry=reg)
    for vm in range(10):
        for dev in range(3):
            h.labels(f"vm-{vm}", f"pci-0000:00:0{dev}.0").observe(0.01 * (vm + dev))
    return reg


def get(url: str, context=None, headers=None) -> tuple[int, str, str]:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10, context=context) as resp:
            return resp.status, resp.headers["Content-Type"], resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read().decode()


@pytest.fixture
def srv():
    s = MetricsServer(registry(), "127.0.0.1:0").start()
    yield s
    s.close()


@pytest.mark.parametrize("text,expected", [
    (":9477", ("", 9477)),
    ("127.0.0.1:0", ("127.0.0.1", 0)),
    ("[::1]:9477", ("::1", 9477)),
    ("localhost:80", ("localhost", 80)),
])
def test_parse_listen(text, expected):
    assert parse_listen(text) == expected


@pytest.mark.parametrize("text", ["9477", "::1:9477", ":http", ":70000", "[::1]9477", "host:"])
def test_parse_listen_rejects(text):
    with pytest.raises(ListenAddressError):
        parse_listen(text)


def test_metrics_and_health_over_http():
    ready = {"ok": False, "msg": "core hooks not attached: mmio"}
    srv = MetricsServer(registry(), "127.0.0.1:0",
                        health_fn=lambda: (ready["ok"], ready["msg"])).start()
    try:
        code, ctype, body = get(srv.url + "/metrics")
        assert code == 200 and ctype.startswith("text/plain")
        names = {f.name for f in text_string_to_metric_families(body)}
        assert "vra_test_build_info" in names
        code, ctype, body = get(srv.url + "/metrics",
                                headers={"Accept": "application/openmetrics-text"})
        assert code == 200 and ctype.startswith("application/openmetrics-text")
        assert body.rstrip().endswith("# EOF")
        code, _, body = get(srv.url + "/healthz")
        assert code == 503 and "mmio" in body
        ready.update(ok=True, msg="ok")
        assert get(srv.url + "/healthz")[0] == 200
        assert get(srv.url + "/nope")[0] == 404
    finally:
        srv.close()


def test_health_fn_exception_is_a_503_not_a_crash():
    def boom():
        raise RuntimeError("loop died")

    srv = MetricsServer(registry(), "127.0.0.1:0", health_fn=boom).start()
    try:
        code, _, body = get(srv.url + "/healthz")
        assert code == 503 and "loop died" in body
    finally:
        srv.close()


def test_collect_failure_is_a_500():
    class Broken:
        def collect(self):
            raise RuntimeError("snapshot failed")

    reg = CollectorRegistry()
    reg.register(Broken())
    srv = MetricsServer(reg, "127.0.0.1:0").start()
    try:
        r = curl(srv.url + "/metrics")
        assert r.status == 500 and b"snapshot failed" in r.body
        assert curl(srv.url + "/healthz").status == 200  # the server itself is fine
    finally:
        srv.close()


def test_gzip_when_asked(srv):
    plain = curl(srv.url + "/metrics")
    assert plain.status == 200 and "content-encoding" not in plain.headers
    raw = curl(srv.url + "/metrics", "-H", "Accept-Encoding: gzip")
    assert raw.headers["content-encoding"] == "gzip"
    assert raw.body[:2] == b"\x1f\x8b" and len(raw.body) < len(plain.body)
    assert gzip.decompress(raw.body) == plain.body
    assert int(raw.headers["content-length"]) == len(raw.body)
    decoded = curl(srv.url + "/metrics", "--compressed")  # curl's own decoder agrees
    assert decoded.status == 200 and decoded.body == plain.body


@pytest.mark.parametrize("path,accept", [
    ("/metrics", ""), ("/metrics", "application/openmetrics-text"), ("/healthz", ""), ("/", ""),
])
def test_head_has_the_get_headers_and_no_body(srv, path, accept):
    extra = ["-H", f"Accept: {accept}"] if accept else []
    got = curl(srv.url + path, *extra)
    head = curl(srv.url + path, "--head", *extra)  # curl writes the headers as its output
    assert got.status == head.status == 200, head.stderr
    assert head.headers["content-length"] == str(len(got.body))
    assert head.headers["content-type"] == got.headers["content-type"]
    # nothing after the headers on the wire
    with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as s:
        s.sendall(f"HEAD {path} HTTP/1.0\r\nAccept: {accept}\r\n\r\n".encode())
        reply = b""
        while chunk := s.recv(4096):
            reply += chunk
    headers, sep, body = reply.partition(b"\r\n\r\n")
    assert headers.startswith(b"HTTP/1.0 200") and sep and body == b""


def test_other_methods_are_405(srv):
    r = curl(srv.url + "/metrics", "-X", "POST", "-d", "x")
    assert r.status == 405 and "GET" in r.headers["allow"]


def test_no_python_or_version_in_headers(srv):
    for r in (curl(srv.url + "/metrics"), curl(srv.url + "/nope"), curl(srv.url + "/healthz")):
        assert r.headers["server"] == "virtio-recovery-agent"
        assert not any("python" in v.lower() or "wsgi" in v.lower() for v in r.headers.values())
    # a malformed request is answered by http.server itself, before the app
    with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as s:
        s.sendall(b"GET / HTTP/1.0\r\n" + b"X: y\r\n" * 200 + b"\r\n")  # too many headers
        reply = b""
        while chunk := s.recv(4096):
            reply += chunk
    status, _, rest = reply.decode("latin-1").partition("\r\n")
    assert " 431 " in status
    server_lines = [ln for ln in rest.split("\r\n") if ln.lower().startswith("server:")]
    assert server_lines == ["Server: virtio-recovery-agent"]


def _send_queue(port: int) -> int:
    """The listen backlog the kernel holds for this socket (`ss` Send-Q of a LISTEN socket)."""
    from conftest import require_tool

    ss = require_tool("ss", "Debian package iproute2")
    out = subprocess.run([ss, "-ltnH", f"sport = :{port}"], capture_output=True, text=True,
                         check=True).stdout.split()
    return int(out[2])


def test_listen_backlog_is_the_hosts_somaxconn():
    srv = MetricsServer(registry(), "127.0.0.1:0")
    try:
        with open("/proc/sys/net/core/somaxconn") as f:
            somaxconn = int(f.read())
        assert _send_queue(srv.port) == min(listen_backlog(), somaxconn) >= 128
    finally:
        srv.close()


def test_backlog_holds_connections_until_served():
    """40 clients connect while nothing accepts (the agent busy starting, say): each completes
    its TCP handshake into the backlog (socketserver's default of 5 would drop the SYNs of
    the 7th on) and is answered once the server runs."""
    n = 40
    srv = MetricsServer(registry(), "127.0.0.1:0")  # bound and listening, not accepting
    clients = []
    try:
        for _ in range(n):
            s = socket.create_connection(("127.0.0.1", srv.port), timeout=5)
            s.sendall(b"GET /healthz HTTP/1.0\r\n\r\n")
            clients.append(s)
        srv.start()
        for s in clients:
            s.settimeout(30)
            reply = b""
            while chunk := s.recv(4096):
                reply += chunk
            assert reply.startswith(b"HTTP/1.0 200"), reply[:80]
    finally:
        for s in clients:
            s.close()
        srv.close()


def test_connections_beyond_the_bound_are_closed(monkeypatch):
    monkeypatch.setattr(server_mod, "MAX_CONNECTIONS", 3)
    monkeypatch.setattr(server_mod._Handler, "timeout", 300)  # idle ones hold on, however slow
    srv = MetricsServer(registry(), "127.0.0.1:0").start()
    idle = [socket.create_connection(("127.0.0.1", srv.port), timeout=10) for _ in range(3)]
    try:
        # the accept loop takes the idle ones in turn; then one more is closed unanswered
        deadline = time.monotonic() + 30
        while True:
            with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as s:
                s.sendall(b"GET /healthz HTTP/1.0\r\n\r\n")
                try:
                    reply = s.recv(4096)
                except ConnectionResetError:
                    reply = b""
            if reply == b"":
                break
            assert time.monotonic() < deadline, "a 4th connection was still served"
            time.sleep(0.2)
    finally:
        for s in idle:
            s.close()
    try:
        deadline = time.monotonic() + 30
        while curl(srv.url + "/healthz").status != 200:  # slots come back as they close
            assert time.monotonic() < deadline
            time.sleep(0.2)
    finally:
        srv.close()


def test_all_interfaces_listen_accepts_ipv4():
    srv = MetricsServer(registry(), ":0").start()
    try:
        assert get(f"http://127.0.0.1:{srv.port}/healthz")[0] == 200
    finally:
        srv.close()


def test_port_in_use_is_an_oserror():
    srv = MetricsServer(registry(), "127.0.0.1:0")
    try:
        with pytest.raises(OSError):
            MetricsServer(registry(), f"127.0.0.1:{srv.port}")
    finally:
        srv.close()


def test_tls(tmp_path):
    pki = Pki(tmp_path)
    cert, key = pki.issue("server", server=True)
    srv = MetricsServer(registry(), "127.0.0.1:0", tls_cert=cert, tls_key=key).start()
    try:
        assert srv.url.startswith("https://")
        ctx = ssl.create_default_context(cafile=pki.ca_cert)
        code, _, body = get(srv.url + "/metrics", context=ctx)
        assert code == 200 and "vra_test_build_info" in body
        r = curl(srv.url + "/metrics", "--cacert", pki.ca_cert)
        assert r.status == 200 and b"vra_test_build_info" in r.body
        assert curl(srv.url + "/metrics").status == 0  # curl's default CAs do not know it
        with pytest.raises(urllib.error.URLError):  # nor do Python's
            get(srv.url + "/metrics", context=ssl.create_default_context())
        assert curl(srv.url.replace("https:", "http:") + "/metrics").status == 0  # no plain HTTP
    finally:
        srv.close()


def test_a_silent_tls_client_does_not_stall_scrapes(tmp_path):
    """The handshake runs in the connection's thread: a client that connects and never sends
    its ClientHello holds one thread (until the timeout), not the accept loop."""
    pki = Pki(tmp_path)
    cert, key = pki.issue("server", server=True)
    srv = MetricsServer(registry(), "127.0.0.1:0", tls_cert=cert, tls_key=key).start()
    silent = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
    try:
        for _ in range(3):
            assert curl(srv.url + "/healthz", "--cacert", pki.ca_cert).status == 200
    finally:
        silent.close()
        srv.close()


def test_tls_bad_files_and_half_config(tmp_path):
    with pytest.raises(ValueError, match="both"):
        MetricsServer(registry(), "127.0.0.1:0", tls_cert="x.crt")
    missing = tmp_path / "missing.pem"
    with pytest.raises(ValueError, match="cannot load TLS"):
        MetricsServer(registry(), "127.0.0.1:0", tls_cert=str(missing), tls_key=str(missing))
