"""`run`'s options: each a flag with an environment variable (`VRA_<NAME>`) for its default.

A flag wins over its variable. A bad value stops the agent with exit code 2 (argparse) and a
message naming what the user typed: the flag, or the variable and its value when the value came
from the environment. Numbers are bounded, so a typo cannot size the agent's tables beyond memory.
"""
from __future__ import annotations

import argparse
import os
from typing import Any, Callable, Optional

DEFAULTS = {
    "listen": ":9477",
    "stuck_after": "60",
    "log_format": "json",
    "hooks": "auto",
    "max_vms": "256",
    "max_devices": "4096",
    "tls_cert": "",
    "tls_key": "",
    "web_config": "",
    "log_level": "info",
    "vmm_probe": "on",
    "vmm_pci_types": "off",
    "retain_exited": "120",
    "state_file": "/run/virtio-recovery-agent/state.json",
}
ENV = {name: "VRA_" + name.upper() for name in DEFAULTS}

# Upper bounds. The state file a restarted agent reads is refused above 64 MiB
# (agent.state_file.MAX_BYTES) and holds about 1 KiB per device, so more devices than this could
# not be carried across a restart; VMs: 4 remembered pids per VM (agent.daemon.loop).
MAX_DEVICES = 65536
MAX_VMS = 16384
MAX_STUCK_AFTER_S = 30 * 86400.0
MAX_RETAIN_EXITED_S = 86400.0


class _FromEnv(str):
    """A default that came from an environment variable: errors name the variable."""

    variable: str

    def __new__(cls, value: str, variable: str) -> "_FromEnv":
        s = super().__new__(cls, value)
        s.variable = variable
        return s


def _env_default(name: str) -> str:
    value = os.environ.get(ENV[name])
    return DEFAULTS[name] if value is None else _FromEnv(value, ENV[name])


def _naming_the_source(check: Callable[[str], Any]) -> Callable[[str], Any]:
    """argparse reports a bad default as a bad flag: say it was the variable."""
    def convert(text: str) -> Any:
        try:
            value = check(text)
        except argparse.ArgumentTypeError as exc:
            if isinstance(text, _FromEnv):
                raise argparse.ArgumentTypeError(
                    f"environment variable {text.variable}={str(text)!r}: {exc}") from None
            raise
        return str(value) if isinstance(value, _FromEnv) else value
    convert.__name__ = getattr(check, "__name__", "value")
    return convert


def _float_in(low: float, high: float, low_inclusive: bool) -> Callable[[str], float]:
    def check(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        above_low = v >= low if low_inclusive else v > low
        if not (above_low and v <= high):      # NaN fails both
            kind = "a number of seconds >= 0" if low_inclusive else "a positive number of seconds"
            raise argparse.ArgumentTypeError(f"{text!r} must be {kind}, at most {high:g}")
        return v
    return check


def _int_in(low: int, high: int) -> Callable[[str], int]:
    def check(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if v < low:
            raise argparse.ArgumentTypeError(f"{text!r} must be a positive integer")
        if v > high:
            raise argparse.ArgumentTypeError(f"{text!r} is too large: at most {high}")
        return v
    return check


def _listen(text: str) -> str:
    from agent.export.server import ListenAddressError, parse_listen

    try:
        parse_listen(text)
    except ListenAddressError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _choice(*choices: str) -> Callable[[str], str]:
    def check(text: str) -> str:
        if text not in choices:
            raise argparse.ArgumentTypeError(f"{text!r} is not one of {', '.join(choices)}")
        return text
    return check


def known_hooks() -> dict[str, Any]:
    from agent.capture.hooks import FAMILIES

    return FAMILIES


def _hooks(text: str) -> str:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise argparse.ArgumentTypeError("empty hook list (use `auto` or `all`)")
    if names in (["all"], ["auto"]):
        return names[0]
    unknown = sorted(set(names) - set(known_hooks()))
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown hook famil{'y' if len(unknown) == 1 else 'ies'} {', '.join(unknown)}; "
            f"known: auto, all, {', '.join(known_hooks())}")
    if not {"mmio", "pio"} & set(names):
        raise argparse.ArgumentTypeError(
            "the list needs mmio or pio (or both): status registers are seen through them")
    return ",".join(names)


def _web_config(text: str) -> str:
    """'' (off) or a web-config file that parses (agent.export.webconfig); its certificates are
    loaded when the server starts."""
    if not text:
        return str(text)
    from agent.export.webconfig import WebConfigError, load

    try:
        load(str(text))
    except WebConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return str(text)


def _state_file(text: str) -> str:
    """'' (off) or a path whose directory exists: the agent never creates directories where
    a typo points (the default's own directory excepted, agent.daemon.startup)."""
    if not text or text == DEFAULTS["state_file"]:
        return str(text)
    path = os.path.abspath(text)
    parent = os.path.dirname(path)
    if not os.path.isdir(parent):
        raise argparse.ArgumentTypeError(
            f"{str(text)!r}: directory {parent} does not exist (create it, or pass '' to run "
            "without a state file)")
    if os.path.isdir(path):
        raise argparse.ArgumentTypeError(f"{str(text)!r} is a directory, not a file path")
    return str(text)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    def opt(flag: str, name: str, type_, help_: str, metavar: Optional[str] = None) -> None:
        parser.add_argument(flag, dest=name, type=_naming_the_source(type_),
                            default=_env_default(name), metavar=metavar,
                            help=f"{help_} (env {ENV[name]}; default {DEFAULTS[name] or 'none'})")

    opt("--listen", "listen", _listen, "metrics address, [HOST]:PORT", "ADDR")
    opt("--stuck-after", "stuck_after", _float_in(0, MAX_STUCK_AFTER_S, low_inclusive=False),
        "an open NEEDS_RESET episode this many seconds old is stuck", "SECONDS")
    opt("--log-format", "log_format", _choice("json", "text"), "diagnostic log format on stderr",
        "json|text")
    opt("--log-level", "log_level", _choice("debug", "info", "warning", "error"),
        "diagnostic log level", "LEVEL")
    opt("--hooks", "hooks", _hooks,
        "comma-separated hook families to enable, `all`, or `auto` (all but the syscall "
        "`ioctl` hooks, which are attached only where vDPA exists: they cost every ioctl on "
        "the host; decided at start)", "LIST")
    opt("--max-vms", "max_vms", _int_in(1, MAX_VMS), f"VMs tracked at most (<= {MAX_VMS})", "N")
    opt("--max-devices", "max_devices", _int_in(1, MAX_DEVICES),
        f"devices tracked at most, all VMs (<= {MAX_DEVICES})", "N")
    opt("--tls-cert", "tls_cert", str, "serve /metrics over HTTPS with this PEM certificate",
        "FILE")
    opt("--tls-key", "tls_key", str, "PEM private key for --tls-cert", "FILE")
    opt("--web-config", "web_config", _web_config,
        "exporter-toolkit web-config YAML: TLS, client certificates (mTLS), basic auth; "
        "re-read when it or its certificates change; not with --tls-cert", "FILE")
    opt("--retain-exited", "retain_exited",
        _float_in(0, MAX_RETAIN_EXITED_S, low_inclusive=True),
        "an exited VM's devices stay on /metrics this many seconds", "SECONDS")
    opt("--state-file", "state_file", _state_file,
        "where the agent saves what it tracks (devices, open episodes) so that a restarted "
        "agent goes on where it stopped; its directory must exist; '' = don't", "PATH")
    opt("--vmm-probe", "vmm_probe", _choice("on", "off"),
        "ask QEMU over QMP (x-query-virtio-status) about a suspected NEEDS_RESET", "on|off")
    opt("--vmm-pci-types", "vmm_pci_types", _choice("on", "off"),
        "device types from QEMU's query-pci for new PCI devices (QMP traffic for every VM "
        "with a socket)", "on|off")
