"""Capture what native code (libbcc, clang, the shell it runs modprobe in) writes to fds 1 and 2.

libbcc reports why a BPF program did not compile on the process's stdout ("Unable to find
kernel headers") and stderr (clang's errors, "chdir(/lib/modules/…/build): No such file or
directory"), not in the exception Python sees; on stdout it would also corrupt the episode log.
While capturing, both fds point at one anonymous temporary file (so the lines keep their order);
the text is read back afterwards, at most MAX_BYTES of its end (clang can print pages of errors).
"""
from __future__ import annotations

import os
import sys
import tempfile
import threading
from contextlib import contextmanager
from typing import Iterator

MAX_BYTES = 16 << 10

# fds 1 and 2 are process-wide: two captures at once would restore them in the wrong order
_lock = threading.Lock()


class CapturedText:
    def __init__(self) -> None:
        self.text = ""
        self.truncated = False

    def lines(self) -> list[str]:
        return [line for line in self.text.splitlines() if line.strip()]


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (AttributeError, OSError, ValueError):
            pass


@contextmanager
def native_output_captured(fds: tuple[int, ...] = (1, 2),
                           max_bytes: int = MAX_BYTES) -> Iterator[CapturedText]:
    """`with native_output_captured() as out:` ... `out.text` (set once the block is left)."""
    out = CapturedText()
    with _lock, tempfile.TemporaryFile() as tmp:
        _flush()
        saved = [os.dup(fd) for fd in fds]
        try:
            for fd in fds:
                os.dup2(tmp.fileno(), fd)
            try:
                yield out
            finally:
                _flush()
                for fd, copy in zip(fds, saved):
                    os.dup2(copy, fd)
        finally:
            for copy in saved:
                os.close(copy)
        size = os.fstat(tmp.fileno()).st_size
        out.truncated = size > max_bytes
        os.lseek(tmp.fileno(), max(0, size - max_bytes), os.SEEK_SET)
        out.text = os.read(tmp.fileno(), max_bytes).decode("utf-8", "replace")
