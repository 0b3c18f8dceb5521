"""The web-config file (exporter-toolkit format) on the real server, with the real curl and
certificates from the real openssl: TLS, client certificates (mTLS), basic auth, re-reading
changed certificates and users, clear errors for bad files, `run --web-config`, and a real
Prometheus scraping through mTLS and basic auth."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import bcrypt
import pytest
from prometheus_client import CollectorRegistry, Gauge

from agent.export.server import MetricsServer
from agent.export.webconfig import WebConfigError, load
from tests.promlab import PromLab
from tests.unit.tlsfiles import Pki, curl

ROOT = Path(__file__).resolve().parents[2]


def registry() -> CollectorRegistry:
    reg = CollectorRegistry()
    Gauge("vra_test_up", "Test gauge.", registry=reg).set(1)
    return reg


def bcrypt_hash(password: str, htpasswd_style: bool = True) -> str:
    h = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()
    # htpasswd -nB writes $2y$, Go's bcrypt $2a$, Python's $2b$: all the same algorithm
    return h.replace("$2b$", "$2y$", 1) if htpasswd_style else h


def write_config(path: Path, doc: dict) -> str:
    path.write_text(json.dumps(doc))  # JSON is YAML
    return str(path)


def serve(web_config: str, health=None) -> MetricsServer:
    return MetricsServer(registry(), "127.0.0.1:0", web_config=web_config,
                         health_fn=health).start()


def wait_until(predicate, what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"not within {timeout_s}s: {what}"
        time.sleep(0.2)


@pytest.fixture
def pki(tmp_path):
    return Pki(tmp_path)


def test_tls_from_web_config_relative_paths(tmp_path, pki):
    pki.issue("server", server=True)
    cfg = write_config(tmp_path / "web.yml", {"tls_server_config": {
        "cert_file": "server.crt", "key_file": "server.key"}})  # beside the config file
    srv = serve(cfg)
    try:
        assert srv.url.startswith("https://")
        r = curl(srv.url + "/metrics", "--cacert", pki.ca_cert)
        assert r.status == 200 and b"vra_test_up 1.0" in r.body
        # TLS 1.2 minimum by default, as exporter-toolkit
        old = curl(srv.url + "/metrics", "--cacert", pki.ca_cert, "--tls-max", "1.1")
        assert old.status == 0 and old.rc != 0
    finally:
        srv.close()


def test_mtls_requires_a_certificate_from_the_client_ca(tmp_path, pki):
    server_cert, server_key = pki.issue("server", server=True)
    client_cert, client_key = pki.issue("prometheus")
    other = Pki(tmp_path, name="other-ca")  # a CA the server does not trust
    stranger_cert, stranger_key = other.issue("stranger")
    cfg = write_config(tmp_path / "web.yml", {"tls_server_config": {
        "cert_file": server_cert, "key_file": server_key,
        "client_auth_type": "RequireAndVerifyClientCert", "client_ca_file": pki.ca_cert}})
    srv = serve(cfg)
    try:
        url = srv.url + "/metrics"
        no_cert = curl(url, "--cacert", pki.ca_cert)
        assert no_cert.status == 0 and no_cert.rc != 0, no_cert
        wrong = curl(url, "--cacert", pki.ca_cert, "--cert", stranger_cert, "--key", stranger_key)
        assert wrong.status == 0 and wrong.rc != 0, wrong
        right = curl(url, "--cacert", pki.ca_cert, "--cert", client_cert, "--key", client_key)
        assert right.status == 200 and b"vra_test_up" in right.body, right.stderr
        # the refused handshakes did not hurt the server
        assert curl(url, "--cacert", pki.ca_cert, "--cert", client_cert,
                    "--key", client_key).status == 200
    finally:
        srv.close()


def test_verify_client_cert_if_given(tmp_path, pki):
    server_cert, server_key = pki.issue("server", server=True)
    other = Pki(tmp_path, name="other-ca")
    stranger_cert, stranger_key = other.issue("stranger")
    cfg = write_config(tmp_path / "web.yml", {"tls_server_config": {
        "cert_file": server_cert, "key_file": server_key,
        "client_auth_type": "VerifyClientCertIfGiven", "client_ca_file": pki.ca_cert}})
    srv = serve(cfg)
    try:
        assert curl(srv.url + "/metrics", "--cacert", pki.ca_cert).status == 200
        bad = curl(srv.url + "/metrics", "--cacert", pki.ca_cert,
                   "--cert", stranger_cert, "--key", stranger_key)
        assert bad.status == 0 and bad.rc != 0
    finally:
        srv.close()


def test_basic_auth(tmp_path, pki):
    server_cert, server_key = pki.issue("server", server=True)
    cfg = write_config(tmp_path / "web.yml", {
        "tls_server_config": {"cert_file": server_cert, "key_file": server_key},
        "basic_auth_users": {"prometheus": bcrypt_hash("s3cret"),
                             "grafana": bcrypt_hash("other", htpasswd_style=False)}})
    srv = serve(cfg, health=lambda: (False, "starting: compiling"))
    tls = ["--cacert", pki.ca_cert]
    try:
        url = srv.url + "/metrics"
        none = curl(url, *tls)
        assert none.status == 401 and none.headers["www-authenticate"].startswith("Basic ")
        assert b"vra_test_up" not in none.body
        assert curl(url, *tls, "-u", "prometheus:wrong").status == 401
        assert curl(url, *tls, "-u", "nobody:s3cret").status == 401
        assert curl(url, *tls, "-u", "grafana:s3cret").status == 401  # another user's password
        assert curl(url, *tls, "-u", "prometheus:" + "x" * 100).status == 401  # > bcrypt's 72
        assert curl(url, *tls, "-H", "Authorization: Basic !!!").status == 401
        for _ in range(2):  # the second one from the cache of successes
            ok = curl(url, *tls, "-u", "prometheus:s3cret")
            assert ok.status == 200 and b"vra_test_up" in ok.body
        assert curl(url, *tls, "-u", "grafana:other").status == 200
        assert curl(srv.url + "/", *tls).status == 401
        # /healthz answers without credentials (kubelet probes have none)
        health = curl(srv.url + "/healthz", *tls)
        assert health.status == 503 and b"compiling" in health.body
    finally:
        srv.close()


def test_basic_auth_over_plain_http(tmp_path):
    cfg = write_config(tmp_path / "web.yml", {"basic_auth_users": {"u": bcrypt_hash("p")}})
    srv = serve(cfg)
    try:
        assert srv.url.startswith("http://")
        assert curl(srv.url + "/metrics").status == 401
        assert curl(srv.url + "/metrics", "-u", "u:p").status == 200
    finally:
        srv.close()


def _replace(path: str, source: str) -> None:
    """Atomic replacement, as `kubectl apply` of a Secret does through its ..data symlink."""
    tmp = path + ".new"
    with open(source, "rb") as f, open(tmp, "wb") as g:
        g.write(f.read())
    os.replace(tmp, path)


def test_changed_certificates_are_read_again(tmp_path, pki, caplog):
    cert, key = str(tmp_path / "tls.crt"), str(tmp_path / "tls.key")
    first = pki.issue("server-1", server=True)
    _replace(cert, first[0])
    _replace(key, first[1])
    srv = MetricsServer(registry(), "127.0.0.1:0", tls_cert=cert, tls_key=key).start()
    try:
        def serial() -> str:
            r = curl(srv.url + "/healthz", "--cacert", pki.ca_cert, "-v")
            assert r.status == 200, r.stderr
            return [ln for ln in r.stderr.splitlines() if "subject:" in ln][0]

        assert "server-1" in serial()
        second = pki.issue("server-2", server=True)
        _replace(key, second[1])
        _replace(cert, second[0])
        wait_until(lambda: "server-2" in serial(), "the new certificate served")
        reloads = srv.http_config.reloads
        assert reloads >= 1

        # a broken certificate is not taken: the last good one goes on serving
        Path(cert + ".bad").write_text("not a certificate\n")
        _replace(cert, cert + ".bad")
        wait_until(lambda: serial() and "reloading" in caplog.text, "the failed reload logged")
        assert "server-2" in serial()
        assert srv.http_config.reloads == reloads
    finally:
        srv.close()


def test_changed_web_config_users_are_read_again(tmp_path, caplog):
    path = tmp_path / "web.yml"
    write_config(path, {"basic_auth_users": {"u": bcrypt_hash("old")}})
    srv = serve(str(path))
    try:
        assert curl(srv.url + "/metrics", "-u", "u:old").status == 200
        write_config(tmp_path / "web.yml.new", {"basic_auth_users": {"u": bcrypt_hash("new")}})
        os.replace(tmp_path / "web.yml.new", path)
        wait_until(lambda: curl(srv.url + "/metrics", "-u", "u:new").status == 200,
                   "the new password accepted")
        assert curl(srv.url + "/metrics", "-u", "u:old").status == 401
        # a typo in the file: the previous users stay
        path.write_text("basic_auth_users: [oops\n")
        wait_until(lambda: curl(srv.url + "/healthz").status and "not valid YAML" in caplog.text,
                   "the failed reload logged")
        assert curl(srv.url + "/metrics", "-u", "u:new").status == 200
    finally:
        srv.close()


@pytest.mark.parametrize("text,key", [
    ("tls_server_config:\n  cert_file: a.crt\n", "tls_server_config.key_file"),
    ("tls_server_config:\n  cert_file: a\n  key_file: b\n  client_auth_type: Maybe\n",
     "tls_server_config.client_auth_type"),
    ("tls_server_config:\n  cert_file: a\n  key_file: b\n"
     "  client_auth_type: RequireAnyClientCert\n  client_ca_file: c\n",
     "tls_server_config.client_auth_type"),
    ("tls_server_config:\n  cert_file: a\n  key_file: b\n"
     "  client_auth_type: RequireAndVerifyClientCert\n", "tls_server_config.client_ca_file"),
    ("tls_server_config:\n  cert_file: a\n  key_file: b\n  client_ca_file: c\n",
     "tls_server_config.client_auth_type"),
    ("tls_server_config:\n  cert_file: a\n  key_file: b\n  min_version: TLS99\n",
     "tls_server_config.min_version"),
    ("tls_server_config:\n  cert_file: a\n  key_file: b\n  cipher_suites: [X]\n",
     "tls_server_config.cipher_suites"),
    ("tls_server_config:\n  certfile: a\n", "tls_server_config.certfile"),
    ("basic_auth_users:\n  prometheus: plaintext\n", "basic_auth_users.prometheus"),
    ("basic_auth_users: [a, b]\n", "basic_auth_users"),
    ("http_server_config:\n  http2: false\n", "http_server_config"),
    ("basic_auth_user:\n  a: b\n", "basic_auth_user"),
    ("tls_server_config: [\n", "not valid YAML"),
    ("- a\n", "mapping"),
])
def test_bad_web_config_names_the_file_and_the_key(tmp_path, text, key):
    path = tmp_path / "web.yml"
    path.write_text(text)
    with pytest.raises(WebConfigError) as exc:
        load(str(path))
    assert str(path) in str(exc.value) and key in str(exc.value), str(exc.value)


def test_web_config_files_that_do_not_load(tmp_path, pki):
    with pytest.raises(WebConfigError, match="cannot read"):
        load(str(tmp_path / "missing.yml"))
    cfg = write_config(tmp_path / "web.yml", {"tls_server_config": {
        "cert_file": "nope.crt", "key_file": "nope.key"}})
    with pytest.raises(ValueError, match="nope.crt"):
        serve(cfg)
    server_cert, server_key = pki.issue("server", server=True)
    with pytest.raises(ValueError, match="not both"):
        MetricsServer(registry(), "127.0.0.1:0", tls_cert=server_cert, tls_key=server_key,
                      web_config=cfg)
    assert load(write_config(tmp_path / "empty.yml", {})).tls is None  # empty = plain HTTP


def test_run_refuses_a_bad_web_config_naming_flag_file_and_key(tmp_path):
    path = tmp_path / "web.yml"
    path.write_text("basic_auth_users:\n  prometheus: hunter2\n")
    for how, env in ((["--web-config", str(path)], {}), ([], {"VRA_WEB_CONFIG": str(path)})):
        proc = subprocess.run([sys.executable, "-m", "agent", "run", *how],
                              capture_output=True, text=True, timeout=60, cwd=ROOT,
                              env={**os.environ, **env})
        assert proc.returncode == 2, proc.stderr
        assert str(path) in proc.stderr and "basic_auth_users.prometheus" in proc.stderr
        assert ("--web-config" if how else "VRA_WEB_CONFIG") in proc.stderr


class _AuthPromLab(PromLab):
    """PromLab with a scrape config that presents a client certificate and basic auth."""

    def __init__(self, targets, tls_config: dict, basic_auth: dict) -> None:
        super().__init__(targets, scheme="https")
        self.tls_config, self.basic_auth = tls_config, basic_auth

    def config_yaml(self) -> str:
        cfg = json.loads(super().config_yaml())
        job = cfg["scrape_configs"][0]
        job["tls_config"], job["basic_auth"] = self.tls_config, self.basic_auth
        return json.dumps(cfg)


def test_prometheus_scrapes_through_mtls_and_basic_auth(tmp_path, pki):
    problem = PromLab.problem()
    if problem:
        from conftest import missing

        missing(problem)
    server_cert, server_key = pki.issue("server", server=True)
    client_cert, client_key = pki.issue("prometheus")
    cfg = write_config(tmp_path / "web.yml", {
        "tls_server_config": {"cert_file": server_cert, "key_file": server_key,
                              "client_auth_type": "RequireAndVerifyClientCert",
                              "client_ca_file": pki.ca_cert},
        "basic_auth_users": {"prometheus": bcrypt_hash("s3cret")}})
    srv = serve(cfg)
    try:
        tls = {"ca_file": pki.ca_cert, "cert_file": client_cert, "key_file": client_key}
        with _AuthPromLab([f"127.0.0.1:{srv.port}"], tls,
                          {"username": "prometheus", "password": "s3cret"}) as prom:
            prom.wait_for_target_up(timeout_s=60)
            assert prom.query_value('vra_test_up{job="agent"}') == 1.0
        with _AuthPromLab([f"127.0.0.1:{srv.port}"], tls,
                          {"username": "prometheus", "password": "wrong"}) as prom:
            wait_until(lambda: any("401" in (t.get("lastError") or "")
                                   for t in prom.targets_health()),
                       "Prometheus reports the 401", timeout_s=60)
    finally:
        srv.close()
