"""The episode log: one JSON line per ended/stuck episode, in the docs/metrics.md format."""
from __future__ import annotations

import io
import json
import re
from pathlib import Path

from agent.export.episode_log import EpisodeLog, read_records, record_for
from agent.model import Episode, EpisodeEnded, EpisodeStuck, Evidence, Outcome, Transport, Violation
from tests.unit.test_metrics import S, VM_A, recovered

ROOT = Path(__file__).resolve().parents[2]


def documented_keys() -> list[str]:
    doc = (ROOT / "docs" / "metrics.md").read_text()
    section = doc[doc.index("## Episode log"):]
    return re.findall(r'"([a-z_]+)":', section)


def test_recovered_line_has_exactly_the_documented_fields():
    buf = io.StringIO()
    logger = EpisodeLog(buf)
    ep = recovered(start=10 * S, ok=0.0035)
    assert logger.write(EpisodeEnded(ep))
    lines = buf.getvalue().splitlines()
    assert len(lines) == 1
    rec = json.loads(lines[0])
    assert list(rec) == documented_keys()
    assert rec["event"] == "episode" and rec["outcome"] == "recovered"
    assert (rec["vm"], rec["namespace"], rec["device"]) == ("web-1", "prod", "pci-0000:00:03.0")
    assert rec["start_ns"] == 10 * S and rec["driver_ok_ns"] == 10 * S + 3_500_000
    assert rec["recovery_seconds"] == ep.recovery_seconds
    assert rec["evidence"] == "config_interrupt"
    assert rec["notify_seconds"] == (ep.guest_saw_ns - ep.start_ns) / 1e9


def test_an_episode_started_at_the_status_read_has_a_null_notify_phase():
    buf = io.StringIO()
    ep = recovered(start=10 * S, ok=0.0035)
    ep.evidence, ep.guest_saw_ns = Evidence.STATUS_READ, ep.start_ns
    assert EpisodeLog(buf).write(EpisodeEnded(ep))
    rec = json.loads(buf.getvalue())
    assert rec["notify_seconds"] is None and rec["recovery_seconds"] == ep.recovery_seconds


def test_stuck_and_abandoned_have_null_phases():
    buf = io.StringIO()
    logger = EpisodeLog(buf)
    open_ep = Episode(vm=VM_A, device="mmio-0xfeb00e00", type="blk", transport=Transport.MMIO,
                      evidence=Evidence.CONFIG_INTERRUPT, start_ns=5 * S, guest_saw_ns=6 * S)
    logger.write(EpisodeStuck(open_ep))
    gone = Episode(vm=VM_A, device="x", type="net", transport=Transport.PCI_MODERN,
                   evidence=Evidence.STATUS_READ, start_ns=S, end_ns=2 * S,
                   outcome=Outcome.ABANDONED)
    logger.write(EpisodeEnded(gone))
    assert not logger.write(Violation(ts_ns=0, vm=VM_A, device="x", rule="r"))
    recs = read_records(buf.getvalue().splitlines())
    assert [r["outcome"] for r in recs] == ["stuck", "abandoned"]
    assert recs[0]["reset_written_ns"] is None and recs[0]["recovery_seconds"] is None
    assert recs[0]["guest_saw_ns"] == 6 * S
    assert recs[1]["driver_ok_ns"] is None
    assert logger.written == 2


def test_read_records_skips_other_lines():
    text = ('2026-01-01 INFO starting\n{"ts":1,"level":"info","msg":"x"}\nnot json {\n'
            + json.dumps(record_for(EpisodeEnded(recovered()))) + "\n")
    assert len(read_records(text.splitlines())) == 1
