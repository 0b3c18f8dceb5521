"""The HTTP endpoint over real sockets: /metrics, /healthz, TLS, listen-address parsing."""
from __future__ import annotations

import shutil
import ssl
import subprocess
import urllib.error
import urllib.request

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from agent.export.metrics import AgentCollector, BuildInfo, EpisodeHistograms
from agent.export.server import ListenAddressError, MetricsServer, parse_listen


def registry() -> CollectorRegistry:
    reg = CollectorRegistry()
    reg.register(AgentCollector(lambda: None, EpisodeHistograms(),
                                build_info=BuildInfo("0.1.0", "3.11", "none")))
    return reg


def get(url: str, context=None, headers=None) -> tuple[int, str, str]:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10, context=context) as resp:
            return resp.status, resp.headers["Content-Type"], resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read().decode()


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
        assert "virtio_agent_build_info" in names
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


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl CLI not installed")
def test_tls(tmp_path):
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    srv = MetricsServer(registry(), "127.0.0.1:0", tls_cert=str(cert), tls_key=str(key)).start()
    try:
        assert srv.url.startswith("https://")
        ctx = ssl.create_default_context(cafile=str(cert))
        code, _, body = get(srv.url + "/metrics", context=ctx)
        assert code == 200 and "virtio_agent_build_info" in body
        with pytest.raises(urllib.error.URLError):  # plain HTTP client, unknown CA
            get(srv.url + "/metrics", context=ssl.create_default_context())
    finally:
        srv.close()


def test_tls_bad_files_and_half_config(tmp_path):
    with pytest.raises(ValueError, match="both"):
        MetricsServer(registry(), "127.0.0.1:0", tls_cert="x.crt")
    missing = tmp_path / "missing.pem"
    with pytest.raises(ValueError, match="cannot load TLS"):
        MetricsServer(registry(), "127.0.0.1:0", tls_cert=str(missing), tls_key=str(missing))
