"""`run`'s diagnostic log on stderr: one JSON object per line (or plain text).

A record may carry more fields for the JSON line: `log.error(msg, extra={"fields": {...}})`.
The handler writes to its own duplicate of file descriptor 2, so that while libbcc's output on
fd 2 is being captured (agent.daemon.native_output) the agent's own lines still reach stderr.
"""
from __future__ import annotations

import json
import logging
import os
import sys


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        d = {"ts": round(record.created, 3), "level": record.levelname.lower(),
             "logger": record.name, "msg": record.getMessage()}
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            for key, value in fields.items():
                d.setdefault(key, value)
        if record.exc_info:
            d["exc"] = self.formatException(record.exc_info)
        return json.dumps(d, separators=(",", ":"), default=str)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            text += "".join(f"\n  {key}: {value}" for key, value in fields.items())
        return text


def _own_stderr():
    """A line-buffered stream on a duplicate of fd 2 (sys.stderr when fd 2 is not a real one,
    as under pytest's capture)."""
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        return sys.stderr
    try:
        return os.fdopen(os.dup(fd), "w", buffering=1, encoding="utf-8",
                         errors="backslashreplace", closefd=True)
    except OSError:
        return sys.stderr


def setup_logging(fmt: str, level: str = "info") -> None:
    stream = _own_stderr()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for old in root.handlers:
        old_stream = getattr(old, "stream", None)
        if getattr(old, "own_stderr", False) and old_stream is not None:
            old_stream.close()
    handler.own_stderr = stream is not sys.stderr
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
