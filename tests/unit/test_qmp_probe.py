"""agent.vmm.probe parse functions on QMP replies recorded from real QEMU 7.2
(tests/unit/fixtures/qmp/CAPTURED*.md have the command lines), and the rate limiter."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, strategies as st

from agent.events import DEVICE_NEEDS_RESET, Space
from agent.vmm.probe import (
    MAX_BRIDGE_DEPTH, STATUS_BITS, ProbeFormatError, QueryRateLimiter, VirtioDevice, device_at,
    parse_pci, parse_status_byte, parse_virtio_list, parse_virtio_status, pci_device_for,
    virtio_at, virtio_id_from_pci, virtio_type_name,
)

FIXTURES = Path(__file__).parent / "fixtures" / "qmp"


def ret(name: str):
    return json.loads((FIXTURES / f"{name}.json").read_bytes())["return"]


# The recorded VM's command line (CAPTURED.md): id -> (virtio type, PCI kind).
ASKED = {"rng0": ("rng", "transitional"), "net0": ("net", "modern"), "rng1": ("rng", "modern")}


def test_virtio_list():
    devs = parse_virtio_list(ret("x-query-virtio"))
    assert {d.qdev_id for d in devs} == set(ASKED) | {""}
    for d in devs:
        assert d.path.endswith("/virtio-backend")
        if d.qdev_id:
            assert d.name == f"virtio-{ASKED[d.qdev_id][0]}"
    (anon,) = [d for d in devs if not d.qdev_id]
    assert anon.name == "virtio-balloon"
    assert anon.path == "/machine/peripheral-anon/device[0]/virtio-backend"


def test_virtio_list_microvm():
    """virtio-mmio devices are VirtIODevices themselves: no /virtio-backend child."""
    devs = parse_virtio_list(ret("x-query-virtio.microvm"))
    assert {(d.name, d.qdev_id) for d in devs} == {("virtio-rng", "rng0"), ("virtio-net", "")}
    assert pci_device_for(parse_pci([]), devs[0]) is None


@pytest.mark.parametrize("tag", ["rng0", "rng1", "net0", "anon"])
def test_virtio_status_before_driver(tag):
    path = "/machine/peripheral/%s/virtio-backend" % tag
    st_ = parse_virtio_status(path, ret(f"x-query-virtio-status.{tag}"))
    assert st_.status == 0 and not st_.needs_reset and st_.broken is False
    assert st_.vm_running is True and st_.isr == 0
    assert st_.type == (ASKED[tag][0] if tag in ASKED else "balloon")
    assert st_.name == f"virtio-{st_.type}"


def test_status_strings_decode_to_the_byte():
    # QEMU's exact strings (hw/virtio/virtio-qmp.c, virtio_config_status_map)
    recorded_style = {
        "statuses": [
            "VIRTIO_CONFIG_S_DRIVER_OK: Driver setup and ready",
            "VIRTIO_CONFIG_S_FEATURES_OK: Feature negotiation complete",
            "VIRTIO_CONFIG_S_DRIVER: Guest OS compatible with device",
            "VIRTIO_CONFIG_S_NEEDS_RESET: Irrecoverable error, device needs reset",
            "VIRTIO_CONFIG_S_ACKNOWLEDGE: Valid virtio device found",
        ]
    }
    assert parse_status_byte(recorded_style) == 0x4f
    assert parse_status_byte({"statuses": [], "unknown-statuses": 0x30}) == 0x30
    assert parse_status_byte({"statuses": ["VIRTIO_CONFIG_S_FAILED: Error in guest, device failed"]}) == 0x80


def _com1_lab() -> list[dict[str, str]]:
    lines = (FIXTURES / "com1.lab.log").read_text().splitlines()
    return [dict(t.split("=", 1) for t in x.split() if "=" in t) | {"_": x.split()[1]}
            for x in lines if x.startswith("VRA ")]


def test_recorded_needs_reset_matches_what_the_guest_read():
    """Lab guest recording: device 0 (vrng0) faulted; the guest read back NEEDS_RESET."""
    com1 = _com1_lab()
    (seen,) = [e for e in com1 if e["_"] == "needs_reset"]
    s = parse_virtio_status("/machine/peripheral/rng0/virtio-backend", ret("x-query-virtio-status.lab-rng0"))
    assert s.status == int(seen["value"], 16) and s.needs_reset
    assert s.broken is True and s.type == "rng" and s.started is True
    assert s.isr == 0x3     # virtio_error() -> virtio_notify_config(): config + queue bits


def test_recorded_healthy_device_and_link_change():
    com1 = _com1_lab()
    (net_dev,) = [e["idx"] for e in com1 if e["_"] == "dev" and e["type"] == "1"]
    last_write = [e for e in com1 if e["_"] == "status" and e["dev"] == net_dev][-1]
    before = parse_virtio_status("/n", ret("x-query-virtio-status.lab-net0"))
    after = parse_virtio_status("/n", ret("x-query-virtio-status.lab-net0-link-down"))
    assert before.status == int(last_write["value"], 16) == 0x0f and before.broken is False
    assert before.isr == 0 and before.type == "net"
    # set_link: a config change without an error
    assert after.isr & 0x2 and (after.status, after.broken) == (before.status, False)


def test_recorded_guest_addresses_map_to_their_devices():
    """The lab guest programmed the BARs itself and printed where its registers are."""
    devs = parse_pci(ret("query-pci.lab"))
    for g in (e for e in _com1_lab() if e["_"] == "dev"):
        space = Space.MMIO if g["space"] == "mmio" else Space.PIO
        for key in ("status_addr", "gen_addr", "msix_config_addr", "isr_addr", "notify_addr"):
            hit = device_at(devs, space, int(g[key], 16))
            assert hit is not None, (key, g)
            assert hit.device.bdf == "0000:" + g["bdf"] and hit.device.virtio_id == int(g["type"])
            assert hit.device.device == int(g["pci_id"], 16)
        assert device_at(devs, space, int(g["status_addr"], 16)).offset == 0x14


@given(st.integers(0, 255))
def test_status_byte_roundtrip(value):
    names = [f"{n}: x" for n, bit in STATUS_BITS.items() if value & bit]
    known = 0
    for bit in STATUS_BITS.values():
        known |= bit
    obj = {"statuses": names}
    if value & ~known:
        obj["unknown-statuses"] = value & ~known
    assert parse_status_byte(obj) == value


@pytest.mark.parametrize("bad", [
    None, [], {"statuses": "x"}, {"statuses": ["VIRTIO_CONFIG_S_BOGUS: ?"]},
    {"statuses": [], "unknown-statuses": 0x100}, {"statuses": [3]},
])
def test_bad_status_is_a_format_error(bad):
    with pytest.raises(ProbeFormatError):
        parse_status_byte(bad)


def test_virtio_status_missing_field():
    r = dict(ret("x-query-virtio-status.net0"))
    del r["broken"]
    with pytest.raises(ProbeFormatError, match="broken"):
        parse_virtio_status("/p", r)
    r = dict(ret("x-query-virtio-status.net0"), broken="no")
    with pytest.raises(ProbeFormatError):
        parse_virtio_status("/p", r)


def test_needs_reset_property():
    r = dict(ret("x-query-virtio-status.net0"))
    r["status"] = {"statuses": ["VIRTIO_CONFIG_S_NEEDS_RESET: Irrecoverable error, device needs reset"]}
    s = parse_virtio_status("/p", r)
    assert s.needs_reset and s.status == DEVICE_NEEDS_RESET


def test_pci_ids_types_and_bridges():
    devs = parse_pci(ret("query-pci"))
    by_id = {d.qdev_id: d for d in devs if d.qdev_id}
    for qid, (vtype, kind) in ASKED.items():
        assert (by_id[qid].virtio_type, by_id[qid].virtio_pci) == (vtype, kind)
    assert by_id["rng1"].bus == 1 and by_id["rng1"].bdf == "0000:01:00.0"   # behind rp1
    assert by_id["rp1"].virtio_id is None and by_id["rp1"].virtio_type == "unknown"
    assert by_id["net0"].device_key == f"pci-{by_id['net0'].bdf}"
    virtio = [d for d in devs if d.virtio_id is not None]
    assert sorted(d.virtio_type for d in virtio) == ["balloon", "net", "rng", "rng"]
    # every device of the recorded tree is there: 8 on bus 0, 1 behind the root port
    assert len(devs) == 9


def test_pci_bars():
    devs = parse_pci(ret("query-pci"))
    by_id = {d.qdev_id: d for d in devs if d.qdev_id}
    rng0 = by_id["rng0"]
    io = [b for b in rng0.bars if b.space == Space.PIO]
    assert [(b.index, b.size) for b in io] == [(0, 32)]        # legacy virtio header
    bar4 = [b for b in by_id["net0"].bars if b.index == 4][0]
    assert bar4.space == Space.MMIO and bar4.mem64 and bar4.prefetch and bar4.size == 16384
    assert all(b.address is not None for d in devs for b in d.bars)


def test_unprogrammed_bar_is_none():
    r = json.loads(json.dumps(ret("query-pci")))
    r[0]["devices"][2]["regions"][0]["address"] = -1      # what QEMU reports before firmware ran
    devs = parse_pci(r)
    rng0 = [d for d in devs if d.qdev_id == "rng0"][0]
    assert rng0.bars[0].address is None
    assert device_at(devs, Space.PIO, 0) is None


def _mtree_common_regions() -> list[tuple[int, str]]:
    text = ret("mtree")
    out = []
    for line in text.splitlines():
        parts = line.split()
        if parts and parts[-1].startswith("virtio-pci-common-virtio-"):
            out.append((int(parts[0].split("-")[0], 16), parts[-1].removeprefix("virtio-pci-common-virtio-")))
    return out


def test_device_at_matches_recorded_memory_map():
    """The same recorded VM's `info mtree -f`: each common-cfg region must map to its device."""
    devs = parse_pci(ret("query-pci"))
    regions = _mtree_common_regions()
    assert len(regions) == 4
    for start, vtype in regions:
        hit = device_at(devs, Space.MMIO, start + 0x14)
        assert hit is not None and hit.device.virtio_type == vtype
        assert hit.bar.index == 4 and hit.offset == 0x14


def test_device_at_edges():
    devs = parse_pci(ret("query-pci"))
    rng0 = [d for d in devs if d.qdev_id == "rng0"][0]
    io = rng0.bars[0]
    assert device_at(devs, Space.PIO, io.address).device is rng0
    assert device_at(devs, Space.PIO, io.address + io.size - 1).offset == io.size - 1
    after = device_at(devs, Space.PIO, io.address + io.size)
    assert after is None or after.device is not rng0
    # the same number in the other space is another thing entirely
    hit = device_at(devs, Space.MMIO, io.address)
    assert hit is None or hit.device is not rng0
    with pytest.raises(ValueError):
        device_at(devs, "port", 1)


def test_pci_device_for_links_by_qdev_id():
    devs = parse_pci(ret("query-pci"))
    for v in parse_virtio_list(ret("x-query-virtio")):
        p = pci_device_for(devs, v)
        if v.qdev_id:
            assert p is not None and p.qdev_id == v.qdev_id
            assert f"virtio-{p.virtio_type}" == v.name
        else:
            assert p is None
    assert pci_device_for(devs, VirtioDevice("/machine/peripheral/gone/virtio-backend", "x")) is None


@pytest.mark.parametrize("bad", [
    {}, [{"bus": 0}], [{"bus": 0, "devices": [{"bus": 0}]}],
])
def test_bad_pci_is_a_format_error(bad):
    with pytest.raises(ProbeFormatError):
        parse_pci(bad)


def test_bad_region_type():
    r = json.loads(json.dumps(ret("query-pci")))
    r[0]["devices"][2]["regions"][0]["type"] = "rom"
    with pytest.raises(ProbeFormatError, match="region type"):
        parse_pci(r)


def test_bad_virtio_list():
    with pytest.raises(ProbeFormatError):
        parse_virtio_list({"path": "/x"})
    with pytest.raises(ProbeFormatError):
        parse_virtio_list([{"path": "/x"}])


def test_virtio_id_from_pci():
    assert virtio_id_from_pci(0x1af4, 0x1041, 0x1100) == (1, "modern")
    assert virtio_id_from_pci(0x1af4, 0x1040 + 26, None) == (26, "modern")
    assert virtio_id_from_pci(0x1af4, 0x1001, 2) == (2, "transitional")
    assert virtio_id_from_pci(0x1af4, 0x1001, None) == (2, "transitional")   # table fallback
    assert virtio_id_from_pci(0x1af4, 0x1110, 0) == (None, "")               # ivshmem
    assert virtio_id_from_pci(0x8086, 0x1041, 1) == (None, "")
    assert virtio_type_name(26) == "fs" and virtio_type_name(99) == "unknown"
    assert virtio_type_name(None) == "unknown"


# --- rate limiter ------------------------------------------------------------------------------

class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def test_rate_limiter_one_query_per_interval_per_vm():
    clock = Clock()
    rl = QueryRateLimiter(10.0, clock=clock)
    vm_a, vm_b = (100, 5), (200, 7)
    assert rl.allow(vm_a) and rl.allow(vm_b)
    assert not rl.allow(vm_a)
    clock.t += 9.99
    assert not rl.allow(vm_a)
    clock.t += 0.01
    assert rl.allow(vm_a) and not rl.allow(vm_a)
    assert (rl.allowed, rl.denied, rl.evicted) == (3, 3, 0)


def test_rate_limiter_is_bounded():
    clock = Clock()
    rl = QueryRateLimiter(10.0, max_entries=3, clock=clock)
    for pid in range(10):
        assert rl.allow((pid, 0))
        clock.t += 0.1
    assert len(rl) == 3 and rl.evicted == 7
    assert not rl.allow((9, 0))        # recent keys stay limited
    assert rl.allow((0, 0))            # an evicted key may be queried again (early)


def test_rate_limiter_denied_key_does_not_refresh():
    clock = Clock()
    rl = QueryRateLimiter(10.0, clock=clock)
    rl.allow("vm")
    for _ in range(5):
        clock.t += 3
        rl.allow("vm")
    # denied at +3, +6, +9 (a denial does not restart the interval), allowed at +12, denied at +15
    assert rl.allowed == 2 and rl.denied == 4


def test_rate_limiter_forget_and_validation():
    rl = QueryRateLimiter(10.0, clock=Clock())
    rl.allow("vm")
    rl.forget("vm")
    rl.forget("never-seen")
    assert rl.allow("vm")
    with pytest.raises(ValueError):
        QueryRateLimiter(0)
    with pytest.raises(ValueError):
        QueryRateLimiter(1, max_entries=0)


# --- garbage replies stay ProbeFormatError ----------------------------------------------------

def _nested(n: int):
    x: list = []
    for _ in range(n):
        x = [x]
    return x


@pytest.mark.parametrize("raw", [
    '{"statuses": [], "unknown-statuses": Infinity}',
    '{"statuses": [], "unknown-statuses": -Infinity}',
    '{"statuses": [], "unknown-statuses": NaN}',
    '{"statuses": [], "unknown-statuses": 1e999}',
    '{"statuses": [], "unknown-statuses": 2.0}',
    '{"statuses": [], "unknown-statuses": "3"}',
    '{"statuses": [], "unknown-statuses": true}',
])
def test_non_integer_unknown_statuses_is_a_format_error(raw):
    """json.loads accepts Infinity/NaN; int(inf) would raise OverflowError."""
    with pytest.raises(ProbeFormatError):
        parse_status_byte(json.loads(raw))


@pytest.mark.parametrize("field", ["device-id", "isr"])
def test_infinite_number_fields_are_format_errors(field):
    r = dict(ret("x-query-virtio-status.net0"), **{field: float("inf")})
    with pytest.raises(ProbeFormatError):
        parse_virtio_status("/p", r)


def test_deeply_nested_values_are_format_errors():
    """Error messages must not repr() peer data whole: a deep value raises RecursionError."""
    deep = _nested(100_000)
    with pytest.raises(ProbeFormatError):
        parse_virtio_list([deep])
    with pytest.raises(ProbeFormatError):
        parse_virtio_list([{"path": deep, "name": "x"}])
    with pytest.raises(ProbeFormatError):
        parse_status_byte({"statuses": deep})
    with pytest.raises(ProbeFormatError):
        parse_status_byte({"statuses": [], "unknown-statuses": deep})
    with pytest.raises(ProbeFormatError):
        parse_virtio_status("/p", dict(ret("x-query-virtio-status.net0"), name=deep))
    with pytest.raises(ProbeFormatError):
        parse_virtio_status("/p", deep)
    with pytest.raises(ProbeFormatError):
        parse_pci([deep])
    with pytest.raises(ProbeFormatError):
        parse_pci([{"bus": 0, "devices": [deep]}])


def test_bridges_nested_too_deeply_are_a_format_error():
    good = ret("query-pci")
    leaf = json.loads(json.dumps(good[0]["devices"][0]))
    dev = leaf
    for _ in range(MAX_BRIDGE_DEPTH + 5):
        dev = dict(leaf, pci_bridge={"bus": {}, "devices": [dev]})
    with pytest.raises(ProbeFormatError, match="nested deeper"):
        parse_pci([{"bus": 0, "devices": [dev]}])
    with pytest.raises(ProbeFormatError):
        parse_pci([{"bus": 0, "devices": [dict(leaf, pci_bridge={"devices": 5})]}])


# --- which virtio device an address is ----------------------------------------------------------

def test_proxied_tells_virtio_pci_from_virtio_mmio():
    assert all(d.proxied for d in parse_virtio_list(ret("x-query-virtio")))   # anon one too
    assert not any(d.proxied for d in parse_virtio_list(ret("x-query-virtio.microvm")))


def test_virtio_at_pci_and_mmio():
    pci = parse_pci(ret("query-pci"))
    listed = parse_virtio_list(ret("x-query-virtio"))
    regions = _mtree_common_regions()
    for start, vtype in regions:
        v = virtio_at(listed, pci, Space.MMIO, start)
        if v is None:                      # the anonymous device: not linked by qdev id
            assert vtype == "balloon"
        else:
            assert v.name == f"virtio-{vtype}"
    # no PCI BAR holds it and no virtio-mmio device: nothing (the anonymous PCI one is not mmio)
    assert virtio_at(listed, pci, Space.MMIO, 0xFEB00000) is None
    micro = parse_virtio_list(ret("x-query-virtio.microvm"))
    assert virtio_at(micro, [], Space.MMIO, 0xFEB00000) is None          # two mmio devices
    assert virtio_at(micro[:1], [], Space.MMIO, 0xFEB00000) == micro[0]  # exactly one
    assert virtio_at(micro[:1] + listed, pci, Space.MMIO, 0xFEB00000) == micro[0]
    assert virtio_at(micro[:1], [], Space.PIO, 0xC000) is None
