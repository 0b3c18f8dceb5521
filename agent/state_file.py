"""The state file: agent.correlate.checkpoint's state on disk, so a restarted agent goes on
where the old one stopped (docs/run.md, "Restarts").

One agent per file: an exclusive flock on `<path>.lock` (a second agent on the same file runs
without one and says so). Writes are atomic (temporary file + rename). A state written in another
boot is ignored: its CLOCK_MONOTONIC timestamps and pids mean nothing now.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import time
from typing import Any, Optional

from agent.model import VmIdentity
from agent.vmm.vmident import start_time

log = logging.getLogger(__name__)
# a state far larger than any this agent writes (~1 KiB per device, --max-devices 4096 by
# default) is not read
MAX_BYTES = 64 << 20


def boot_id(proc_root: str = "/proc") -> str:
    try:
        with open(os.path.join(proc_root, "sys/kernel/random/boot_id")) as f:
            return f.read().strip()
    except OSError:
        return ""


def process_alive(identity: VmIdentity, proc_root: str = "/proc") -> bool:
    """Is the VMM process of `identity` still running (same pid and, if known, start time)?"""
    try:
        with open(os.path.join(proc_root, str(identity.pid), "stat")) as f:
            stat = f.read()
    except OSError:
        return False
    if identity.start_time == 0:
        # a fallback identity: the pid is all that is known, and it may have been reused
        return False
    try:
        return start_time(stat) == identity.start_time
    except ValueError:
        return False


class StateFile:
    def __init__(self, path: str, proc_root: str = "/proc") -> None:
        self.path = path
        self.proc_root = proc_root
        self._lock_fd: Optional[int] = None
        self._boot_id = boot_id(proc_root)

    def acquire(self) -> Optional[str]:
        """Take the file for this agent. None when done, else why it cannot be used."""
        directory = os.path.dirname(os.path.abspath(self.path))
        try:
            os.makedirs(directory, mode=0o700, exist_ok=True)
            fd = os.open(self.path + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            return f"cannot create {self.path}.lock: {exc.strerror}"
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return f"{self.path} is in use by another agent"
        self._lock_fd = fd
        return None

    def load(self) -> Optional[dict[str, Any]]:
        """The saved state, or None (no file, or one that cannot be used: logged)."""
        if not self._boot_id:
            log.warning("ignoring state file %s: this host's boot id is unreadable", self.path)
            return None
        try:
            with open(self.path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size > MAX_BYTES:
                    raise ValueError(f"{size} bytes, more than the {MAX_BYTES} this agent writes")
                data = json.load(f)
        except FileNotFoundError:
            return None
        except Exception as exc:     # OSError, ValueError, RecursionError (nesting), ...
            log.warning("ignoring state file %s: %s", self.path, exc)
            return None
        if not isinstance(data, dict) or not isinstance(data.get("state"), dict):
            log.warning("ignoring state file %s: not an agent state", self.path)
            return None
        if data.get("boot_id") != self._boot_id:
            log.info("ignoring state file %s: written before this host booted", self.path)
            return None
        return data["state"]

    def save(self, state: dict[str, Any]) -> None:
        """Write atomically. Raises OSError (the caller counts and logs it)."""
        data = {"boot_id": self._boot_id, "saved_ns": time.monotonic_ns(), "state": state}
        tmp = f"{self.path}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW,
                     0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, separators=(",", ":"))
        os.replace(tmp, self.path)

    def alive(self, identity: VmIdentity) -> bool:
        return process_alive(identity, self.proc_root)

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
