"""The web-config file of Prometheus' exporter-toolkit (TLS, client certificates, basic auth).

Same YAML as node_exporter's `--web.config.file`:

    tls_server_config:
      cert_file: server.crt            # relative paths are relative to this file's directory
      key_file: server.key
      client_auth_type: RequireAndVerifyClientCert
      client_ca_file: clients-ca.crt
      min_version: TLS12
    basic_auth_users:
      prometheus: $2y$10$...          # bcrypt hash (htpasswd -nBC 10 "" | tr -d ':\\n')

Keys of exporter-toolkit that Python's ssl module cannot honour (cipher_suites, ...) are refused
by name rather than ignored: a config that silently weakens what its author asked for is worse
than one that does not start.
"""
from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
import ssl
import threading
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

MAX_FILE_BYTES = 1 << 20
MAX_USERS = 1000

CLIENT_AUTH_TYPES = {
    "NoClientCert": ssl.CERT_NONE,
    "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
    "RequireAndVerifyClientCert": ssl.CERT_REQUIRED,
}
# exporter-toolkit's other two types accept a client certificate without verifying it;
# Python's ssl verifies every certificate it asks for.
UNSUPPORTED_CLIENT_AUTH_TYPES = ("RequestClientCert", "RequireAnyClientCert")
TLS_VERSIONS = {
    "TLS10": ssl.TLSVersion.TLSv1,
    "TLS11": ssl.TLSVersion.TLSv1_1,
    "TLS12": ssl.TLSVersion.TLSv1_2,
    "TLS13": ssl.TLSVersion.TLSv1_3,
}
TOP_KEYS = {"tls_server_config", "basic_auth_users"}
TLS_KEYS = {"cert_file", "key_file", "client_auth_type", "client_ca_file", "min_version",
            "max_version"}
UNSUPPORTED_KEYS = {
    "http_server_config", "tls_server_config.cipher_suites",
    "tls_server_config.curve_preferences", "tls_server_config.prefer_server_cipher_suites",
    "tls_server_config.client_allowed_sans", "tls_server_config.cert", "tls_server_config.key",
}
_BCRYPT_HASH = re.compile(r"^\$2[abxy]?\$(0[4-9]|[12][0-9]|3[01])\$[./A-Za-z0-9]{53}$")


class WebConfigError(ValueError):
    pass


@dataclass(frozen=True)
class TlsConfig:
    cert_file: str
    key_file: str
    client_auth_type: str = "NoClientCert"
    client_ca_file: Optional[str] = None
    min_version: str = "TLS12"
    max_version: str = "TLS13"

    def files(self) -> tuple[str, ...]:
        return tuple(p for p in (self.cert_file, self.key_file, self.client_ca_file) if p)

    def context(self) -> ssl.SSLContext:
        """A fresh server context; ValueError naming the file that cannot be loaded."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = TLS_VERSIONS[self.min_version]
        ctx.maximum_version = TLS_VERSIONS[self.max_version]
        try:
            ctx.load_cert_chain(self.cert_file, self.key_file)
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(f"cannot load TLS certificate/key ({self.cert_file}, "
                             f"{self.key_file}): {exc}") from None
        if self.client_ca_file:
            try:
                ctx.load_verify_locations(cafile=self.client_ca_file)
            except (OSError, ssl.SSLError) as exc:
                raise ValueError(f"cannot load client CA file {self.client_ca_file}: "
                                 f"{exc}") from None
        ctx.verify_mode = CLIENT_AUTH_TYPES[self.client_auth_type]
        return ctx


@dataclass(frozen=True)
class WebConfig:
    tls: Optional[TlsConfig] = None
    basic_auth_users: Mapping[str, str] = field(default_factory=dict)
    path: Optional[str] = None


def load(path: str) -> WebConfig:
    """Parse and check a web-config file. WebConfigError names the file and the key."""
    import yaml

    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise WebConfigError(f"web-config {path}: cannot read: {exc.strerror or exc}") from None
    if len(raw) > MAX_FILE_BYTES:
        raise WebConfigError(f"web-config {path}: larger than {MAX_FILE_BYTES} bytes")
    try:
        doc = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise WebConfigError(f"web-config {path}: not valid YAML: {exc}") from None
    return parse(doc, path)


def parse(doc: Any, path: str) -> WebConfig:
    def fail(key: str, why: str) -> WebConfigError:
        return WebConfigError(f"web-config {path}: {key}: {why}")

    if doc is None:
        return WebConfig(path=path)
    if not isinstance(doc, dict):
        raise WebConfigError(f"web-config {path}: expected a mapping at the top level, "
                             f"got {type(doc).__name__}")
    _check_keys(doc, "", TOP_KEYS, fail)
    base = os.path.dirname(os.path.abspath(path))
    tls = _parse_tls(doc.get("tls_server_config"), base, fail)
    users = doc.get("basic_auth_users")
    if users is None:
        users = {}
    if not isinstance(users, dict):
        raise fail("basic_auth_users", "expected a mapping of user name to bcrypt hash")
    if len(users) > MAX_USERS:
        raise fail("basic_auth_users", f"more than {MAX_USERS} users")
    for name, hashed in users.items():
        if not isinstance(name, str) or not name or ":" in name:
            raise fail(f"basic_auth_users.{name}", "a user name is a non-empty string without ':'")
        if not isinstance(hashed, str) or not _BCRYPT_HASH.match(hashed):
            raise fail(f"basic_auth_users.{name}",
                       "not a bcrypt hash ($2y$/$2b$/$2a$, e.g. from htpasswd -nB)")
    return WebConfig(tls=tls, basic_auth_users=dict(users), path=path)


def _check_keys(doc: dict, prefix: str, known: set[str], fail) -> None:
    for key in doc:
        full = f"{prefix}{key}"
        if full in UNSUPPORTED_KEYS:
            raise fail(full, "not supported by virtio-recovery-agent (remove it)")
        if key not in known:
            raise fail(full, f"unknown key; known: {', '.join(sorted(known))}")


def _parse_tls(section: Any, base: str, fail) -> Optional[TlsConfig]:
    if section is None:
        return None
    if not isinstance(section, dict):
        raise fail("tls_server_config", "expected a mapping")
    _check_keys(section, "tls_server_config.", TLS_KEYS, fail)
    values: dict[str, str] = {}
    for key, value in section.items():
        if not isinstance(value, str) or not value:
            raise fail(f"tls_server_config.{key}", "expected a non-empty string")
        values[key] = value
    if not values:
        return None
    for key in ("cert_file", "key_file"):
        if key not in values:
            raise fail(f"tls_server_config.{key}", "missing (cert_file and key_file go together)")
    auth = values.get("client_auth_type", "NoClientCert")
    if auth in UNSUPPORTED_CLIENT_AUTH_TYPES:
        raise fail("tls_server_config.client_auth_type",
                   f"{auth} is not supported (a client certificate is always verified here); "
                   f"use VerifyClientCertIfGiven or RequireAndVerifyClientCert")
    if auth not in CLIENT_AUTH_TYPES:
        raise fail("tls_server_config.client_auth_type",
                   f"{auth!r} is not one of {', '.join(CLIENT_AUTH_TYPES)}")
    if auth != "NoClientCert" and "client_ca_file" not in values:
        raise fail("tls_server_config.client_ca_file", f"required with {auth}")
    if auth == "NoClientCert" and "client_ca_file" in values:
        raise fail("tls_server_config.client_auth_type",
                   "client_ca_file is set but client_auth_type is NoClientCert "
                   "(set RequireAndVerifyClientCert)")
    for key in ("min_version", "max_version"):
        if key in values and values[key] not in TLS_VERSIONS:
            raise fail(f"tls_server_config.{key}",
                       f"{values[key]!r} is not one of {', '.join(TLS_VERSIONS)}")
    tls = TlsConfig(
        cert_file=os.path.join(base, values["cert_file"]),
        key_file=os.path.join(base, values["key_file"]),
        client_auth_type=auth,
        client_ca_file=(os.path.join(base, values["client_ca_file"])
                        if "client_ca_file" in values else None),
        min_version=values.get("min_version", "TLS12"),
        max_version=values.get("max_version", "TLS13"),
    )
    if TLS_VERSIONS[tls.min_version] > TLS_VERSIONS[tls.max_version]:
        raise fail("tls_server_config.min_version", "is above max_version")
    return tls


class BasicAuth:
    """Checks `Authorization: Basic` against bcrypt hashes.

    A bcrypt check costs ~70 ms by design; a scrape every 15 s would pay it each time, so a
    success is remembered (HMAC of user and password under a per-process key, bounded). An
    unknown user is checked against a dummy hash so that its answer takes as long as a known
    user's.
    """

    CACHE_SIZE = 64

    def __init__(self, users: Mapping[str, str]) -> None:
        import bcrypt

        self._bcrypt = bcrypt
        self._users = {name: hashed.encode() for name, hashed in users.items()}
        self._dummy = bcrypt.hashpw(secrets.token_bytes(16), bcrypt.gensalt(10))
        self._key = secrets.token_bytes(32)
        self._ok: dict[bytes, None] = {}
        self._lock = threading.Lock()

    def check(self, header: Optional[str]) -> bool:
        import base64
        import binascii

        if not header or not header[:6].lower() == "basic ":
            return False
        try:
            decoded = base64.b64decode(header[6:].strip(), validate=True)
        except (binascii.Error, ValueError):
            return False
        user_b, sep, password = decoded.partition(b":")
        if not sep:
            return False
        user = user_b.decode("utf-8", "replace")
        hashed = self._users.get(user)
        token = hmac.new(self._key, user_b + b"\0" + password + b"\0" + (hashed or b""),
                         hashlib.sha256).digest()
        with self._lock:
            if hashed is not None and token in self._ok:
                return True
        try:
            ok = self._bcrypt.checkpw(password, hashed if hashed is not None else self._dummy)
        except ValueError:  # longer than bcrypt's 72 bytes
            ok = False
        if ok and hashed is not None:
            with self._lock:
                if len(self._ok) >= self.CACHE_SIZE:
                    self._ok.pop(next(iter(self._ok)))
                self._ok[token] = None
            return True
        return False
