"""The guest image: built by `make -C lab/guest`, booted through its PVH note (or multiboot)."""
from __future__ import annotations

import struct

import pytest

from lab.harness import GUEST_ELF, GUEST_MULTIBOOT_ELF, GuestSpec, ensure_guest, qemu_command

XEN_ELFNOTE_PHYS32_ENTRY = 18


def _elf_notes(data: bytes) -> list[tuple[str, int, bytes]]:
    assert data[:4] == b"\x7fELF" and data[4] == 1, "expected a 32-bit ELF"
    e_phoff, = struct.unpack_from("<I", data, 28)
    e_phentsize, e_phnum = struct.unpack_from("<HH", data, 42)
    notes = []
    for i in range(e_phnum):
        p_type, p_offset, _, _, p_filesz = struct.unpack_from("<5I", data, e_phoff + i * e_phentsize)
        if p_type != 4:  # PT_NOTE
            continue
        off, end = p_offset, p_offset + p_filesz
        while off < end:
            namesz, descsz, ntype = struct.unpack_from("<3I", data, off)
            off += 12
            name = data[off:off + namesz].rstrip(b"\0").decode()
            off += (namesz + 3) & ~3
            notes.append((name, ntype, data[off:off + descsz]))
            off += (descsz + 3) & ~3
    return notes


@pytest.fixture(scope="module")
def built() -> None:
    ensure_guest()


def test_pvh_note_points_at_the_entry(built: None) -> None:
    data = GUEST_ELF.read_bytes()
    entry, = struct.unpack_from("<I", data, 24)
    pvh = [desc for name, ntype, desc in _elf_notes(data)
           if name == "Xen" and ntype == XEN_ELFNOTE_PHYS32_ENTRY]
    assert len(pvh) == 1
    assert struct.unpack("<I", pvh[0])[0] == entry


def test_multiboot_header_only_in_the_multiboot_image(built: None) -> None:
    magic = struct.pack("<I", 0x1BADB002)
    assert magic not in GUEST_ELF.read_bytes()[:8192]
    mb = GUEST_MULTIBOOT_ELF.read_bytes()
    at = mb.find(magic)
    assert 0 <= at < 8192 and at % 4 == 0
    flags, checksum = struct.unpack_from("<II", mb, at + 4)
    assert (0x1BADB002 + flags + checksum) & 0xFFFFFFFF == 0


@pytest.mark.parametrize("kwargs, needle", [
    ({"transport": "pci"}, "transport"),
    ({"scenario": "explode"}, "scenario"),
    ({"irq": "msi"}, "irq"),
    ({"devices": 0}, "devices"),
    ({"devices": 9}, "devices"),
    ({"devices": 2, "fault_dev": 2}, "fault_dev"),
    ({"repeat": 0}, "repeat"),
    ({"delay_ms": -1}, "delay_ms"),
    ({"pit_ms": 100}, "pit_ms"),
])
def test_bad_specs_are_rejected_with_the_field_named(kwargs: dict, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        GuestSpec(**kwargs)


def test_cmdline_carries_every_scenario_parameter() -> None:
    spec = GuestSpec(transport="mmio", scenario="recover", delay_ms=7, repeat=3, fault_dev=0,
                     fault_delay_ms=40)
    kv = dict(tok.split("=", 1) for tok in spec.cmdline().split())
    assert kv["scenario"] == "recover" and kv["transport"] == "mmio"
    assert kv["fault_delay_ms"] == "40"
    assert kv["delay_ms"] == "7" and kv["repeat"] == "3" and kv["fault_dev"] == "0"
    assert kv["irq"] == "intx"  # virtio-mmio has no MSI-X


@pytest.mark.parametrize("spec, machine, device", [
    (GuestSpec(transport="modern"), "pc", "virtio-rng-pci,id=vrng0,disable-legacy=on,disable-modern=off"),
    (GuestSpec(transport="legacy"), "pc", "virtio-rng-pci,id=vrng0,disable-legacy=off,disable-modern=on"),
    (GuestSpec(transport="modern", irq="intx"), "pc",
     "virtio-rng-pci,id=vrng0,disable-legacy=on,disable-modern=off,vectors=0"),
    (GuestSpec(transport="mmio"), "microvm", "virtio-rng-device,id=vrng0"),
])
def test_qemu_command_per_transport(tmp_path, monkeypatch, spec: GuestSpec, machine: str,
                                    device: str) -> None:
    monkeypatch.setenv("VRA_QEMU", "/usr/bin/qemu-system-x86_64")
    cmd = qemu_command(spec, tmp_path)
    assert cmd[cmd.index("-M") + 1] == machine
    assert cmd[cmd.index("-device", cmd.index("isa-debug-exit,iobase=0xf4,iosize=0x04")) + 1] == device
    assert ("-bios" in cmd) == (machine == "pc")
    assert ("virtio-mmio.force-legacy=false" in cmd) == (machine == "microvm")
    for flag in ("-nodefaults", "-no-user-config", "-no-reboot"):
        assert flag in cmd
    assert f"file:{tmp_path / 'serial.log'}" in cmd and str(tmp_path / "qemu.log") in cmd
    assert cmd[cmd.index("-append") + 1] == spec.cmdline()
