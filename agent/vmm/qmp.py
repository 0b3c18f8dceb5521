"""A small synchronous QMP (QEMU Machine Protocol) client over a unix socket. No third-party deps.

Use it connect-per-query: `with QmpClient.connect(path) as c: c.execute(...)`. Each command
has its own timeout, and the whole session (connect included) an overall time limit
(`budget_s`, default DEFAULT_SESSION_S): a slow or hostile QEMU cannot hold the caller longer
than that, however many commands the caller sends (QmpDeadline). A QMP socket serves one client
at a time; while we hold it, nobody else (an operator, libvirt) can use it, and while somebody
else holds it our connect succeeds but the greeting never comes, which surfaces here as
QmpTimeout. Never keep a connection open between queries (docs/qmp.md).

Also here: finding a QMP socket in a QEMU command line (`qmp_sockets_from_cmdline`) and making
that path reachable from the agent's mount namespace (`reachable_path`).
"""
from __future__ import annotations

import collections
import json
import os
import reprlib
import socket
import time
from dataclasses import dataclass
from typing import Any, Iterator, Optional

DEFAULT_TIMEOUT = 2.0        # per command (the greeting counts as one)
DEFAULT_SESSION_S = 5.0      # per session: connect, greeting and every command together
MAX_LINE = 8 << 20          # one QMP message; query-pci of a big VM is ~100 KiB
MAX_EVENTS = 64             # asynchronous events kept while waiting for replies (oldest dropped)
UNIX_PATH_MAX = 107         # sun_path is 108 bytes including the NUL


class QmpError(Exception):
    """Base of every error this module raises."""


class QmpConnectError(QmpError):
    """The socket could not be connected (missing, refused, permission)."""


class QmpTimeout(QmpError):
    """No complete reply in time (also: the monitor is held by another client)."""


class QmpDeadline(QmpTimeout):
    """The session's overall time limit (`budget_s` at connect) ran out."""


class QmpProtocolError(QmpError):
    """The peer did not speak QMP: bad greeting, not JSON, oversized message, closed early."""


class QmpCommandError(QmpError):
    """QEMU answered a command with {"error": {"class": ..., "desc": ...}}."""

    def __init__(self, command: str, error_class: str, desc: str):
        super().__init__(f"{command}: {error_class}: {desc}")
        self.command = command
        self.error_class = error_class
        self.desc = desc


_repr = reprlib.Repr()
_repr.maxlevel = 4
_repr.maxstring = _repr.maxother = 200
_repr.maxdict = _repr.maxlist = 8


def short_repr(value: Any) -> str:
    """A bounded repr for error messages: garbage from the peer may be huge or nested deeply
    enough that repr()/str() themselves raise RecursionError."""
    try:
        return _repr.repr(value)[:300]
    except Exception:       # a repr of a peer-controlled value must never raise
        return f"<{type(value).__name__}>"


@dataclass(frozen=True, slots=True)
class QmpVersion:
    major: int
    minor: int
    micro: int
    package: str

    def at_least(self, major: int, minor: int) -> bool:
        return (self.major, self.minor) >= (major, minor)


def parse_greeting(msg: Any) -> QmpVersion:
    """The server's first message: {"QMP": {"version": {"qemu": {...}, "package": ...}, ...}}."""
    try:
        v = msg["QMP"]["version"]
        q = v["qemu"]
        package = v.get("package", "")
        if not isinstance(package, str):
            raise TypeError("package is not a string")
        return QmpVersion(_version_int(q["major"]), _version_int(q["minor"]),
                          _version_int(q["micro"]), package)
    except (KeyError, TypeError, ValueError, AttributeError, OverflowError,
            RecursionError) as exc:
        raise QmpProtocolError(f"not a QMP greeting: {short_repr(msg)}") from exc


def _version_int(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"version number is not an integer: {short_repr(v)}")
    return v


class QmpClient:
    """One QMP session. Build with `QmpClient.connect`; close it (or use `with`) promptly.

    `deadline` (time.monotonic()) bounds the whole session: every command's own timeout is cut
    to it, and once it has passed every execute raises QmpDeadline (None: no overall limit)."""

    def __init__(self, sock: socket.socket, timeout: float = DEFAULT_TIMEOUT,
                 max_events: int = MAX_EVENTS, deadline: Optional[float] = None):
        self._sock = sock
        self._buf = bytearray()
        self._next_id = 0
        self.timeout = timeout
        self.deadline = deadline
        self.events: collections.deque[dict[str, Any]] = collections.deque(maxlen=max_events)
        self.events_dropped = 0
        self.version: Optional[QmpVersion] = None

    @classmethod
    def connect(cls, path: str, timeout: float = DEFAULT_TIMEOUT,
                max_events: int = MAX_EVENTS,
                budget_s: Optional[float] = DEFAULT_SESSION_S) -> "QmpClient":
        """Connect, read the greeting and leave capabilities negotiation mode.

        `timeout` applies to each command (and the greeting); `budget_s` to the whole session
        from now on, connect included (None: no overall limit)."""
        if budget_s is not None and not budget_s > 0:
            raise ValueError(f"budget_s must be > 0 or None, not {budget_s!r}")
        deadline = None if budget_s is None else time.monotonic() + budget_s
        sock = _connect_unix(path, timeout if budget_s is None else min(timeout, budget_s))
        client = cls(sock, timeout, max_events, deadline)
        try:
            limit, by_session = client._command_deadline(None, "greeting")
            try:
                greeting = client._read_message(limit, "greeting")
            except QmpTimeout:
                client._raise_if_session_limit(by_session, "greeting")
                raise
            client.version = parse_greeting(greeting)
            client.execute("qmp_capabilities")
        except BaseException:
            client.close()
            raise
        return client

    def time_left(self) -> Optional[float]:
        """Seconds until the session deadline (None: no overall limit)."""
        return None if self.deadline is None else self.deadline - time.monotonic()

    def execute(self, command: str, arguments: Optional[dict[str, Any]] = None,
                timeout: Optional[float] = None) -> Any:
        """Run one command and return its "return" value; QmpCommandError on an error reply.
        QmpTimeout after `timeout` (default: the client's), QmpDeadline when the session's
        overall limit comes first (or has passed already: nothing is sent then)."""
        limit, by_session = self._command_deadline(timeout, command)
        try:
            return self._exchange(command, arguments, limit)
        except QmpTimeout:
            self._raise_if_session_limit(by_session, command)
            raise

    def _exchange(self, command: str, arguments: Optional[dict[str, Any]], limit: float) -> Any:
        self._next_id += 1
        req_id = f"vra-{self._next_id}"
        req: dict[str, Any] = {"execute": command, "id": req_id}
        if arguments:
            req["arguments"] = arguments
        self._send(json.dumps(req).encode() + b"\n", limit)
        while True:
            msg = self._read_message(limit, command)
            if "event" in msg:
                self._keep_event(msg)
                continue
            if msg.get("id") != req_id:
                # A reply to something we did not send (we send one command at a time).
                raise QmpProtocolError(
                    f"{command}: reply with unexpected id {short_repr(msg.get('id'))}")
            if "return" in msg:
                return msg["return"]
            if "error" in msg:
                err = msg["error"] if isinstance(msg["error"], dict) else {}
                raise QmpCommandError(command, _text(err.get("class", "?")),
                                      _text(err.get("desc", "")))
            raise QmpProtocolError(
                f"{command}: reply has neither return nor error: {short_repr(msg)}")

    def _command_deadline(self, timeout: Optional[float], what: str) -> tuple[float, bool]:
        """(deadline of this command, whether it is the session deadline that bounds it)."""
        now = time.monotonic()
        limit = now + (self.timeout if timeout is None else timeout)
        if self.deadline is None or limit < self.deadline:
            return limit, False
        if self.deadline <= now:
            raise QmpDeadline(f"{what}: the session's time limit has passed")
        return self.deadline, True

    @staticmethod
    def _raise_if_session_limit(by_session: bool, what: str) -> None:
        if by_session:
            raise QmpDeadline(f"{what}: the session's time limit ran out") from None

    def close(self) -> None:
        try:
            self._sock.close()
        except OSError:
            pass

    def __enter__(self) -> "QmpClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _keep_event(self, msg: dict[str, Any]) -> None:
        if len(self.events) == self.events.maxlen:
            self.events_dropped += 1
        self.events.append(msg)

    def _send(self, data: bytes, deadline: float) -> None:
        self._sock.settimeout(_remaining(deadline))
        try:
            self._sock.sendall(data)
        except socket.timeout:
            raise QmpTimeout("timed out sending a command") from None
        except OSError as exc:
            raise QmpProtocolError(f"send failed: {exc}") from None

    def _read_message(self, deadline: float, what: str) -> dict[str, Any]:
        while True:
            nl = self._buf.find(b"\n")
            if nl > MAX_LINE or (nl < 0 and len(self._buf) > MAX_LINE):
                raise QmpProtocolError(f"{what}: message longer than {MAX_LINE} bytes")
            if nl >= 0:
                line = bytes(self._buf[:nl])
                del self._buf[:nl + 1]
                if not line.strip():
                    continue
                try:
                    msg = json.loads(line)
                except (ValueError, RecursionError):
                    # RecursionError: nested deeper than the decoder's recursion limit
                    raise QmpProtocolError(f"{what}: not JSON (or nested too deeply): "
                                           f"{line[:200]!r}") from None
                if not isinstance(msg, dict):
                    raise QmpProtocolError(f"{what}: not a JSON object: {line[:200]!r}")
                return msg
            self._sock.settimeout(_remaining(deadline))
            try:
                chunk = self._sock.recv(65536)
            except socket.timeout:
                raise QmpTimeout(f"{what}: no reply within the timeout") from None
            except OSError as exc:
                raise QmpProtocolError(f"{what}: receive failed: {exc}") from None
            if not chunk:
                raise QmpProtocolError(f"{what}: connection closed by QEMU")
            self._buf += chunk


def _remaining(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise QmpTimeout("deadline passed")
    return left


def _text(v: Any) -> str:
    return v if isinstance(v, str) else short_repr(v)


def _connect_unix(path: str, timeout: float) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    fd = -1
    try:
        target = path
        if not path.startswith("\0") and len(os.fsencode(path)) > UNIX_PATH_MAX:
            # /proc/PID/root/... easily exceeds sun_path; an O_PATH fd names the same inode.
            fd = os.open(path, os.O_PATH)
            target = f"/proc/self/fd/{fd}"
        sock.connect(target)
    except socket.timeout:
        sock.close()
        raise QmpTimeout(f"connect to {path}: timed out") from None
    except OSError as exc:
        sock.close()
        raise QmpConnectError(f"connect to {path}: {exc.strerror or exc}") from None
    finally:
        if fd >= 0:
            os.close(fd)
    return sock


def query(path: str, command: str, arguments: Optional[dict[str, Any]] = None,
          timeout: float = DEFAULT_TIMEOUT,
          budget_s: Optional[float] = DEFAULT_SESSION_S) -> Any:
    """Connect, run one command, disconnect."""
    with QmpClient.connect(path, timeout, budget_s=budget_s) as client:
        return client.execute(command, arguments)


# --- finding the socket ------------------------------------------------------------------------

LIBVIRT_MONITOR_ID = "charmonitor"   # libvirt's own monitor chardev: never ours to use


@dataclass(frozen=True, slots=True)
class QmpSocket:
    path: str            # as written on the command line (relative to QEMU's cwd if not absolute)
    source: str          # "-qmp", "-qmp-pretty" or "-chardev" (with a control-mode -mon)
    chardev_id: str = ""
    abstract: bool = False


def _parse_opts(spec: str, implied: str) -> dict[str, str]:
    """QEMU option syntax "a,key=val,flag,key2=x,,y": ",," is a literal comma, a bare word
    is "on", and a first part without "=" is the value of the `implied` key."""
    parts: list[str] = []
    cur: list[str] = []
    i = 0
    while i < len(spec):
        if spec[i] == ",":
            if spec[i + 1:i + 2] == ",":
                cur.append(",")
                i += 2
                continue
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(spec[i])
        i += 1
    parts.append("".join(cur))
    opts: dict[str, str] = {}
    for n, p in enumerate(parts):
        k, eq, v = p.partition("=")
        if n == 0 and not eq:
            opts[implied] = p
        elif eq:
            opts[k] = v
        elif k:
            opts[k] = "on"
    return opts


def _is_on(value: Optional[str]) -> bool:
    return value is not None and value.lower() in ("on", "yes", "true", "y")


_WANTED = ("-qmp", "-qmp-pretty", "-chardev", "-mon")


def _options(argv: list[str]) -> Iterator[tuple[str, str]]:
    """(option, value) for the options we parse. Other options are not paired up: many QEMU
    options (-S, -nodefaults, ...) take no value, and we do not keep QEMU's option table."""
    for i in range(1, len(argv) - 1):
        opt = argv[i][1:] if argv[i].startswith("--") else argv[i]
        if opt in _WANTED:
            yield opt, argv[i + 1]


def qmp_sockets_from_cmdline(argv: list[str]) -> list[QmpSocket]:
    """Unix-socket QMP servers QEMU listens on, from its argv (/proc/PID/cmdline split on NUL).

    Recognised: `-qmp unix:PATH,server=on[,wait=off]` (also -qmp-pretty, the old bare `server`
    flag) and `-chardev socket,id=X,path=PATH,server=on` with `-mon chardev=X,mode=control`.
    Client-mode sockets (QEMU connects out), fd-passed sockets and libvirt's own monitor
    (chardev id "charmonitor") are left out: there is nothing we may connect to there.
    """
    found: list[QmpSocket] = []
    chardevs: dict[str, tuple[str, bool]] = {}
    control_ids: list[str] = []
    for opt, val in _options(argv):
        if opt in ("-qmp", "-qmp-pretty"):
            opts = _parse_opts(val, "_backend")
            backend = opts.get("_backend", "")
            if backend.startswith("unix:") and _is_on(opts.get("server")):
                found.append(QmpSocket(backend[len("unix:"):], opt,
                                       abstract=_is_on(opts.get("abstract"))))
        elif opt == "-chardev":
            opts = _parse_opts(val, "backend")
            if (opts.get("backend") == "socket" and "path" in opts and "id" in opts
                    and _is_on(opts.get("server"))):
                chardevs[opts["id"]] = (opts["path"], _is_on(opts.get("abstract")))
        elif opt == "-mon":
            opts = _parse_opts(val, "chardev")
            if opts.get("mode") == "control" and opts.get("chardev"):
                control_ids.append(opts["chardev"])
    for cid in control_ids:
        if cid in chardevs and cid != LIBVIRT_MONITOR_ID:
            path, abstract = chardevs[cid]
            found.append(QmpSocket(path, "-chardev", cid, abstract))
    return found


def reachable_path(sock: QmpSocket, pid: int, proc_root: str = "/proc") -> str:
    """The socket path as seen from here: through /proc/PID/root (or /proc/PID/cwd if relative),
    so that an agent in its own mount namespace reaches QEMU's socket. Abstract sockets live in
    QEMU's network namespace and are returned as "\\0name" (reachable only from that netns)."""
    if sock.abstract:
        return "\0" + sock.path
    if os.path.isabs(sock.path):
        return os.path.join(proc_root, str(pid), "root", sock.path.lstrip("/"))
    return os.path.join(proc_root, str(pid), "cwd", sock.path)


__all__ = [
    "QmpError", "QmpConnectError", "QmpTimeout", "QmpDeadline", "QmpProtocolError",
    "QmpCommandError", "QmpVersion", "QmpClient", "QmpSocket", "parse_greeting", "query",
    "qmp_sockets_from_cmdline", "reachable_path", "short_repr", "DEFAULT_TIMEOUT",
    "DEFAULT_SESSION_S", "LIBVIRT_MONITOR_ID",
]
