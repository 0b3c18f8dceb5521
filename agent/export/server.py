"""HTTP endpoint: `/metrics`, `/healthz`; TLS, client certificates and basic auth.

`/metrics` is prometheus_client's WSGI app (text or OpenMetrics by `Accept`, gzip by
`Accept-Encoding`, `name[]` filters), served by its threading WSGI server. What is added here is
what the library's `start_http_server` lacks: `/healthz`, `HEAD`, basic auth, a listen backlog
of the host's somaxconn, TLS handshakes in the connection's thread with a timeout (the library
does them in the accept loop, where one silent client stops every scrape), certificates re-read
when their files change, a bound on concurrent connections and no Python version in `Server`.
"""
from __future__ import annotations

import logging
import os
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Optional
from wsgiref.simple_server import WSGIRequestHandler

from prometheus_client import make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.registry import CollectorRegistry

from agent.export import webconfig
from agent.export.webconfig import BasicAuth, TlsConfig, WebConfig

HealthFn = Callable[[], "tuple[bool, str]"]

SERVER_NAME = "virtio-recovery-agent"
CONNECTION_TIMEOUT_S = 15    # a stalled client (or TLS handshake) cannot pin a thread for longer
MAX_CONNECTIONS = 64         # handled at once; more are closed at accept (bounded threads)
RELOAD_CHECK_S = 1.0         # web-config and certificate files are stat()ed at most this often

log = logging.getLogger("agent.export.server")


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


def listen_backlog() -> int:
    """What Go's net.Listen (and so every Go exporter) uses: the kernel's somaxconn."""
    try:
        with open("/proc/sys/net/core/somaxconn") as f:
            return max(128, int(f.read()))
    except (OSError, ValueError):
        return socket.SOMAXCONN


# --- configuration that follows its files ---------------------------------------------------------

@dataclass(frozen=True)
class _Active:
    config: WebConfig
    ssl_context: Optional[ssl.SSLContext]
    auth: Optional[BasicAuth]


class HttpConfig:
    """The web-config (or --tls-cert/--tls-key) in force, re-read when a file it names changes.

    A change is applied to new connections only. A changed file that does not load (a
    certificate copied before its key, a YAML typo) is logged and the previous configuration
    kept; so is a change that would turn TLS on or off, which needs a restart.
    """

    def __init__(self, web_config: Optional[str] = None, tls_cert: Optional[str] = None,
                 tls_key: Optional[str] = None) -> None:
        if bool(tls_cert) != bool(tls_key):
            raise ValueError("TLS needs both a certificate and a key file")
        if web_config and tls_cert:
            raise ValueError("give TLS either as --tls-cert/--tls-key or in the web-config "
                             "file (tls_server_config), not both")
        self._path = web_config or None
        self._flags_tls = TlsConfig(tls_cert, tls_key) if tls_cert else None
        self._lock = threading.Lock()
        self._active = self._build()  # at start-up a bad file is an error, not a log line
        self._signature = self._stat(self._active.config)
        if self._active.auth is not None and self._active.ssl_context is None:
            log.warning("web-config %s: basic auth without TLS: passwords cross the network "
                        "in clear", self._path)
        self._failed_signature: Optional[tuple] = None
        self._checked = time.monotonic()
        self.reloads = 0

    @property
    def tls(self) -> bool:
        return self._active.ssl_context is not None

    def _load(self) -> WebConfig:
        if self._path:
            return webconfig.load(self._path)
        return WebConfig(tls=self._flags_tls)

    def _build(self) -> _Active:
        config = self._load()
        ctx = config.tls.context() if config.tls else None
        auth = BasicAuth(config.basic_auth_users) if config.basic_auth_users else None
        return _Active(config, ctx, auth)

    def _stat(self, config: WebConfig) -> tuple:
        paths: list[str] = [self._path] if self._path else []
        if config.tls is not None:
            paths.extend(config.tls.files())
        sig = []
        for p in paths:
            try:
                st = os.stat(p)  # follows symlinks: a Kubernetes secret swaps its ..data link
                sig.append((p, st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size))
            except OSError:
                sig.append((p, None))
        return tuple(sig)

    def current(self) -> _Active:
        with self._lock:
            now = time.monotonic()
            if now - self._checked >= RELOAD_CHECK_S:
                self._checked = now
                self._maybe_reload()
            return self._active

    def _maybe_reload(self) -> None:
        sig = self._stat(self._active.config)
        if sig == self._signature or sig == self._failed_signature:
            return
        what = self._path or "the TLS certificate/key"
        try:
            new = self._build()
            if (new.ssl_context is None) != (self._active.ssl_context is None):
                raise ValueError("turning TLS on or off needs a restart")
        except Exception as exc:  # anything: the server must keep serving the old config
            self._failed_signature = sig
            log.error("reloading %s failed, keeping the previous configuration: %s", what, exc)
            return
        new_sig = self._stat(new.config)
        # Same files: keep the signature taken before loading, so that a file rewritten while
        # it was being read is seen as changed at the next check and read again.
        same_files = [entry[0] for entry in new_sig] == [entry[0] for entry in sig]
        self._active = new
        self._signature = sig if same_files else new_sig
        self._failed_signature = None
        self.reloads += 1
        log.info("reloaded %s", what)


# --- HTTP ----------------------------------------------------------------------------------------

class _Handler(WSGIRequestHandler):
    timeout = CONNECTION_TIMEOUT_S

    def version_string(self) -> str:  # error replies of http.server (400, 414)
        return SERVER_NAME

    def log_message(self, format: str, *args) -> None:  # noqa: A002
        pass  # scrapes every few seconds would flood the log


class _Server(ThreadingWSGIServer):
    allow_reuse_address = True

    def __init__(self, address, http_config: HttpConfig) -> None:
        self.request_queue_size = listen_backlog()  # socketserver's default is 5
        self.http_config = http_config
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        super().__init__(address, _Handler)

    def get_request(self):
        conn, addr = self.socket.accept()
        ctx = self.http_config.current().ssl_context
        if ctx is not None:
            # The handshake happens on the first read, in the connection's own thread, under
            # the handler's timeout: a client that never speaks cannot stall the accept loop.
            conn = ctx.wrap_socket(conn, server_side=True, do_handshake_on_connect=False)
        return conn, addr

    def process_request(self, request, client_address) -> None:
        if not self._slots.acquire(blocking=False):
            log.debug("%d connections open, closing the one from %s", MAX_CONNECTIONS,
                      client_address)
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request, client_address) -> None:
        # a refused client certificate, a reset connection, a timeout: the client's problem
        log.debug("connection from %s failed", client_address, exc_info=True)


class _V6Server(_Server):
    address_family = socket.AF_INET6

    def server_bind(self) -> None:
        # dual stack: also accept IPv4 on "::"
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()


def make_app(registry: CollectorRegistry, health_fn: HealthFn,
             http_config: Optional[HttpConfig] = None) -> Callable:
    """The WSGI app: prometheus_client's on /metrics, plus /healthz, /, HEAD and basic auth.

    /healthz answers without credentials: kubelet probes cannot send them, and it tells only
    whether capture is running.
    """
    metrics_app = make_wsgi_app(registry)

    def metrics(environ) -> tuple[str, list, bytes]:
        got: dict = {}

        def start_response(status, headers, exc_info=None):
            got.update(status=status, headers=headers)

        try:
            body = b"".join(metrics_app({**environ, "REQUEST_METHOD": "GET"}, start_response))
        except Exception as exc:
            return ("500 Internal Server Error", [("Content-Type", "text/plain")],
                    f"collect failed: {exc}\n".encode())
        return got["status"], list(got["headers"]), body

    def app(environ, start_response) -> Iterable[bytes]:
        method, path = environ["REQUEST_METHOD"], environ.get("PATH_INFO", "")
        auth = http_config.current().auth if http_config is not None else None
        if method not in ("GET", "HEAD"):
            status, headers, body = ("405 Method Not Allowed", [("Allow", "GET, HEAD")],
                                     b"use GET or HEAD\n")
        elif (path != "/healthz" and auth is not None
              and not auth.check(environ.get("HTTP_AUTHORIZATION"))):
            status, headers, body = ("401 Unauthorized",
                                     [("WWW-Authenticate", f'Basic realm="{SERVER_NAME}"')],
                                     b"unauthorized\n")
        elif path == "/metrics":
            status, headers, body = metrics(environ)
        elif path == "/healthz":
            try:
                ok, message = health_fn()
            except Exception as exc:
                ok, message = False, f"health check failed: {exc}"
            status = "200 OK" if ok else "503 Service Unavailable"
            headers, body = [], (message.rstrip("\n") + "\n").encode()
        elif path == "/":
            status, headers, body = ("200 OK", [("Content-Type", "text/html; charset=utf-8")],
                                     b'<html><body><a href="/metrics">/metrics</a> '
                                     b'<a href="/healthz">/healthz</a></body></html>\n')
        else:
            status, headers, body = "404 Not Found", [], b"not found\n"
        if not any(k.lower() == "content-type" for k, _ in headers):
            headers.append(("Content-Type", "text/plain; charset=utf-8"))
        # HEAD: the GET's headers, Content-Length included, and no body
        headers += [("Content-Length", str(len(body))), ("Server", SERVER_NAME)]
        start_response(status, headers)
        return [] if method == "HEAD" else [body]

    return app


class MetricsServer:
    """Serves the registry in a background thread. `port` is the bound port (useful with :0).

    TLS comes from tls_cert/tls_key or from a web-config file (webconfig.py), which can also
    ask for client certificates and basic auth. ValueError for a bad configuration, OSError
    when the address cannot be bound.
    """

    def __init__(self, registry: CollectorRegistry, listen: str = ":9477",
                 health_fn: Optional[HealthFn] = None,
                 tls_cert: Optional[str] = None, tls_key: Optional[str] = None,
                 web_config: Optional[str] = None) -> None:
        host, port = parse_listen(listen)
        self.http_config = HttpConfig(web_config, tls_cert, tls_key)
        if host == "":
            try:
                self._httpd: _Server = _V6Server(("::", port), self.http_config)
            except OSError:  # no IPv6 on this host
                self._httpd = _Server(("0.0.0.0", port), self.http_config)
        elif ":" in host:
            self._httpd = _V6Server((host, port), self.http_config)
        else:
            self._httpd = _Server((host, port), self.http_config)
        self._httpd.set_app(make_app(registry, health_fn or (lambda: (True, "ok")),
                                     self.http_config))
        self.tls = self.http_config.tls
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
