"""Certificates for the HTTP server tests, made by the real `openssl` CLI, and a `curl` runner.

    pki = Pki(tmp_path)                      # a CA
    server = pki.issue("server", server=True) # (cert, key) for 127.0.0.1 / localhost
    client = pki.issue("prometheus")          # a client certificate from the same CA
    r = curl(url + "/metrics", "--cacert", pki.ca_cert)   # Curl(rc, status, headers, body)
"""
from __future__ import annotations

import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from conftest import require_tool

_EC = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]


def _openssl(*args: str) -> None:
    openssl = require_tool("openssl", "Debian package openssl: makes the test certificates")
    subprocess.run([openssl, *args], check=True, capture_output=True, timeout=60)


class Pki:
    def __init__(self, directory: Path, name: str = "ca") -> None:
        self.dir = directory
        self.ca_cert = str(directory / f"{name}.crt")
        self.ca_key = str(directory / f"{name}.key")
        _openssl("req", "-x509", *_EC, "-days", "2", "-subj", f"/CN=test {name}",
                 "-keyout", self.ca_key, "-out", self.ca_cert)

    def issue(self, name: str, server: bool = False) -> tuple[str, str]:
        cert, key, csr = (str(self.dir / f"{name}.{ext}") for ext in ("crt", "key", "csr"))
        ext = self.dir / f"{name}.ext"
        ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n"
                       if server else "extendedKeyUsage=clientAuth\n")
        _openssl("req", "-new", *_EC, "-subj", f"/CN={name}", "-keyout", key, "-out", csr)
        _openssl("x509", "-req", "-in", csr, "-CA", self.ca_cert, "-CAkey", self.ca_key,
                 "-CAcreateserial", "-days", "1", "-extfile", str(ext), "-out", cert)
        return cert, key


@dataclass
class Curl:
    rc: int
    status: int          # 0 when no HTTP answer came (refused handshake, closed connection)
    headers: dict[str, str]
    body: bytes
    stderr: str


def curl(url: str, *args: str) -> Curl:
    """The real curl binary; headers lower-cased (the last response's)."""
    exe = require_tool("curl", "Debian package curl: the HTTP client of these tests")
    with tempfile.NamedTemporaryFile(prefix="curl-body-") as out:
        proc = subprocess.run([exe, "-sS", "--max-time", "30", "-D", "-", "-o", out.name,
                               *args, url], capture_output=True, timeout=60)
        body = Path(out.name).read_bytes()
    status, headers = 0, {}
    for line in proc.stdout.decode("latin-1").split("\r\n"):
        if line.startswith("HTTP/"):
            status, headers = int(line.split()[1]), {}
        elif ":" in line:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
    return Curl(proc.returncode, status, headers, body, proc.stderr.decode("utf-8", "replace"))
