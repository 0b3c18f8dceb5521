"""Pure tests of the ring-buffer record decoder (struct bytes -> agent.events dataclasses)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from agent.capture import decode as dec
from agent.events import (
    ApicAccepted, IrqLine, MsiInjected, Op, ProcessExit, QueueNotify, Register, RegisterAccess,
    Space, VhostStatus, from_json, pcicfg_addr, pcicfg_split, to_json,
)

BPF_SOURCE = Path(__file__).resolve().parents[2] / "bpf" / "capture.c"


def test_status_write_mmio():
    raw = dec.encode(ts=123, addr=0xFEBF0014, value=0x0B, tgid=100, tid=101, size=1,
                     etype=dec.EV_ACCESS, op=1, space=0, reg=Register.STATUS)
    assert dec.decode(raw) == RegisterAccess(
        ts_ns=123, pid=100, tid=101, space=Space.MMIO, op=Op.WRITE, addr=0xFEBF0014, size=1,
        value=0x0B, register=Register.STATUS, repeats=0)


def test_status_read_pio_with_repeats():
    raw = dec.encode(ts=5, addr=0xC012, value=0x4F, tgid=7, tid=8, size=1, repeats=99_999,
                     etype=dec.EV_ACCESS, op=0, space=1)
    ev = dec.decode(raw)
    assert isinstance(ev, RegisterAccess)
    assert (ev.space, ev.op, ev.addr, ev.value, ev.repeats, ev.register) == (
        Space.PIO, Op.READ, 0xC012, 0x4F, 99_999, Register.UNKNOWN)


def test_pci_config_space_access():
    addr = pcicfg_addr(0, 3, 0, 0x10)      # BAR0 of 00:03.0
    raw = dec.encode(ts=6, addr=addr, value=0xFFFFFFFF, tgid=7, tid=8, size=4, repeats=2,
                     etype=dec.EV_ACCESS, op=1, space=dec.SPACE_PCICFG)
    ev = dec.decode(raw)
    assert ev == RegisterAccess(ts_ns=6, pid=7, tid=8, space=Space.PCICFG, op=Op.WRITE,
                                addr=addr, size=4, value=0xFFFFFFFF,
                                register=Register.UNKNOWN, repeats=2)
    assert pcicfg_split(ev.addr) == (3 << 3, 0x10)
    assert from_json(to_json(ev)) == ev


def test_8_byte_value_is_unsigned():
    raw = dec.encode(ts=1, addr=0x1000, value=2**64 - 1, size=8, etype=dec.EV_ACCESS, op=0)
    assert dec.decode(raw).value == 2**64 - 1


def test_fast_mmio():
    raw = dec.encode(ts=9, addr=0xFE003000, tgid=3, tid=4, etype=dec.EV_FAST_MMIO, op=1)
    assert dec.decode(raw) == QueueNotify(ts_ns=9, pid=3, tid=4, addr=0xFE003000)


def test_msi_keeps_address_and_data():
    raw = dec.encode(ts=10, addr=0, value=0x4023, tgid=3, tid=5, etype=dec.EV_MSI)
    assert dec.decode(raw) == MsiInjected(ts_ns=10, pid=3, tid=5, address=0, data=0x4023)


def test_irq_level_is_signed():
    raw = dec.encode(ts=11, addr=10, value=(-1) & 0xFFFFFFFF, tgid=3, tid=5, etype=dec.EV_IRQ)
    assert dec.decode(raw) == IrqLine(ts_ns=11, pid=3, tid=5, gsi=10, level=-1)


def test_apic():
    raw = dec.encode(ts=12, addr=1, value=0x23, size=0x100, tgid=3, tid=6, etype=dec.EV_APIC)
    assert dec.decode(raw) == ApicAccepted(ts_ns=12, pid=3, tid=6, apicid=1, vector=0x23,
                                           delivery_mode=0x100)


def test_vhost_status_get_and_kprobe_fd():
    raw = dec.encode(ts=13, addr=17, value=0x4F, tgid=3, tid=6, etype=dec.EV_VHOST_STATUS, op=0)
    assert dec.decode(raw) == VhostStatus(ts_ns=13, pid=3, tid=6, op=Op.READ, fd=17, value=0x4F)
    raw = dec.encode(ts=13, addr=-1, value=0x0F, tgid=3, tid=6, etype=dec.EV_VHOST_STATUS, op=1)
    assert dec.decode(raw).fd == -1


def test_exit():
    raw = dec.encode(ts=14, tgid=3, tid=3, etype=dec.EV_EXIT)
    assert dec.decode(raw) == ProcessExit(ts_ns=14, pid=3)


def test_decoded_events_round_trip_json():
    for etype in (dec.EV_ACCESS, dec.EV_FAST_MMIO, dec.EV_MSI, dec.EV_IRQ, dec.EV_APIC,
                  dec.EV_VHOST_STATUS, dec.EV_EXIT):
        ev = dec.decode(dec.encode(ts=1, addr=2, value=3, tgid=4, tid=5, size=4, etype=etype))
        assert from_json(to_json(ev)) == ev


@pytest.mark.parametrize("raw, message", [
    (b"\0" * 10, "expected 48"),
    (dec.encode(ts=1, etype=99), "unknown event type 99"),
    (dec.encode(ts=1, etype=dec.EV_ACCESS, size=3), "size 3"),
    (dec.encode(ts=1, etype=dec.EV_ACCESS, size=1, space=7), "space 7"),
    # 2 is the kernel's key space of queue notify addresses, never an access's space
    (dec.encode(ts=1, etype=dec.EV_ACCESS, size=1, space=2), "space 2"),
    (dec.encode(ts=1, etype=dec.EV_VHOST_STATUS, op=5), "op 5"),
])
def test_malformed_records_raise(raw, message):
    with pytest.raises(dec.DecodeError, match=message):
        dec.decode(raw)


def _defines(prefix: str) -> dict[str, int]:
    text = BPF_SOURCE.read_text()
    return {m[1]: int(m[2], 0) for m in re.finditer(rf"#define ({prefix}\w+) (\w+)", text)}


def test_event_codes_match_bpf_source():
    for name, value in _defines("EV_").items():
        assert getattr(dec, name) == value, name


def test_counter_slots_match_bpf_source():
    slots = {k: v for k, v in _defines("C_").items() if k != "C_NCOUNTERS"}
    assert _defines("C_")["C_NCOUNTERS"] == len(dec.COUNTERS)
    for name, idx in slots.items():
        assert dec.COUNTERS[idx] == name[2:].lower(), name


def test_struct_layout_matches_bpf_source():
    text = BPF_SOURCE.read_text()
    body = re.search(r"struct event \{(.*?)\};", text, re.S)[1]
    sizes = {"u64": 8, "u32": 4, "u8": 1}
    fields = re.findall(r"^\s*(u64|u32|u8) (\w+);", body, re.M)
    assert sum(sizes[t] for t, _ in fields) == dec.EVENT_SIZE
    assert dec.EVENT_STRUCT.format == "<" + "".join(
        {"u64": "Q", "u32": "I", "u8": "B"}[t] for t, _ in fields)


def test_register_codes_match_bpf_source():
    regs = _defines("REG_")
    assert regs["REG_STATUS"] == Register.STATUS
    assert regs["REG_QUEUE_NOTIFY"] == Register.QUEUE_NOTIFY
    assert regs["REG_ISR"] == Register.ISR


def test_space_codes_match_bpf_source():
    spaces = _defines("SPACE_")
    assert {spaces["SPACE_MMIO"]: Space.MMIO, spaces["SPACE_PIO"]: Space.PIO,
            spaces["SPACE_PCICFG"]: Space.PCICFG} == dec.SPACES
    assert spaces["SPACE_PCICFG"] == dec.SPACE_PCICFG
    assert spaces["SPACE_NOTIFY"] not in dec.SPACES


def test_config_slots_match_bpf_source():
    from agent.capture import capture
    slots = {k: v for k, v in _defines("CFG_").items() if k not in ("CFG_N", "CFG_ENTRIES")}
    for name, idx in slots.items():
        if name != "CFG_INFLIGHT":      # kernel-owned
            assert getattr(capture, name) == idx, name
    assert max(slots.values()) < _defines("CFG_")["CFG_N"]


def test_config_space_options_are_validated():
    from agent.capture import Capture
    for bad in ({"config_rate": -1}, {"config_burst": 0}, {"config_entries": 0}):
        with pytest.raises(ValueError, match="config_"):
            Capture(**bad)
    Capture(config_rate=0)      # 0: configuration space is not forwarded (counted)
