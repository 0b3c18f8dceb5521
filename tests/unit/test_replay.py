"""`replay FILE`: recorded events -> episodes table / JSON, clear errors for bad input."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from agent import events as E
from agent.cli import main as cli_main
from agent.model import Evidence, Rule, Transport
from test_correlate_guestscript import Script

MS = 1_000_000


def recording(tmp_path, lines=None):
    s = Script()
    vm = s.vm(321, "lab-guest", start_time=77)
    dev = vm.device(Transport.PCI_MODERN, 0xFEBF1000, vector=0x23)
    dev.init()
    truth = dev.needs_reset()
    s.step(3 * MS)
    dev.recover()
    other = vm.device(Transport.PCI_LEGACY, 0xC040)
    other.init()
    open_ep = other.needs_reset(notify=False)
    s.step(2 * MS)
    other.read()
    path = tmp_path / "rec.jsonl"
    text = "".join(E.to_json(e) + "\n" for e in s.events)
    if lines:
        text += "".join(line + "\n" for line in lines)
    path.write_text(text)
    return path, truth, open_ep


def test_json_output_has_the_exact_episode(tmp_path, capsys):
    path, truth, open_ep = recording(tmp_path)
    assert cli_main(["replay", "--json", str(path)]) == 0
    doc = json.loads(capsys.readouterr().out)
    [done, still] = doc["episodes"]
    assert (done["vm"], done["device"], done["outcome"], done["evidence"]) == (
        "lab-guest", "pci-0000:00:03.0", "recovered", Evidence.CONFIG_INTERRUPT)
    assert done["start_ns"] == truth.start_ns and done["driver_ok_ns"] == truth.driver_ok_ns
    assert done["recovery_seconds"] == (truth.driver_ok_ns - truth.start_ns) / 1e9
    assert set(done["phase_seconds"]) == {"notify", "react", "reset", "reinit"}
    assert (still["device"], still["outcome"], still["stuck"]) == ("pio-0xc040", "open", False)
    assert still["start_ns"] == open_ep.start_ns
    assert doc["episodes_ended"] == {"recovered": 1}
    assert doc["stats"]["events"] > 10 and doc["stats"]["malformed_lines"] == 0
    assert {(d["device"], d["type"]) for d in doc["devices"]} == {
        ("pci-0000:00:03.0", "rng"), ("pio-0xc040", "unknown")}


def test_table_output_and_stuck_marking(tmp_path, capsys):
    path, _, _ = recording(tmp_path)
    assert cli_main(["replay", "--stuck-after", "0.001", str(path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("2 NEEDS_RESET episode(s)\n")
    assert "recovered" in out and "open (stuck)" in out and "RECOVERY_MS" in out
    assert "lab-guest" in out and "status=0x47" in out


def test_violations_are_listed(tmp_path, capsys):
    s = Script()
    dev = s.vm(5, "v").device(Transport.PCI_MODERN)
    dev.init()
    dev.reinit_without_reset()
    path = tmp_path / "v.jsonl"
    path.write_text("".join(E.to_json(e) + "\n" for e in s.events))
    assert cli_main(["replay", "--json", str(path)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [v["rule"] for v in doc["violations"]] == [Rule.BIT_CLEARED_WITHOUT_RESET]


@pytest.mark.parametrize("bad,reason", [
    ("{not json", "not JSON"),
    ('{"kind":"nope","ts_ns":1}', "unknown event kind"),
    ('{"kind":"exit","ts_ns":"5","pid":1}', "ts_ns must be an integer"),
    ('{"kind":"exit","ts_ns":5}', "missing"),
    ('{"kind":"exit","ts_ns":5,"pid":1,"extra":2}', "unknown fields"),
    ('[1,2]', "JSON object"),
    ('{"kind":"exit","ts_ns":-5,"pid":1}', "negative"),
    ('{"kind":"access","ts_ns":5,"pid":1,"tid":1,"space":"mmio","op":"read","addr":1,'
     '"size":1,"value":true}', "value must be an integer"),
])
def test_malformed_line_is_reported_with_its_number(tmp_path, capsys, bad, reason):
    path, _, _ = recording(tmp_path, lines=[bad])
    n = len(path.read_text().splitlines())
    assert cli_main(["replay", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}:{n}:" in err and reason in err


def test_keep_going_skips_and_counts(tmp_path, capsys):
    path, _, _ = recording(tmp_path, lines=["garbage", ""])
    assert cli_main(["replay", "--json", "--keep-going", str(path)]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["stats"]["malformed_lines"] == 1
    assert "skipped" in captured.err


def test_missing_file_and_bad_options(tmp_path, capsys):
    assert cli_main(["replay", str(tmp_path / "none.jsonl")]) == 2
    assert "cannot read" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["replay", "--hint", "bogus", "x"])
    with pytest.raises(SystemExit):
        cli_main(["replay", "--stuck-after", "-1", "x"])
    path, _, _ = recording(tmp_path)
    assert cli_main(["replay", "--max-vms", "0", str(path)]) == 2


def test_hint_gives_the_type(tmp_path, capsys):
    path, _, _ = recording(tmp_path)
    assert cli_main(["replay", "--json", "--hint", "pio:0xc052:pci-legacy:net",
                     str(path)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["episodes"][1]["device"] == "pio-0xc040" and doc["episodes"][1]["type"] == "net"


def test_stdin_through_the_real_command(tmp_path):
    path, truth, _ = recording(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "agent", "replay", "--json", "-"],
                          input=path.read_text(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["episodes"][0]["start_ns"] == truth.start_ns


def test_devices_of_exited_vms_keep_their_counters_and_abandoned_is_counted(tmp_path, capsys):
    s = Script()
    vm = s.vm(9, "gone")
    dev = vm.device(Transport.PCI_MODERN)
    dev.init()
    dev.needs_reset(notify=False)
    vm.exit()
    path = tmp_path / "exit.jsonl"
    path.write_text("".join(E.to_json(e) + "\n" for e in s.events))
    assert cli_main(["replay", "--json", str(path)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["episodes_ended"] == {"abandoned": 1}
    [d] = doc["devices"]
    assert (d["vm"], d["needs_reset_total"], d["resets_total"]) == ("gone", 1, 1)
    assert doc["episodes"][0]["outcome"] == "abandoned"
