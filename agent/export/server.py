"""HTTP endpoint: `/metrics` (Prometheus text or OpenMetrics), `/healthz`; optional TLS."""
from __future__ import annotations

import socket
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Optional

from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import CollectorRegistry

HealthFn = Callable[[], "tuple[bool, str]"]


class ListenAddressError(ValueError):
    pass


def parse_listen(value: str) -> tuple[str, int]:
    """`:9477`, `127.0.0.1:9477`, `[::1]:9477`, `localhost:0` -> (host, port). Empty host = all."""
    value = value.strip()
    if value.startswith("["):
        host, sep, rest = value[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ListenAddressError(f"bad listen address {value!r}: expected [IPV6]:PORT")
        port_s = rest[1:]
    else:
        host, sep, port_s = value.rpartition(":")
        if not sep:
            raise ListenAddressError(f"bad listen address {value!r}: expected HOST:PORT or :PORT")
        if ":" in host:
            raise ListenAddressError(f"bad listen address {value!r}: write IPv6 as [ADDR]:PORT")
    if not port_s.isdigit() or not 0 <= int(port_s) <= 65535:
        raise ListenAddressError(f"bad listen address {value!r}: port must be 0..65535")
    return host, int(port_s)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


class _V6Server(_Server):
    address_family = socket.AF_INET6

    def server_bind(self) -> None:
        # dual stack: also accept IPv4 on "::"
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()


class MetricsServer:
    """Serves the registry in a background thread. `port` is the bound port (useful with :0)."""

    def __init__(self, registry: CollectorRegistry, listen: str = ":9477",
                 health_fn: Optional[HealthFn] = None,
                 tls_cert: Optional[str] = None, tls_key: Optional[str] = None) -> None:
        host, port = parse_listen(listen)
        if bool(tls_cert) != bool(tls_key):
            raise ValueError("TLS needs both a certificate and a key file")
        handler = _make_handler(registry, health_fn or (lambda: (True, "ok")))
        if host == "":
            try:
                self._httpd: _Server = _V6Server(("::", port), handler)
            except OSError:  # no IPv6 on this host
                self._httpd = _Server(("0.0.0.0", port), handler)
        elif ":" in host:
            self._httpd = _V6Server((host, port), handler)
        else:
            self._httpd = _Server((host, port), handler)
        self.tls = bool(tls_cert)
        if tls_cert:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            try:
                ctx.load_cert_chain(tls_cert, tls_key)
            except (OSError, ssl.SSLError) as exc:
                self._httpd.server_close()
                raise ValueError(f"cannot load TLS certificate/key ({tls_cert}, {tls_key}): "
                                 f"{exc}") from None
            # The handshake runs in the per-request thread, not in the accept loop.
            self._httpd.socket = ctx.wrap_socket(self._httpd.socket, server_side=True,
                                                 do_handshake_on_connect=False)
        self.host = host
        self.port = self._httpd.server_address[1]
        self._thread: Optional[threading.Thread] = None

    @property
    def url(self) -> str:
        host = self.host or "127.0.0.1"
        if ":" in host:
            host = f"[{host}]"
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}"

    def start(self) -> "MetricsServer":
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="metrics-http",
                                        daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join(timeout=5)
            self._thread = None
        self._httpd.server_close()


def _make_handler(registry: CollectorRegistry, health_fn: HealthFn) -> type:
    class Handler(BaseHTTPRequestHandler):
        server_version = "virtio-recovery-agent"
        timeout = 15  # a stalled client (or TLS handshake) cannot pin a thread forever

        def do_GET(self) -> None:  # noqa: N802
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                encoder, content_type = choose_encoder(self.headers.get("Accept", ""))
                try:
                    body = encoder(registry)
                except Exception as exc:
                    self._reply(500, "text/plain", f"collect failed: {exc}\n".encode())
                    return
                self._reply(200, content_type, body)
            elif path == "/healthz":
                try:
                    ok, message = health_fn()
                except Exception as exc:
                    ok, message = False, f"health check failed: {exc}"
                self._reply(200 if ok else 503, "text/plain; charset=utf-8",
                            (message.rstrip("\n") + "\n").encode())
            elif path == "/":
                self._reply(200, "text/html; charset=utf-8",
                            b'<html><body><a href="/metrics">/metrics</a> '
                            b'<a href="/healthz">/healthz</a></body></html>\n')
            else:
                self._reply(404, "text/plain", b"not found\n")

        def _reply(self, code: int, content_type: str, body: bytes) -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args) -> None:  # noqa: A002
            pass  # scrapes every few seconds would flood the log

    return Handler
