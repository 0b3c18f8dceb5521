"""agent.correlate.checkpoint against its contract (docs/correlation.md "Carried over a restart",
docs/run.md "Restarts", the module's docstrings).

Rules checked here:

- R1 (what is carried): dump() holds the tracked VMs (identity, fallback), their devices (id,
  type, transport, register block, PCI function, config vector / destination / GSI, last config
  interrupt, last episode end), each VM's device model (configuration bytes seen, BAR masks,
  MSI-X entries, msix_config, queue select and queue vectors, ECAM window) and open episodes with
  the status and driver bits last seen. A correlator restored from a state dumps that same state
  again (a second restart loses nothing), the operator's hints of the old run not needed.
- R2 (capture at once): restore() returns the WatchRegister / WatchInterrupt requests of what
  it restored: the model's plan, the config vector an MSI-X entry is programmed with (only an
  entry completely programmed and unmasked, PCI 3.0 6.8.2), a device's vector or GSI.
- R3 (the model goes on): the restored model is the guest's programming: a later guest access
  is judged against it (a PCIEXBAR move forgets the window carried over, not one never seen).
- R4 (episodes): an episode open at the restart is resumed with its VM, device, type, transport,
  marks and re-init values, is still open, still judged for `stuck`, and the status and driver
  bits last seen judge the accesses after the gap (virtio 1.x 2.1.1: no bit cleared without a
  reset). Episodes of VMs gone meanwhile end `abandoned`, named by their VM, and count as
  started. A dump is a snapshot: the live correlator going on does not change it.
- R5 (bounds): VMs and devices restored are ordinary ones: they are evicted least recently used
  first like any other, the new config's bounds apply at the restore.
- R6 (untrusted input): the file is input, not trusted: restore() refuses a malformed state, a
  field of the wrong type (bools are not ints) or out of range with StateError naming the field
  (and the value / type found), so the reason can be logged. Bounds: a PCI bdf is 16 bits (bus
  8, device 5, function 3); BARs are the six of a type-0 header at 0x10..0x24 (PCI 3.0 6.2.5),
  their masks 32-bit registers; MSI-X message address (low dword) and data are 32-bit (PCI 3.0
  6.8.2.6/7), at most MAX_MSIX_ENTRIES entries followed; msix_config, queue_select, queue
  indices and queue_msix_vector are le16 (virtio 1.x 4.1.4.3); at most MAX_FUNCTIONS functions,
  MAX_MSIX_ENTRIES entries and MAX_QUEUES queue vectors per function, 256 bytes of configuration
  space; the ECAM window below the loader's bounds (base < 2**40, size < 2**29: above anything
  a q35 PCIEXBAR can hold, base bits 35:28, 256 MiB).
- R7 (counters): stats() counts the VMs and devices restored, cumulatively.
"""
from __future__ import annotations

import copy
import json
import re

import pytest

from agent import events as E
from agent.correlate import Correlator, CorrelatorConfig, DeviceHint
from agent.correlate.checkpoint import VERSION, StateError, dump, restore
from agent.correlate.pcimodel import MAX_FUNCTIONS, MAX_MSIX_ENTRIES, MAX_QUEUES
from agent.model import (
    EpisodeEnded, EpisodeStuck, Evidence, Outcome, Rule, Transport, Violation, WatchDeviceBars,
    WatchEcam, WatchInterrupt, WatchRegister,
)
from test_correlate_guestscript import Script

MS = 1_000_000
PID = 7
ECAM_BASE = 0xB0000000
MMIO_BASE = 0xFEB02C00
PIO_BASE = 0xC100
VIRTIO_BDF = 3 << 3          # the first function Script's VM enumerates (slot 3)


def jsonable(x):
    return json.loads(json.dumps(x))


def feed(c: Correlator, events) -> list:
    out = []
    for ev in events:
        out.extend(c.feed(ev))
    return out + c.flush()


def canon(state: dict) -> dict:
    """A state with its lists keyed (their order is not part of the contract)."""
    state = jsonable(state)
    vms = {}
    for v in state["vms"]:
        v["devices"] = {d["id"]: d for d in v["devices"]}
        if v.get("pci") is not None:
            v["pci"]["functions"] = {f["bdf"]: f for f in v["pci"]["functions"]}
        vms[v["identity"]["pid"]] = v
    return {"version": state["version"], "vms": vms}


def cfg_access(s: Script, pid: int, op: str, bdf: int, off: int, value: int, size: int = 4):
    s.emit(E.RegisterAccess(s.step(), pid, pid + 1, E.Space.PCICFG, op,
                            E.pcicfg_addr(bdf >> 8, (bdf >> 3) & 31, bdf & 7, off), size, value))


def q35_pciexbar(s: Script, pid: int, base: int, length_bits: int = 0) -> None:
    """The firmware reads the q35 MCH's ids (00:00.0: 8086:29c0) and programs PCIEXBAR (+0x60:
    enable bit 0, length bits 2:1, base bits 35:28)."""
    cfg_access(s, pid, E.Op.READ, 0, 0x00, 0x29C08086)
    cfg_access(s, pid, E.Op.WRITE, 0, 0x64, base >> 32)
    cfg_access(s, pid, E.Op.WRITE, 0, 0x60, (base & 0xFFFFFFFF) | length_bits << 1 | 1)


def vhost(s: Script, pid: int, op: str, value: int, fd: int = 5) -> None:
    s.emit(E.VhostStatus(s.step(), pid, pid + 1, op, fd, value))


class World:
    """VM 7 "web": q35 with an ECAM window, an enumerated virtio-pci (MSI-X: entry 0 config
    vector 0x31, entry 1 queue 0 vector 0x32), a virtio-mmio device (type rng, config vector
    0x41, both known from a hint of the old run) whose episode is open mid re-init (reset, 1, 3
    written), a legacy virtio-pci device (INTx GSI 10 from a hint) and a vhost-vdpa device.
    VM 9: never identified (fallback identity), one virtio-mmio device found from traffic
    (whether it is taken over is alive()'s to say: here every VM is)."""

    def __init__(self) -> None:
        s = self.s = Script()
        web = s.vm(PID, "web")
        q35_pciexbar(s, PID, ECAM_BASE)
        self.pci = web.device(Transport.PCI_MODERN, vector=0x31, queue_vector=0x32)
        self.pci.init()
        self.mmio = web.device(Transport.MMIO, base=MMIO_BASE, vector=0x41)
        self.mmio.init()
        self.legacy = web.device(Transport.PCI_LEGACY, base=PIO_BASE, gsi=10, enumerated=False)
        self.legacy.init()
        for v in (0, 1, 3, 11, 15):
            vhost(s, PID, E.Op.WRITE, v)
        anon = s.vm(9)
        self.anon = anon.device(Transport.MMIO, base=0xFEB03000)
        self.anon.init()
        self.mmio.exact_irq = True        # its hint tells the agent its vector
        self.truth = self.mmio.needs_reset()
        self.mmio.write(0)
        self.mmio.read(0)
        self.mmio.write(1)
        self.mmio.write(3)
        self.hints = (
            DeviceHint(E.Space.MMIO, self.mmio.status_addr, type="rng", config_vector=0x41),
            DeviceHint(E.Space.PIO, self.legacy.status_addr, type="net", gsi=10),
        )
        self.old = Correlator(CorrelatorConfig(hints=self.hints))
        feed(self.old, s.events)
        self.now = s.t + MS
        self.state = jsonable(dump(self.old))

    def restored(self, state=None, cfg=None, alive=lambda identity: True):
        new = Correlator(cfg or CorrelatorConfig())
        out = restore(new, copy.deepcopy(self.state if state is None else state), alive,
                      self.now)
        return new, out


_WORLD: list[World] = []


@pytest.fixture
def world() -> World:
    """A fresh copy of the World for each test (tests go on with its script)."""
    if not _WORLD:
        _WORLD.append(World())
    return copy.deepcopy(_WORLD[0])


def vm_state(state: dict, pid: int = PID) -> dict:
    return next(v for v in state["vms"] if v["identity"]["pid"] == pid)


def device_state(state: dict, dev_id: str, pid: int = PID) -> dict:
    return next(d for d in vm_state(state, pid)["devices"] if d["id"] == dev_id)


def function_state(state: dict, bdf: int = VIRTIO_BDF) -> dict:
    return next(f for f in vm_state(state)["pci"]["functions"] if f["bdf"] == bdf)


def refused(world: World, state: dict, pattern: str) -> StateError:
    with pytest.raises(StateError) as info:
        world.restored(state)
    assert re.search(pattern, str(info.value)), str(info.value)
    return info.value


def field_named(name: str, what: str = "") -> str:
    """The field's name as a word (not part of a longer one), then what it holds."""
    return rf"(?<![\w-]){re.escape(name)}(?![\w-]){re.escape(what)}"


# -- R1: what is carried ---------------------------------------------------------------------

def test_the_world_holds_what_the_rules_need(world):
    """The scenario itself: every kind of field is there with a value not its default."""
    state = world.state
    fn = function_state(state)
    assert fn["msix"]["0"] == [0xFEE00000, 0x31, False]
    assert fn["msix_config"] == 0 and fn["queue_select"] == 0 and fn["queue_vectors"] == {"0": 1}
    assert set(fn["bar_masks"]) >= {"16", "20", "32"}
    assert vm_state(state)["pci"]["ecam"] == [ECAM_BASE, 256 << 20]
    mmio = device_state(state, world.mmio.id)
    assert mmio["episode"]["reinit_values"] == [1, 3]
    assert (mmio["status"], mmio["driver_bits"], mmio["type"]) == (3, 3, "rng")
    assert vm_state(state, 9)["fallback"] is True
    assert device_state(state, "vhost-fd5")["layout"] is None


def test_a_restored_correlator_dumps_the_state_it_was_restored_from(world):
    new, _ = world.restored()
    assert canon(dump(new)) == canon(world.state)


def test_restoring_twice_in_a_row_still_loses_nothing(world):
    new, _ = world.restored()
    again = Correlator()
    restore(again, jsonable(dump(new)), lambda identity: True, world.now + MS)
    assert canon(dump(again)) == canon(world.state)


def test_a_dump_is_a_snapshot_the_live_correlator_going_on_does_not_change_it():
    s = Script()
    dev = s.vm(PID, "web").device(Transport.MMIO, base=MMIO_BASE)
    dev.init()
    dev.needs_reset()
    dev.write(0)
    dev.read(0)
    dev.write(1)
    old = Correlator()
    feed(old, s.events)
    state = dump(old)                   # not serialised yet
    split = len(s.events)
    dev.write(3)
    dev.write(11)
    feed(old, s.events[split:])
    assert device_state(state, dev.id)["episode"]["reinit_values"] == [1]


def test_restored_devices_keep_their_type_and_transport_in_snapshots(world):
    new, _ = world.restored()
    views = {(v.vm.pid, v.device): v for v in new.snapshot(world.now).devices}
    assert views[(PID, world.mmio.id)].type == "rng"
    assert views[(PID, world.mmio.id)].transport == Transport.MMIO
    assert views[(PID, world.legacy.id)].type == "net"
    assert views[(PID, world.pci.id)].type == "rng"
    assert views[(PID, "vhost-fd5")].transport == Transport.VHOST
    assert views[(9, world.anon.id)].vm.name == "pid-9"


# -- R2: capture at once -----------------------------------------------------------------------

def interrupts(out) -> set:
    return {(o.pid, o.vector, o.gsi) for o in out if isinstance(o, WatchInterrupt) and o.add}


def test_restore_asks_capture_for_exactly_the_interrupts_it_restored(world):
    """The enumerated function's config vector (MSI-X entry msix_config), the mmio device's
    vector and the legacy device's GSI, known in the old run from hints: the new run has none."""
    _, out = world.restored()
    assert interrupts(out) == {(PID, 0x31, None), (PID, 0x41, None), (PID, None, 10)}


def test_restore_asks_capture_to_watch_every_device_register_again(world):
    _, out = world.restored()
    watched = {(o.pid, o.space, o.addr) for o in out if isinstance(o, WatchRegister) and o.add}
    for dev in (world.pci, world.mmio, world.legacy, world.anon):
        assert (dev.vm.pid, dev.space, dev.status_addr) in watched
    assert not [o for o in out if isinstance(o, WatchRegister) and not o.add]



def spans(out) -> set:
    """The ECAM windows and device-BAR spans capture holds after applying `out` in order."""
    held: dict = {}
    for o in out:
        if isinstance(o, (WatchEcam, WatchDeviceBars)):
            key = (type(o).__name__, o.pid)
            if o.add:
                held[key] = (o.base, o.size)
            elif held.get(key) == (o.base, o.size):
                del held[key]
    return {(kind, pid, *span) for (kind, pid), span in held.items()}


def test_restore_asks_capture_for_the_ecam_window_and_the_bar_span_again(world):
    """A restarted agent's kernel maps start empty: q35's configuration accesses only reach the
    model through the ECAM window, and a driver's first writes to its BARs through the span of
    the VM's virtio BARs. The restore asks for both as the old run had them at its end."""
    before = spans(feed(Correlator(CorrelatorConfig(hints=world.hints)), world.s.events))
    assert ("WatchEcam", PID, ECAM_BASE, 256 << 20) in before
    assert any(kind == "WatchDeviceBars" for kind, *_ in before)
    _, out = world.restored()
    assert spans(out) == before

@pytest.mark.parametrize("masked", [True, None], ids=["masked", "mask-unseen"])
def test_an_msix_entry_not_known_unmasked_gives_no_config_vector(world, masked):
    """PCI 3.0 6.8.2.9: a masked entry sends no message; an entry whose vector control the agent
    never saw is not known to be unmasked. Its vector is not the device's config vector."""
    state = copy.deepcopy(world.state)
    function_state(state)["msix"]["0"][2] = masked
    new, out = world.restored(state)
    assert (PID, 0x31, None) not in interrupts(out)
    assert function_state(jsonable(dump(new)))["msix"]["0"][2] is masked
    assert device_state(jsonable(dump(new)), world.pci.id)["config_vector"] is None


def test_a_config_interrupt_on_a_restored_vector_is_the_devices():
    """A device whose config vector only the old run's hint said: after the restore (no hint)
    an interrupt on that vector is its config interrupt (counted, and no violation: it is
    DRIVER_OK)."""
    s = Script()
    dev = s.vm(PID, "web").device(Transport.MMIO, base=MMIO_BASE, vector=0x41)
    dev.init()
    old = Correlator(CorrelatorConfig(hints=(dev.hint(),)))
    feed(old, s.events)
    new = Correlator()
    restore(new, jsonable(dump(old)), lambda identity: True, s.t)
    split = len(s.events)
    dev.config_interrupt()
    feed(new, s.events[split:])
    (view,) = new.snapshot(s.t).devices
    assert view.config_interrupts_total == 1


# -- R3: the model goes on ---------------------------------------------------------------------

def test_a_guest_moving_its_ecam_window_after_the_restore_forgets_the_one_carried_over(world):
    new, _ = world.restored()
    s = world.s
    split = len(s.events)
    q35_pciexbar(s, PID, 0xE0000000, length_bits=1)          # 128 MiB at 0xe0000000
    out = feed(new, s.events[split:])
    ecam = [o for o in out if isinstance(o, WatchEcam)]
    assert ecam == [WatchEcam(PID, ECAM_BASE, 256 << 20, add=False),
                    WatchEcam(PID, 0xE0000000, 128 << 20)]


def test_the_guest_rewriting_the_same_ecam_window_asks_nothing_new(world):
    new, _ = world.restored()
    s = world.s
    split = len(s.events)
    q35_pciexbar(s, PID, ECAM_BASE)
    out = feed(new, s.events[split:])
    assert not [o for o in out if isinstance(o, WatchEcam)]


def test_a_queue_vector_written_after_the_restore_goes_to_the_queue_selected_before(world):
    """virtio 1.x 4.1.4.3: queue_msix_vector is the selected queue's (queue_select, written
    before the restart)."""
    new, _ = world.restored()
    s, fn = world.s, world.pci.fn
    split = len(s.events)
    s.emit(E.RegisterAccess(s.step(), PID, PID + 1, E.Space.MMIO, E.Op.WRITE, fn.common + 0x1A,
                            2, 5))
    feed(new, s.events[split:])
    assert function_state(jsonable(dump(new)))["queue_vectors"] == {"0": 5}


# -- R4: episodes ----------------------------------------------------------------------------

def test_a_resumed_episode_is_open_with_its_identity_and_last_status(world):
    new, _ = world.restored()
    views = {v.device: v for v in new.snapshot(world.now).devices if v.vm.pid == PID}
    view = views[world.mmio.id]
    ep = view.open_episode
    assert ep.outcome == Outcome.OPEN and ep.resumed
    assert (ep.vm.name, ep.device, ep.type, ep.transport) == (
        "web", world.mmio.id, "rng", Transport.MMIO)
    assert ep.start_ns == world.truth.start_ns and ep.reinit_values == [1, 3]
    assert view.status == 3               # the status last written, not "not seen"


def test_the_reinit_after_the_restart_completes_the_resumed_episode(world):
    new, _ = world.restored()
    s, dev = world.s, world.mmio
    split = len(s.events)
    dev.write(11)
    ok = dev.write(15)
    out = feed(new, s.events[split:])
    (ended,) = [o.episode for o in out if isinstance(o, EpisodeEnded)]
    assert ended.outcome == Outcome.RECOVERED and ended.driver_ok_ns == ok
    assert ended.reinit_values == [1, 3, 11, 15]
    assert (ended.device, ended.type, ended.transport, ended.vm.name) == (
        dev.id, "rng", Transport.MMIO, "web")
    assert not [o for o in out if isinstance(o, Violation)]


def test_a_bit_cleared_after_the_restart_without_a_reset_is_a_violation(world):
    """virtio 1.x 2.1.1: the driver MUST NOT clear a device status bit (only a reset does).
    DRIVER (2) was set before the restart; writing 1 after it clears it."""
    new, _ = world.restored()
    s, dev = world.s, world.mmio
    split = len(s.events)
    dev.write(1)
    out = feed(new, s.events[split:])
    assert [o.rule for o in out if isinstance(o, Violation)] == [Rule.BIT_CLEARED_WITHOUT_RESET]


def test_a_resumed_episode_not_yet_stuck_becomes_stuck_once_old_enough():
    s = Script()
    dev = s.vm(PID, "web").device(Transport.MMIO, base=MMIO_BASE)
    dev.init()
    truth = dev.needs_reset()
    cfg = CorrelatorConfig(stuck_after_ns=5 * MS)
    old = Correlator(cfg)
    feed(old, s.events)
    new = Correlator(cfg)
    restore(new, jsonable(dump(old)), lambda identity: True, truth.start_ns + MS)
    assert not [o for o in new.tick(truth.start_ns + 4 * MS) if isinstance(o, EpisodeStuck)]
    (stuck,) = [o.episode for o in new.tick(truth.start_ns + 6 * MS)
                if isinstance(o, EpisodeStuck)]
    assert stuck.start_ns == truth.start_ns and stuck.device == dev.id and stuck.resumed


def two_episodes_then_gone():
    s = Script()
    vm = s.vm(PID, "web")
    a = vm.device(Transport.MMIO, base=MMIO_BASE)
    b = vm.device(Transport.MMIO, base=MMIO_BASE + 0x200)
    a.init()
    b.init()
    ta, tb = a.needs_reset(), b.needs_reset()
    old = Correlator()
    feed(old, s.events)
    return s, old, (a, ta), (b, tb)


def test_episodes_of_a_vm_gone_meanwhile_end_abandoned_named_and_counted():
    s, old, (a, ta), (b, tb) = two_episodes_then_gone()
    state = jsonable(dump(old))
    identity = old.identities()[0]
    new = Correlator()
    now = s.t + MS
    out = restore(new, state, lambda i: False, now)
    ended = sorted((o.episode for o in out if isinstance(o, EpisodeEnded)),
                   key=lambda e: e.device)
    assert [(e.device, e.start_ns) for e in ended] == sorted(
        [(a.id, ta.start_ns), (b.id, tb.start_ns)])
    for e in ended:
        assert e.vm == identity
        assert (e.type, e.transport, e.outcome, e.end_ns) == (
            "unknown", Transport.MMIO, Outcome.ABANDONED, now)
    snap = new.snapshot(now)
    assert snap.episodes_started == {Evidence.STATUS_READ: 2}
    assert snap.episodes_ended == {Outcome.ABANDONED: 2}


def test_a_vm_gone_meanwhile_does_not_stop_the_restore_of_the_next():
    s, old, _, _ = two_episodes_then_gone()
    other = Script(t0=s.t)
    dev = other.vm(8, "db").device(Transport.MMIO, base=0xFEB04000)
    dev.init()
    feed(old, other.events)
    state = jsonable(dump(old))
    assert [v["identity"]["pid"] for v in state["vms"]] == [PID, 8]
    new = Correlator()
    restore(new, state, lambda i: i.pid != PID, other.t)
    assert [(v.vm.name, v.device) for v in new.snapshot(other.t).devices] == [("db", dev.id)]


# -- R5: bounds ------------------------------------------------------------------------------

def idle_vms(pids, t0=1_000_000_000):
    s = Script(t0=t0)
    devs = {}
    for pid in pids:
        devs[pid] = s.vm(pid, f"vm{pid}").device(Transport.MMIO, base=0xFEB00000)
        devs[pid].init()
    old = Correlator()
    feed(old, s.events)
    return s, devs, jsonable(dump(old))


def test_restored_vms_are_evicted_least_recently_used_first():
    s, devs, state = idle_vms([7, 8])
    new = Correlator(CorrelatorConfig(max_vms=2))
    restore(new, state, lambda i: True, s.t)
    split = len(s.events)
    devs[8].read()                             # VM 8 is heard from after the restore
    s.vm(9, "vm9")                             # a third VM
    feed(new, s.events[split:])
    snap = new.snapshot(s.t)
    assert sorted(i.pid for i in new.identities()) == [8, 9]
    assert snap.evictions["vm"] == 1


def test_restored_devices_are_evicted_least_recently_used_first():
    s = Script()
    vm = s.vm(PID, "web")
    a = vm.device(Transport.MMIO, base=0xFEB00000)
    b = vm.device(Transport.MMIO, base=0xFEB00200)
    a.init()
    b.init()
    old = Correlator()
    feed(old, s.events)
    new = Correlator(CorrelatorConfig(max_devices=2))
    restore(new, jsonable(dump(old)), lambda i: True, s.t)
    split = len(s.events)
    b.read()
    c = vm.device(Transport.MMIO, base=0xFEB00400)
    c.init()
    feed(new, s.events[split:])
    snap = new.snapshot(s.t)
    assert sorted(v.device for v in snap.devices) == sorted([b.id, c.id])
    assert snap.evictions["device"] == 1


def test_the_new_device_bound_applies_at_the_restore(world):
    """Four devices in VM 7, one in VM 9; the new run allows 3: two are evicted at the restore,
    and capture is told to forget their registers."""
    new, out = world.restored(cfg=CorrelatorConfig(max_devices=3))
    snap = new.snapshot(world.now)
    assert len(snap.devices) == 3 and snap.evictions["device"] == 2
    assert [o for o in out if isinstance(o, WatchRegister) and not o.add]


# -- R7: counters ----------------------------------------------------------------------------

def test_stats_count_the_vms_and_devices_restored(world):
    new, _ = world.restored()
    stats = new.stats()
    assert (stats["restored_vms"], stats["restored_devices"]) == (2, 5)


def test_restore_counters_accumulate_over_restores_of_one_correlator():
    """A correlator whose VMs all exited has no VM: it can take a state again; its counters
    only grow."""
    s, devs, state = idle_vms([7])
    new = Correlator(CorrelatorConfig(retain_exited_ns=0))
    restore(new, state, lambda i: True, s.t)
    new.feed(E.ProcessExit(s.t + 1, 7))
    new.flush()
    assert new.identities() == []
    s2, _, state2 = idle_vms([8], t0=s.t + 2)
    restore(new, state2, lambda i: True, s2.t)
    stats = new.stats()
    assert (stats["restored_vms"], stats["restored_devices"]) == (2, 2)


# -- R6: untrusted input -----------------------------------------------------------------------

def test_a_correlator_that_has_seen_a_vm_is_refused(world):
    with pytest.raises(StateError, match=r"(?<!\w)no VM yet(?!\w)"):
        restore(world.old, copy.deepcopy(world.state), lambda i: True, world.now)


def test_another_version_is_refused_saying_which():
    with pytest.raises(StateError, match=rf"(?<!\w)version 99 is not {VERSION}(?!\w)"):
        restore(Correlator(), {"version": 99, "vms": []}, lambda i: True, 0)
    with pytest.raises(StateError, match=r"(?<!\w)version None"):
        restore(Correlator(), {"vms": []}, lambda i: True, 0)


@pytest.mark.parametrize("state", [[], "state", None, 2])
def test_a_state_that_is_not_a_mapping_is_refused(state):
    with pytest.raises(StateError, match="version"):
        restore(Correlator(), state, lambda i: True, 0)


def test_a_pid_twice_is_refused_naming_it(world):
    state = copy.deepcopy(world.state)
    state["vms"].append(copy.deepcopy(vm_state(state)))
    refused(world, state, field_named("pid", " 7 twice"))


def test_a_device_twice_is_refused_naming_its_vm(world):
    state = copy.deepcopy(world.state)
    devices = vm_state(state, 9)["devices"]
    devices.append(copy.deepcopy(devices[0]))
    refused(world, state, r"device of pid 9 twice")


def test_a_device_with_another_devices_register_block_is_refused(world):
    state = copy.deepcopy(world.state)
    device_state(state, world.mmio.id)["layout"][2] += 0x200
    refused(world, state, rf"device {re.escape(world.mmio.id)} has the layout of "
                          rf"mmio-0x{MMIO_BASE + 0x200:x}")


@pytest.mark.parametrize("where, key, value, found", [
    ("identity", "pid", "7", "str"),
    ("identity", "start_time", True, "bool"),
    ("identity", "name", 5, "int"),
    ("device", "last_episode_end_ns", None, "NoneType"),
    ("device", "config_vector", 1.5, "float"),
    ("device", "status", "3", "str"),
    ("device", "failed", 0, "int"),
    ("episode", "start_ns", True, "bool"),
    ("episode", "stuck", 1, "int"),
    ("episode", "evidence", 3, "int"),
])
def test_a_field_of_the_wrong_type_is_refused_naming_it_and_what_it_holds(
        world, where, key, value, found):
    state = copy.deepcopy(world.state)
    dev = device_state(state, world.mmio.id)
    target = {"identity": vm_state(state)["identity"], "device": dev,
              "episode": dev["episode"]}[where]
    target[key] = value
    refused(world, state, field_named(key, f" is {found}"))


def test_reinit_values_not_a_list_are_refused_naming_them(world):
    state = copy.deepcopy(world.state)
    device_state(state, world.mmio.id)["episode"]["reinit_values"] = "0103"
    refused(world, state, field_named("reinit_values", " is not a list"))


# the model's bounds: (field, where to put the value, a value within, one out, as reported)
def _fn(state):
    return function_state(state)


def _set_bdf(state, v):
    extra = {"bdf": v, "cfg": "00" * 256, "known": "00" * 256, "bar_masks": {}, "msix": {},
             "msix_config": None, "queue_select": None, "queue_vectors": {}}
    vm_state(state)["pci"]["functions"].append(extra)


def _set_bar_key(state, v):
    _fn(state)["bar_masks"][str(v)] = 0xFFFFFFF0


def _set_bar_mask(state, v):
    _fn(state)["bar_masks"]["24"] = v


def _set_msix_key(state, v):
    _fn(state)["msix"][str(v)] = [None, None, None]


def _set_address(state, v):
    _fn(state)["msix"]["1"][0] = v


def _set_data(state, v):
    _fn(state)["msix"]["1"][1] = v


def _set(key):
    def put(state, v):
        _fn(state)[key] = v
    return put


def _set_queue(state, v):
    _fn(state)["queue_vectors"][str(v)] = 1


def _set_entry(state, v):
    _fn(state)["queue_vectors"]["0"] = v


def _set_ecam_base(state, v):
    vm_state(state)["pci"]["ecam"][0] = v


def _set_ecam_size(state, v):
    vm_state(state)["pci"]["ecam"][1] = v


BOUNDS = [
    ("bdf", _set_bdf, 0xFFFF, 0x10000, "65536"),
    ("bar", _set_bar_key, 0x24, 0x28, "6"),               # BAR 5 is the last
    ("bar", _set_bar_key, 0x10, 0x0C, "-1"),              # below BAR 0
    ("bar mask", _set_bar_mask, 0xFFFFFFFF, 1 << 32, str(1 << 32)),
    ("msix entry", _set_msix_key, MAX_MSIX_ENTRIES - 1, MAX_MSIX_ENTRIES,
     str(MAX_MSIX_ENTRIES)),
    ("address", _set_address, 0xFFFFFFFF, 1 << 32, str(1 << 32)),
    ("data", _set_data, 0xFFFFFFFF, 1 << 32, str(1 << 32)),
    ("msix_config", _set("msix_config"), 0xFFFF, 0x10000, "65536"),
    ("queue_select", _set("queue_select"), 0xFFFF, 0x10000, "65536"),
    ("queue", _set_queue, 0xFFFF, 0x10000, "65536"),
    ("entry", _set_entry, 0xFFFF, 0x10000, "65536"),
    ("ecam base", _set_ecam_base, (1 << 40) - (256 << 20), 1 << 40, str(1 << 40)),
    ("ecam size", _set_ecam_size, (1 << 29) - 1, 1 << 29, str(1 << 29)),
]


@pytest.mark.parametrize("name, put, ok, bad, shown", BOUNDS,
                         ids=[f"{b[0]}-{b[3]:#x}" for b in BOUNDS])
def test_a_model_value_out_of_its_range_is_refused_naming_the_field(
        world, name, put, ok, bad, shown):
    state = copy.deepcopy(world.state)
    put(state, bad)
    refused(world, state, field_named(name, f" {shown} out of range"))


@pytest.mark.parametrize("name, put, ok, bad, shown", BOUNDS,
                         ids=[f"{b[0]}-{b[2]:#x}" for b in BOUNDS])
def test_a_model_value_at_the_edge_of_its_range_is_restored_as_is(
        world, name, put, ok, bad, shown):
    state = copy.deepcopy(world.state)
    put(state, ok)
    new, _ = world.restored(state)
    assert canon(dump(new))["vms"][PID]["pci"] == canon(state)["vms"][PID]["pci"]


@pytest.mark.parametrize("name, put", [
    ("msix_config", _set("msix_config")),
    ("bar mask", _set_bar_mask),
    ("ecam base", _set_ecam_base),
])
@pytest.mark.parametrize("value", [True, 1.0, "1"])
def test_a_model_value_that_is_not_an_integer_is_refused(world, name, put, value):
    state = copy.deepcopy(world.state)
    put(state, value)
    refused(world, state, field_named(name, f" {value!r} out of range"))


def test_at_most_max_functions_functions(world):
    state = copy.deepcopy(world.state)
    functions = vm_state(state)["pci"]["functions"]
    used = {f["bdf"] for f in functions}
    blank = [b for b in range(1 << 16) if b not in used][:MAX_FUNCTIONS - len(functions)]
    for bdf in blank:
        _set_bdf(state, bdf)
    assert len(functions) == MAX_FUNCTIONS
    new, _ = world.restored(state)
    assert len(canon(dump(new))["vms"][PID]["pci"]["functions"]) == MAX_FUNCTIONS
    _set_bdf(state, 0xFFFF)
    refused(world, state, r"(?<!\w)too many PCI functions(?!\w)")


@pytest.mark.parametrize("functions", [{}, "", None, 0])
def test_functions_that_are_not_a_list_are_refused(world, functions):
    state = copy.deepcopy(world.state)
    vm_state(state)["pci"]["functions"] = functions
    with pytest.raises(StateError):
        world.restored(state)


@pytest.mark.parametrize("key", ["cfg", "known"])
@pytest.mark.parametrize("size", [255, 257])
def test_a_configuration_space_of_the_wrong_size_is_refused(world, key, size):
    state = copy.deepcopy(world.state)
    fn = function_state(state)
    fn[key] = (fn[key] * 2)[:2 * size]
    refused(world, state, r"(?<!\w)configuration space of the wrong size(?!\w)")


@pytest.mark.parametrize("key, make", [
    ("msix", lambda n: {str(i): [0xFEE00000, 0x40 + i, True] for i in range(n)}),
    ("queue_vectors", lambda n: {str(i): 1 for i in range(n)}),
])
def test_at_most_max_entries_per_function(world, key, make):
    assert MAX_MSIX_ENTRIES == MAX_QUEUES
    state = copy.deepcopy(world.state)
    function_state(state)[key] = make(MAX_QUEUES)
    new, _ = world.restored(state)
    assert function_state(jsonable(dump(new)))[key] == make(MAX_QUEUES)
    function_state(state)[key] = make(MAX_QUEUES + 1)
    refused(world, state, r"(?<!\w)too many MSI-X entries or queues(?!\w)")


def test_under_the_same_named_hint_a_restored_device_keeps_its_config_interrupts():
    """docs/correlation.md: a hint naming a VM is a device from the start; the restore brings
    back that same device (one device, counted once), and a config interrupt on its vector after
    the restart is its config interrupt: the episode it announces starts there."""
    s = Script()
    dev = s.vm(PID, "web").device(Transport.MMIO, base=MMIO_BASE, vector=0x41)
    dev.init()
    cfg = CorrelatorConfig(hints=(dev.hint(named=True),))
    old = Correlator(cfg)
    feed(old, s.events)
    new = Correlator(cfg)
    restore(new, jsonable(dump(old)), lambda identity: True, s.t)
    split = len(s.events)
    truth = dev.needs_reset()
    out = feed(new, s.events[split:])
    (view,) = new.snapshot(s.t).devices
    assert new.stats()["restored_devices"] == 1
    assert view.config_interrupts_total == 1
    assert view.open_episode.start_ns == truth.start_ns
    assert view.open_episode.evidence == Evidence.CONFIG_INTERRUPT
    assert not [o for o in out if isinstance(o, Violation)]
