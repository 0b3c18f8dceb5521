"""What the lab tests read off a running agent: samples of its /metrics, and polling."""
from __future__ import annotations

import time


def samples(source, name: str, **labels) -> list[tuple[dict, float]]:
    """(labels, value) of every sample of `name` with these labels. `source`: the metrics text,
    or an agent (anything with metrics_text(): scraped now)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = source if isinstance(source, str) else source.metrics_text()
    out = []
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                out.append((s.labels, s.value))
    return out


def value(source, name: str, **labels) -> float:
    """The sum of those samples (0 when there are none)."""
    return sum(v for _, v in samples(source, name, **labels))


def wait_until(what: str, fn, timeout_s: float = 60.0, every_s: float = 0.05):
    """fn()'s first truthy result; AssertionError naming `what` after timeout_s. It returns as
    soon as fn() holds: the limit only stops a hung test, far beyond a busy host's delays."""
    deadline = time.monotonic() + timeout_s
    while True:
        got = fn()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(every_s)
