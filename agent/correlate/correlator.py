"""The Correlator: agent.events in, agent.model outputs and snapshots out. Pure: no I/O, no clock.

See docs/correlation.md for discovery, the state machine, episodes, the reordering window and
how lost events degrade the results.
"""
from __future__ import annotations

import heapq
import itertools
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field
from typing import Optional

from agent.events import (
    ApicAccepted, Event, IrqLine, MsiInjected, Op, ProcessExit,
    QueueNotify, Register, RegisterAccess, Space, VhostStatus, VmStarted, pcicfg_split,
)
from agent.model import (
    DeviceView, EpisodeEnded, EpisodeStuck, Evidence, NeedsResetSuspected, Output, Rule,
    Snapshot, Transport, Violation, VmIdentity, WatchDeviceBars, WatchEcam, WatchInterrupt,
    WatchRegister,
)
from agent.correlate.config import CorrelatorConfig, DeviceHint
from agent.correlate.device import DeviceState, copy_episode
from agent.correlate.reorder import ReorderBuffer
from agent.correlate.layout import (
    MMIO_ALIGN, MMIO_DEVICE_ID_OFFSET, MMIO_QUEUE_NOTIFY_OFFSET, MMIO_MAGIC_OFFSET, VIRTIO_MMIO_MAGIC, Layout, layout_for,
    looks_initialised, type_from_virtio_id,
)
from agent.correlate.pcimodel import PciModel
from agent.correlate.pciwatch import Plan, layout_of, needs_watch, watch_plan

ISR_CONFIG = 0x2        # ISR status / InterruptStatus bit: configuration change
ISR_QUEUE = 0x1         # ISR status / InterruptStatus bit: used buffer (progress)
# QEMU's modern virtio-pci BAR layout: common cfg at +0, ISR +0x1000, device cfg +0x2000,
# notify +0x3000 (0x1000 long; queue n at +4n, or +0x1000*n with page-per-vq). Kicks are matched
# to the device whose common cfg lies at notify - [0x3000, 0x4000).
QEMU_NOTIFY_OFFSET = 0x3000
QEMU_NOTIFY_SIZE = 0x1000
MAX_NOTIFY_PER_VM = 256
RESET_SEQUENCE = (0, 1, 3)  # writes that confirm a status register


@dataclass(slots=True)
class Candidate:
    """An address discovery has not decided about yet."""

    size: int
    writes: deque = field(default_factory=lambda: deque(maxlen=len(RESET_SEQUENCE)))
    last_read: Optional[int] = None


@dataclass(slots=True)
class VmState:
    identity: VmIdentity
    fallback: bool                    # identity made up from the pid (no VmStarted seen)
    last_ts: int
    devices: dict[str, DeviceState] = field(default_factory=dict)
    regs: dict[tuple[str, int], tuple[DeviceState, int]] = field(default_factory=dict)
    candidates: OrderedDict = field(default_factory=OrderedDict)  # (space, addr) -> Candidate
    recent_irq: deque = field(default_factory=deque)    # (ts, gsi) rising edges
    vectors: dict[int, DeviceState] = field(default_factory=dict)   # config vector -> device
    last_progress_ns: int = -1        # last queue completion evidence (MSI off config vectors)
    notify: dict[int, Optional[DeviceState]] = field(default_factory=dict)  # kick addr -> device
    pci_devices: dict[int, DeviceState] = field(default_factory=dict)      # bdf -> device

    @property
    def busy(self) -> bool:
        return any(d.open_episode is not None for d in self.devices.values())


@dataclass(slots=True)
class PciVm:
    """A VM's device model and what it asked capture to watch. Fed when events arrive, not
    when they are released from the reordering window: a device's registers, MSI-X table and
    interrupts are watched as soon as the guest programmed them, before its driver starts."""

    model: PciModel
    plans: dict[int, Plan] = field(default_factory=dict)       # bdf -> watched registers
    regs: dict[tuple[str, int], tuple[int, int]] = field(default_factory=dict)  # -> (bdf, reg)
    irqs: set = field(default_factory=set)      # ("vector", n) / ("gsi", n) watched
    dormant: set = field(default_factory=set)   # bdfs whose device was evicted: plan unwatched
    bars: Optional[tuple[int, int]] = None      # (base, size) of the WatchDeviceBars span


# registers of a modelled function that change its interrupt programming
_MSIX_REGS = (Register.MSIX_TABLE, Register.MSIX_CONFIG, Register.QUEUE_SELECT,
              Register.QUEUE_MSIX_VECTOR)


def fallback_identity(pid: int) -> VmIdentity:
    return VmIdentity(pid=pid, start_time=0, name=f"pid-{pid}", vmm="unknown")


class Correlator:
    """Feed events (any order within the reorder window); get outputs; take snapshots."""

    def __init__(self, config: CorrelatorConfig | None = None) -> None:
        self.config = config or CorrelatorConfig()
        self._buffer = ReorderBuffer(self.config.reorder_window_ns)
        self._vms: dict[int, VmState] = {}
        self._devices = 0
        self._violations: Counter = Counter()     # (VmIdentity, rule) -> count
        self._ended: Counter = Counter()          # outcome -> count
        self._evictions: Counter = Counter({"vm": 0, "device": 0})
        self._stats: Counter = Counter()
        self._exited: OrderedDict[int, int] = OrderedDict()  # pid -> exit ts (bounded)
        # (due, seq, vm, dev[, episode]): bounded by the open episodes / pending windows, as
        # stale entries are dropped when due (a stuck check is due at most stuck_after later)
        self._stuck_due: list = []
        self._notify_due: list = []
        self._seq = itertools.count()
        self._suspects: dict[int, tuple[VmState, DeviceState]] = {}   # id(dev) -> pending
        self._started: Counter = Counter()        # evidence -> episodes started
        self._suspicions = 0
        # exited VMs kept for retain_exited_ns: identity.key -> (until_ns, identity, devices)
        self._retired: OrderedDict = OrderedDict()
        self._retired_devices = 0
        # identities of evicted VMs (bounded, LRU): their next event brings them back by name
        self._evicted: OrderedDict[int, VmIdentity] = OrderedDict()
        # device models, per VMM pid (bounded like VMs; dropped when the VMM exits)
        self._pci: OrderedDict[int, PciVm] = OrderedDict()
        # bumped whenever what agent.correlate.checkpoint saves may have changed
        self.changes = 0

    # -- public API ------------------------------------------------------------------------

    def feed(self, event: Event) -> list[Output]:
        self._stats[f"events_{event.kind}"] += 1
        exited = self._exited.get(event.pid)
        if exited is not None and event.ts_ns <= exited and not isinstance(event, VmStarted):
            # later than the reorder window and older than its VMM's exit: must not resurrect it
            self._stats["events_after_exit"] += 1
            return []
        early: list[Output] = []
        if isinstance(event, RegisterAccess):
            early = self._model_feed(event)
        self._buffer.push(event)
        out = self._drain(self._buffer.horizon())
        return early + out if early else out

    def tick(self, now_ns: int) -> list[Output]:
        """Advance time: process events older than the reorder window, stuck and notify checks."""
        return self._drain(now_ns - self.config.reorder_window_ns, stuck_now=now_ns)

    def flush(self) -> list[Output]:
        """Process every buffered event now (end of a recording)."""
        return self._drain(None)

    def annotate_device(self, pid: int, space: str, addr: int, type: str, bdf: str = "") -> bool:
        """Set the type (and, given its PCI address "0000:bb:dd.f", the name) of the device one
        of whose registers is (space, addr) in VM `pid`, e.g. from QEMU's query-pci
        (agent.vmm.probe.device_at): a device found from its traffic, whose enumeration the
        agent did not see. False if no such device."""
        vm = self._vms.get(pid)
        known = vm.regs.get((space, addr)) if vm is not None else None
        if known is None:
            return False
        dev = known[0]
        dev.type = type
        name = f"pci-{bdf}"
        if bdf and dev.pci_bdf is None and dev.id != name and name not in vm.devices:
            self._rename_device(vm, dev, name)
        self.changes += 1
        return True

    def vmm_status(self, pid: int, device: str, ts_ns: int, needs_reset: bool,
                   type: Optional[str] = None) -> list[Output]:
        """What the VMM says about a device (QEMU x-query-virtio-status), asked after a
        NeedsResetSuspected. NEEDS_RESET confirmed: an episode opens (evidence `vmm`) at the
        config interrupt the suspicion started from. Not set: the suspicion is dropped."""
        vm = self._vms.get(pid)
        dev = vm.devices.get(device) if vm is not None else None
        if dev is None:
            return []
        out: list[Output] = []
        self.changes += 1
        if type and type != "unknown":
            dev.type = type
        if needs_reset and dev.open_episode is None:
            start = dev.suspect_irq_ns if dev.suspect_irq_ns is not None else ts_ns
            dev.start_episode(vm.identity, start, Evidence.VMM, guest_saw_ns=None)
            self._arm(vm, dev)
            self._timers(ts_ns, self._buffer.released_ns or ts_ns, out)
        elif not needs_reset:
            self._stats["suspicions_cleared_by_vmm"] += 1
            dev.clear_suspicion()
        self._suspects.pop(id(dev), None)
        self._count_outputs(out)
        return out

    def stats(self) -> dict[str, int]:
        """Internal counters: events per kind, late (reordered beyond the window), candidates
        evicted, accesses not attributable, inferred resets, devices discovered."""
        s = dict(self._stats)
        s["late_events"] = self._buffer.late
        s["buffered_events"] = len(self._buffer)
        s["pending_suspicions"] = len(self._suspects)
        s["retired_vms"] = len(self._retired)
        return s

    def snapshot(self, now_ns: int) -> Snapshot:
        views = []
        live = [(vm.identity, dev, False) for vm in self._vms.values()
                for dev in vm.devices.values()]
        gone = [(identity, dev, True) for until, identity, devs in self._retired.values()
                if until > now_ns for dev in devs]
        for identity, dev, exited in live + gone:
            ep = None
            if dev.open_episode is not None:
                ep = copy_episode(dev.open_episode)
                ep.stuck = ep.stuck or now_ns - ep.start_ns >= self.config.stuck_after_ns
            views.append(DeviceView(
                vm=identity, device=dev.id, type=dev.type, transport=dev.transport,
                status=dev.status or 0, needs_reset_total=dev.needs_reset_total,
                recoveries_total=dev.recoveries_total, resets_total=dev.resets_total,
                failed_total=dev.failed_total,
                config_interrupts_total=dev.config_interrupts_total, open_episode=ep,
                suspected_since_ns=dev.suspect_irq_ns if dev.suspected else None,
                exited=exited))
        return Snapshot(now_ns=now_ns, devices=views, violations=dict(self._violations),
                        episodes_ended=dict(self._ended), vms=len(self._vms),
                        evictions=dict(self._evictions), episodes_started=dict(self._started),
                        suspicions=self._suspicions)

    # -- device model (fed on arrival) ------------------------------------------------------

    def pci_model(self, pid: int) -> Optional[PciModel]:
        pv = self._pci.get(pid)
        return pv.model if pv is not None else None

    def _model_feed(self, ev: RegisterAccess) -> list[Output]:
        """Configuration-space and interrupt-programming accesses update the VM's model now;
        what it implies to watch is asked of capture at once."""
        if ev.space == Space.PCICFG:
            pv = self._pci.get(ev.pid)
            if pv is None:
                pv = self._pci[ev.pid] = PciVm(PciModel())
                while len(self._pci) > 2 * self.config.max_vms:
                    self._pci.popitem(last=False)
            self._pci.move_to_end(ev.pid)
            self.changes += 1       # any access may teach the model a byte the state file saves
            out: list[Output] = []
            ecam = pv.model.ecam
            bdf = pv.model.config_access(ev.addr, ev.op == Op.WRITE, ev.size, ev.value)
            if pv.model.ecam != ecam:
                if ecam is not None:
                    out.append(WatchEcam(ev.pid, ecam[0], ecam[1], add=False))
                if pv.model.ecam is not None:
                    out.append(WatchEcam(ev.pid, pv.model.ecam[0], pv.model.ecam[1]))
            if bdf is not None:
                self._replan(ev.pid, pv, bdf, out)
                self._watch_bars(ev.pid, pv, out)
            return out
        pv = self._pci.get(ev.pid)
        known = pv.regs.get((ev.space, ev.addr)) if pv is not None else None
        if known is None or known[1] not in _MSIX_REGS:
            return []
        bdf, reg = known
        fn = pv.model.function(bdf)
        if fn is None:
            return []
        if reg == Register.MSIX_TABLE:
            table = fn.msix_table()
            if table is not None and table.contains(ev.space, ev.addr):
                fn.msix_access(ev.addr - table.addr, ev.value, ev.size)
        elif reg == Register.MSIX_CONFIG:
            fn.msix_config = ev.value & 0xFFFF
        elif reg == Register.QUEUE_SELECT:
            fn.queue_select = ev.value & 0xFFFF
        else:
            fn.set_queue_vector(ev.value & 0xFFFF)
        self.changes += 1
        out = []
        self._watch_irqs(ev.pid, pv, out)
        return out

    def _wake(self, pid: int, pv: PciVm, bdf: int, out: list[Output]) -> None:
        """The function of an evicted device is in use again: watch its plan again."""
        pv.dormant.discard(bdf)
        for (space, addr), reg in pv.plans.get(bdf, {}).items():
            if needs_watch(reg):
                out.append(WatchRegister(pid, space, addr, reg))
        self._watch_irqs(pid, pv, out)

    def _replan(self, pid: int, pv: PciVm, bdf: int, out: list[Output]) -> None:
        if bdf in pv.dormant:
            self._wake(pid, pv, bdf, out)
        v = pv.model.virtio(bdf)
        plan = watch_plan(v) if v is not None and layout_of(v) is not None else {}
        old = pv.plans.get(bdf, {})
        if plan != old:
            for key, reg in old.items():
                if plan.get(key) != reg:
                    pv.regs.pop(key, None)
                    if key not in plan and needs_watch(reg):
                        out.append(WatchRegister(pid, key[0], key[1], reg, add=False))
            for key, reg in plan.items():
                if old.get(key) != reg:
                    pv.regs[key] = (bdf, reg)
                    if needs_watch(reg):
                        out.append(WatchRegister(pid, key[0], key[1], reg))
            if plan:
                pv.plans[bdf] = plan
            else:
                pv.plans.pop(bdf, None)
        # also when the plan stands: MSI-X enable, function mask, interrupt line
        self._watch_irqs(pid, pv, out)

    def _watch_bars(self, pid: int, pv: PciVm, out: list[Output]) -> None:
        """The span of the VM's virtio memory BARs (sized and assigned), for capture to forward
        the writes a driver makes there before their watches land."""
        lo = hi = None
        for bdf in list(pv.model.functions):
            for base, size in pv.model.memory_bars(bdf):
                # a BAR whose sizing was not seen (the firmware's, before the agent ran, or
                # assigned without sizing): its first page, where the structures usually start
                size = size or 0x1000
                if base + size > 1 << 52:
                    continue
                lo = base if lo is None else min(lo, base)
                hi = base + size if hi is None else max(hi, base + size)
        span = (lo, hi - lo) if lo is not None else None
        if span == pv.bars:
            return
        if span is not None:
            # replaces the VM's span in one map update: no moment without one while the guest
            # is busy programming (a remove first would open a gap)
            out.append(WatchDeviceBars(pid, span[0], span[1]))
        else:
            out.append(WatchDeviceBars(pid, pv.bars[0], pv.bars[1], add=False))
        pv.bars = span

    def _watch_irqs(self, pid: int, pv: PciVm, out: list[Output]) -> None:
        """Watch exactly the config vectors and INTx lines the modelled devices are programmed
        with (queue vectors are not watched: they are progress, seen through discovery)."""
        want = set()
        for bdf in pv.plans:
            fn = pv.model.function(bdf)
            if fn is None or bdf in pv.dormant:
                continue
            vec = fn.vector_of(fn.msix_config)
            if vec is not None:
                want.add(("vector", vec[1]))
            elif fn.msix_enable_set is False and fn.interrupt_line is not None:
                want.add(("gsi", fn.interrupt_line))
        for kind, n in sorted(pv.irqs - want):
            out.append(WatchInterrupt(pid, **{kind: n}, add=False))
        for kind, n in sorted(want - pv.irqs):
            out.append(WatchInterrupt(pid, **{kind: n}))
        pv.irqs = want

    def _pci_sync(self, vm: VmState, bdf: int, ts: int, out: list[Output]) -> None:
        """In event order: the device of a modelled virtio function, with its registers and
        its config interrupt as the model has them now."""
        pv = self._pci.get(vm.identity.pid)
        v = pv.model.virtio(bdf) if pv is not None else None
        layout = layout_of(v) if v is not None else None
        dev = vm.pci_devices.get(bdf)
        if layout is None:
            if dev is not None and pv is not None and bdf not in pv.model.functions:
                self._remove_device(vm, dev, ts, out)     # unplugged: its slot reads empty
            return      # not (or not yet) a virtio function with its registers placed
        plan = pv.plans.get(bdf, {})
        if dev is None:
            if bdf in pv.dormant:
                self._wake(vm.identity.pid, pv, bdf, out)
            owner = vm.regs.get((layout.space, layout.status_addr))
            named = vm.devices.get(v.name)      # (annotate_device names devices too)
            if owner is not None and owner[0].pci_bdf is None and named in (None, owner[0]):
                # found from its traffic before its enumeration was seen: the same device
                dev = owner[0]
                if dev.id != v.name:
                    self._rename_device(vm, dev, v.name)
            else:
                if named is not None:
                    # named after this function, but not at its registers: not this device
                    self._remove_device(vm, named, ts, out)
                dev = DeviceState(id=v.name, type=v.type, transport=self._pci_transport(v, layout),
                                  layout=layout, last_ts=ts)
                self._add_device(vm, dev, out)
            dev.pci_bdf = bdf
            vm.pci_devices[bdf] = dev
            self.changes += 1
        # a device its driver has used (or whose driver picked the other interface of a
        # transitional device, restored from a state file) keeps its register block
        driven = dev.status is not None or dev.transport not in (Transport.UNKNOWN,
                                                                 layout.transport)
        if dev.type != v.type or dev.layout != layout and not driven:
            dev.type = v.type
            if not driven:
                dev.layout = layout
                dev.transport = self._pci_transport(v, layout)
            self.changes += 1
        if dev.watched != plan:
            for key in dev.watched:
                if key not in plan and vm.regs.get(key, (None,))[0] is dev:
                    del vm.regs[key]
            for key, reg in plan.items():
                vm.candidates.pop(key, None)
                vm.regs[key] = (dev, reg)
            dev.watched = dict(plan)
            vm.notify.clear()
            self.changes += 1
        self._sync_config_irq(vm, dev)

    @staticmethod
    def _pci_transport(v, layout: Layout) -> str:
        """A transitional device (legacy I/O BAR too) is driven through whichever interface its
        driver picks: unknown until its first status access says."""
        return Transport.UNKNOWN if v.legacy_io is not None else layout.transport

    def _sync_config_irq(self, vm: VmState, dev: DeviceState) -> None:
        pv = self._pci.get(vm.identity.pid)
        fn = pv.model.function(dev.pci_bdf) if pv is not None else None
        if fn is None:
            return
        vec = fn.vector_of(fn.msix_config)
        if dev.msix_config != fn.msix_config:
            dev.msix_config = fn.msix_config
            self.changes += 1
        vector, dest = (vec[1], vec[0]) if vec is not None else (None, None)
        if vector != dev.config_vector or dest != dev.config_dest:
            if dev.config_vector is not None and vm.vectors.get(dev.config_vector) is dev:
                del vm.vectors[dev.config_vector]
            dev.config_vector, dev.config_dest = vector, dest
            if vector is not None:
                vm.vectors[vector] = dev
            self.changes += 1
        gsi = fn.interrupt_line if vec is None and fn.msix_enable_set is False else None
        if gsi != dev.gsi:
            dev.gsi = gsi
            self.changes += 1
        for d in vm.pci_devices.values():
            d.gsi_shared = d.gsi is not None and any(
                o.gsi == d.gsi for o in vm.devices.values() if o is not d)

    def _rename_device(self, vm: VmState, dev: DeviceState, new_id: str) -> None:
        """A device found from its traffic whose enumeration is seen later (lost or late events,
        or a guest that reads its configuration again) takes the name of its PCI function."""
        self._stats["devices_renamed"] += 1
        del vm.devices[dev.id]
        dev.id = new_id
        vm.devices[new_id] = dev
        if dev.open_episode is not None:
            dev.open_episode.device = new_id

    # -- event loop ------------------------------------------------------------------------

    def _drain(self, upto: int | None, stuck_now: int | None = None) -> list[Output]:
        out: list[Output] = []
        counted = 0
        # outputs are counted step by step: a violation belongs to its VM's counts before a
        # later event of the same drain renames, retires or drops that VM
        for event in self._buffer.release(upto):
            self._timers(event.ts_ns, event.ts_ns, out)
            counted = self._count_outputs(out, counted)
            self._apply(event, out)
            counted = self._count_outputs(out, counted)
        if upto is None:
            upto = self._buffer.released_ns
        if upto is not None:
            self._timers(stuck_now if stuck_now is not None else upto, upto, out)
            self._count_outputs(out, counted)
            self._expire_retired(stuck_now if stuck_now is not None else upto)
        return out

    def identities(self) -> list[VmIdentity]:
        """The VMs tracked now (exited ones kept for scrapes are not)."""
        return [vm.identity for vm in self._vms.values()]

    def _count_outputs(self, out: list[Output], start: int = 0) -> int:
        """Count out[start:] (violations per VM, episodes ended, suspicions); len(out)."""
        if len(out) > start:
            self.changes += 1
        for i in range(start, len(out)):      # (islice would walk out[:start] again)
            o = out[i]
            if isinstance(o, Violation):
                self._violations[(o.vm, o.rule)] += 1
            elif isinstance(o, EpisodeEnded):
                self._ended[o.episode.outcome] += 1
            elif isinstance(o, NeedsResetSuspected):
                self._suspicions += 1
        return len(out)

    def _timers(self, now: int, horizon: int, out: list[Output]) -> None:
        """Stuck episodes (at `now`) and expired notify windows (events up to `horizon` seen).
        Both are heaps of due times, checked lazily: entries whose episode or window is gone
        are dropped when they come up."""
        notify = self._notify_due
        while notify and notify[0][0] < horizon:
            due, _, vm, dev = heapq.heappop(notify)
            if dev.notify_deadline_ns == due and vm.devices.get(dev.id) is dev:
                dev.notify_deadline_ns = None
                out.append(Violation(dev.notify_episode_start_ns, vm.identity, dev.id,
                                     Rule.NEEDS_RESET_WITHOUT_NOTIFY,
                                     "no config interrupt within the notify window"))
        if self._suspects:
            for vm, dev in list(self._suspects.values()):
                self._suspicion(vm, dev, horizon, out)
        stuck = self._stuck_due
        while stuck and stuck[0][0] <= now:
            _, _, vm, dev, ep = heapq.heappop(stuck)
            if dev.open_episode is ep and not ep.stuck and vm.devices.get(dev.id) is dev:
                ep.stuck = True
                out.append(EpisodeStuck(copy_episode(ep)))

    def _arm(self, vm: VmState, dev: DeviceState) -> None:
        """Schedule the stuck check of the episode just opened and its notify window, if any."""
        self.changes += 1
        ep = dev.open_episode
        if ep is not None:
            self._started[ep.evidence] += 1
            heapq.heappush(self._stuck_due, (ep.start_ns + self.config.stuck_after_ns,
                                             next(self._seq), vm, dev, ep))
        if dev.notify_deadline_ns is not None:
            heapq.heappush(self._notify_due, (dev.notify_deadline_ns, next(self._seq), vm, dev))
        limit = 2 * self.config.max_devices + 64
        if len(self._stuck_due) > limit:   # many short episodes: drop the settled entries
            self._stuck_due = [e for e in self._stuck_due
                               if e[3].open_episode is e[4] and not e[4].stuck]
            heapq.heapify(self._stuck_due)
        if len(self._notify_due) > limit:
            self._notify_due = [e for e in self._notify_due if e[3].notify_deadline_ns == e[0]]
            heapq.heapify(self._notify_due)

    def _apply(self, ev: Event, out: list[Output]) -> None:
        if isinstance(ev, VmStarted):
            self._vm_started(ev, out)
            return
        if isinstance(ev, ProcessExit):
            vm = self._vms.get(ev.pid)
            if vm is not None:
                self._remove_vm(vm, ev.ts_ns, out, retain=True)
            self._evicted.pop(ev.pid, None)
            self._pci.pop(ev.pid, None)
            self._exited[ev.pid] = ev.ts_ns
            self._exited.move_to_end(ev.pid)
            if len(self._exited) > 4 * self.config.max_vms:
                self._exited.popitem(last=False)
            return
        vm = self._vm(ev.pid, ev.ts_ns, out)
        vm.last_ts = ev.ts_ns
        if isinstance(ev, RegisterAccess):
            if ev.space == Space.PCICFG:
                self._pci_sync(vm, pcicfg_split(ev.addr)[0], ev.ts_ns, out)
            else:
                self._access(vm, ev, out)
        elif isinstance(ev, ApicAccepted):
            self._apic(vm, ev, out)
        elif isinstance(ev, IrqLine):
            if ev.level:
                self._remember(vm.recent_irq, (ev.ts_ns, ev.gsi))
        elif isinstance(ev, VhostStatus):
            self._vhost(vm, ev, out)
        elif isinstance(ev, MsiInjected):
            # not delivery evidence (ApicAccepted is): queue-completion (progress) evidence
            # only, never from split-irqchip's spurious MSIs (address 0, data 0)
            if (ev.address or ev.data) and ev.data & 0xFF not in vm.vectors:
                vm.last_progress_ns = max(vm.last_progress_ns, ev.ts_ns)
        elif isinstance(ev, QueueNotify):
            self._kick(vm, ev.addr, ev.ts_ns, out)
        else:  # pragma: no cover - Event is a closed union
            raise TypeError(f"not an event: {ev!r}")

    # -- VMs -------------------------------------------------------------------------------

    def _vm(self, pid: int, ts: int, out: list[Output]) -> VmState:
        vm = self._vms.get(pid)
        if vm is None:
            known = self._evicted.pop(pid, None)
            if known is not None:
                vm = self._new_vm(known, False, ts, out)
            else:
                vm = self._new_vm(fallback_identity(pid), True, ts, out)
        return vm

    def _new_vm(self, identity: VmIdentity, fallback: bool, ts: int, out: list[Output]) -> VmState:
        if len(self._vms) >= self.config.max_vms:
            victim = min(self._vms.values(), key=lambda v: (v.busy, v.last_ts))
            self._evictions["vm"] += 1
            self._remove_vm(victim, ts, out)
            self._evicted[victim.identity.pid] = victim.identity
            self._evicted.move_to_end(victim.identity.pid)
            if len(self._evicted) > 4 * self.config.max_vms:
                self._evicted.popitem(last=False)
        self.changes += 1
        vm = VmState(identity=identity, fallback=fallback, last_ts=ts)
        self._vms[identity.pid] = vm
        self._apply_named_hints(vm, ts, out)
        return vm

    def _apply_named_hints(self, vm: VmState, ts: int, out: list[Output]) -> None:
        """Hints naming this VM (with a transport) are devices from the start."""
        for hint in self.config.hints:
            if hint.vm and hint.vm == vm.identity.name and hint.transport:
                self._confirm(vm, hint.space, hint.addr, None, ts, out, hint=hint)

    def _vm_started(self, ev: VmStarted, out: list[Output]) -> None:
        # (the pid's exit, if any, is kept: late events of the old process stay dropped)
        self._evicted.pop(ev.pid, None)
        identity = VmIdentity(pid=ev.pid, start_time=ev.start_time, name=ev.name,
                              namespace=ev.namespace, uuid=ev.uuid, vmm=ev.vmm)
        vm = self._vms.get(ev.pid)
        if vm is None:
            self._new_vm(identity, False, ev.ts_ns, out)
        elif vm.fallback or vm.identity.start_time == ev.start_time:
            # the identity arrived after the first events of this process: adopt it
            self._rename(vm, identity)
            vm.last_ts = ev.ts_ns
            self._apply_named_hints(vm, ev.ts_ns, out)
        else:
            # pid reuse: a different process now has this pid; the old VM is gone
            self._remove_vm(vm, ev.ts_ns, out, retain=True)
            self._new_vm(identity, False, ev.ts_ns, out)

    def _rename(self, vm: VmState, identity: VmIdentity) -> None:
        self.changes += 1
        old = vm.identity
        vm.identity = identity
        vm.fallback = False
        for dev in vm.devices.values():
            if dev.open_episode is not None:
                dev.open_episode.vm = identity
        if old == identity:
            return      # the same identity seen again: its counts stay where they are
        for (who, rule) in [k for k in self._violations if k[0] == old]:
            self._violations[(identity, rule)] += self._violations.pop((who, rule))

    def _remove_vm(self, vm: VmState, ts: int, out: list[Output], retain: bool = False) -> None:
        self.changes += 1
        devices = list(vm.devices.values())
        for dev in devices:
            # (not retained: evicted, alive; its model's devices come back with its traffic)
            self._remove_device(vm, dev, ts, out, evicted=not retain)
        del self._vms[vm.identity.pid]
        if retain and self.config.retain_exited_ns > 0 and devices:
            # keep the devices (and violation counts) in snapshots for a while, so increments
            # after the last scrape and short-lived VMs are still scraped
            self._retired[vm.identity.key] = (ts + self.config.retain_exited_ns, vm.identity,
                                              devices)
            self._retired.move_to_end(vm.identity.key)
            self._retired_devices += len(devices)
            while self._retired and (len(self._retired) > self.config.max_vms
                                     or self._retired_devices > self.config.max_devices):
                self._free_retired(next(iter(self._retired)))
        else:
            self._drop_violations(vm.identity)

    def _drop_violations(self, identity: VmIdentity) -> None:
        for key in [k for k in self._violations if k[0] == identity]:
            del self._violations[key]   # bounded: a gone VM's series go away

    def _free_retired(self, key) -> None:
        _, identity, devices = self._retired.pop(key)
        self._retired_devices -= len(devices)
        if identity.pid not in self._vms or self._vms[identity.pid].identity != identity:
            self._drop_violations(identity)

    def _expire_retired(self, now: int) -> None:
        while self._retired:
            key, (until, _, _) = next(iter(self._retired.items()))
            if until > now:
                break
            self._free_retired(key)

    # -- devices ---------------------------------------------------------------------------

    def _remove_device(self, vm: VmState, dev: DeviceState, ts: int, out: list[Output],
                       evicted: bool = False) -> None:
        """Forget a device. An evicted device of the model keeps its function's plan: its
        interrupt programming goes on being followed, and its next access brings it back."""
        out.extend(dev.abandon(ts))
        dev.clear_suspicion()
        self._suspects.pop(id(dev), None)
        for addr in [a for a, d in vm.notify.items() if d is dev]:
            del vm.notify[addr]
        for (space, addr), reg in dev.watched.items():
            if vm.regs.get((space, addr), (None,))[0] is dev:
                del vm.regs[(space, addr)]
            if dev.pci_bdf is None:     # a model device's watches go with its plan (below)
                out.append(WatchRegister(vm.identity.pid, space, addr, reg, add=False))
        if dev.config_vector is not None and vm.vectors.get(dev.config_vector) is dev:
            del vm.vectors[dev.config_vector]
            if dev.pci_bdf is None:
                out.append(WatchInterrupt(vm.identity.pid, vector=dev.config_vector, add=False))
        if dev.gsi is not None and dev.pci_bdf is None and not any(
                d.gsi == dev.gsi for d in vm.devices.values() if d is not dev):
            out.append(WatchInterrupt(vm.identity.pid, gsi=dev.gsi, add=False))
        if dev.pci_bdf is not None and vm.pci_devices.get(dev.pci_bdf) is dev:
            del vm.pci_devices[dev.pci_bdf]
            pv = self._pci.get(vm.identity.pid)
            plan = pv.plans.get(dev.pci_bdf, {}) if pv is not None else {}
            if plan and evicted:
                pv.dormant.add(dev.pci_bdf)     # unwatched, still in the model (_wake)
            elif plan:
                del pv.plans[dev.pci_bdf]
                for key in plan:
                    pv.regs.pop(key, None)
            for (space, addr), reg in plan.items():
                if needs_watch(reg):
                    out.append(WatchRegister(vm.identity.pid, space, addr, reg, add=False))
            if plan:
                self._watch_irqs(vm.identity.pid, pv, out)
        del vm.devices[dev.id]
        self._devices -= 1

    def _add_device(self, vm: VmState, dev: DeviceState, out: list[Output]) -> None:
        if self._devices >= self.config.max_devices:
            owner, victim = min(
                ((v, d) for v in self._vms.values() for d in v.devices.values()),
                key=lambda vd: (vd[1].open_episode is not None, vd[1].last_ts))
            self._evictions["device"] += 1
            self._remove_device(owner, victim, dev.last_ts, out, evicted=True)
        vm.devices[dev.id] = dev
        self._devices += 1
        self._stats["devices_discovered"] += 1

    def _confirm(self, vm: VmState, space: str, addr: int, size: int | None, ts: int,
                 out: list[Output], hint: DeviceHint | None = None) -> Optional[DeviceState]:
        """Make a device of the status register at (space, addr) and ask capture to watch it."""
        layout = layout_for(space, addr, size or 0, hint.transport if hint else "")
        if layout is None:
            return None
        existing = vm.devices.get(layout.device_id)
        if existing is not None:
            return existing
        dev_type = hint.type if hint else "unknown"
        if layout.transport == Transport.MMIO and dev_type == "unknown":
            cand = vm.candidates.get((space, layout.base + MMIO_DEVICE_ID_OFFSET))
            if cand is not None and cand.last_read:
                dev_type = type_from_virtio_id(cand.last_read)
        dev = DeviceState(id=layout.device_id, type=dev_type, transport=layout.transport,
                          layout=layout, last_ts=ts)
        self._add_device(vm, dev, out)
        self._watch(vm, dev, out)
        if hint is not None:
            if hint.config_vector is not None:
                self._learn_vector(vm, dev, hint.config_vector, out)
            if hint.gsi is not None:
                self._learn_gsi(vm, dev, hint.gsi, out)
        return dev

    def _watch(self, vm: VmState, dev: DeviceState, out: list[Output]) -> None:
        """Map the device's registers and ask capture to watch them."""
        space = dev.layout.space
        for reg_addr, reg in dev.layout.registers().items():
            vm.candidates.pop((space, reg_addr), None)
            vm.regs[(space, reg_addr)] = (dev, reg)
            dev.watched[(space, reg_addr)] = reg
            out.append(WatchRegister(vm.identity.pid, space, reg_addr, reg))

    def _learn_vector(self, vm: VmState, dev: DeviceState, vector: int,
                      out: list[Output]) -> None:
        """An operator-told config vector (a hint), or one restored from a state file."""
        dev.config_vector = vector
        vm.vectors[vector] = dev
        out.append(WatchInterrupt(vm.identity.pid, vector=vector))

    def _learn_gsi(self, vm: VmState, dev: DeviceState, gsi: int, out: list[Output]) -> None:
        known = any(d.gsi == gsi for d in vm.devices.values())
        dev.gsi = gsi
        if not known:
            out.append(WatchInterrupt(vm.identity.pid, gsi=gsi))

    def _hint_for(self, vm: VmState, space: str, addr: int) -> DeviceHint | None:
        for hint in self.config.hints:
            if hint.space == space and hint.addr == addr and hint.vm in ("", vm.identity.name):
                return hint
        return None

    # -- register accesses -----------------------------------------------------------------

    def _access(self, vm: VmState, ev: RegisterAccess, out: list[Output]) -> None:
        known = vm.regs.get((ev.space, ev.addr))
        if known is None and vm.pci_devices and ev.op == Op.WRITE and ev.size == 2 \
                and ev.space == Space.MMIO and self._kick_device(vm, ev.addr, count=False):
            self._kick(vm, ev.addr, ev.ts_ns, out)      # a queue past the watched ones
            return
        if known is None:
            pv = self._pci.get(vm.identity.pid)
            bdf = pv.regs.get((ev.space, ev.addr), (None,))[0] if pv is not None else None
            if bdf is not None and bdf not in vm.pci_devices:
                # a register of a modelled function without its device (evicted, or before
                # its enumeration was released): the device, with its PCI identity
                self._pci_sync(vm, bdf, ev.ts_ns, out)
                known = vm.regs.get((ev.space, ev.addr))
        if known is None:
            dev = self._discover(vm, ev, out)
            if dev is None:
                return
            known = vm.regs.get((ev.space, ev.addr))
            if known is None or known[1] != Register.STATUS:
                return   # (an other transport's device already owns this base)
        dev, reg = known
        dev.last_ts = ev.ts_ns
        if reg == Register.STATUS:
            if dev.layout is not None and dev.layout.status_addr != ev.addr:
                # a transitional device driven through its other (legacy / modern) interface
                lay = layout_for(ev.space, ev.addr, ev.size)
                if lay is not None:
                    dev.layout, dev.transport = lay, lay.transport
                    self.changes += 1
            elif dev.transport == Transport.UNKNOWN and dev.layout is not None:
                dev.transport = dev.layout.transport
                self.changes += 1
            self._status(vm, dev, ev, out)
        elif reg == Register.ISR and ev.op == Op.READ:
            # virtio-mmio: the InterruptACK write that follows says the same (it is counted)
            by_read = dev.transport != Transport.MMIO
            if by_read and ev.repeats and dev.last_isr & ISR_CONFIG:
                # capture folded identical reads of a config-change ISR: each was one more
                # config interrupt (their times are unknown)
                dev.config_interrupts_total += ev.repeats
            dev.last_isr = ev.value
            if ev.value & ISR_QUEUE:
                vm.last_progress_ns = max(vm.last_progress_ns, ev.ts_ns)
            if by_read and ev.value & ISR_CONFIG:
                self._isr_config(vm, dev, ev.ts_ns, out)
        elif reg == Register.INTERRUPT_ACK and ev.op == Op.WRITE:
            if ev.repeats and dev.last_ack & ISR_CONFIG:
                # capture folded identical config-change ACKs: each was one more config
                # interrupt (their times are unknown)
                dev.config_interrupts_total += ev.repeats
            dev.last_ack = ev.value
            if ev.value & ISR_QUEUE:
                vm.last_progress_ns = max(vm.last_progress_ns, ev.ts_ns)
            if ev.value & ISR_CONFIG:
                self._isr_config(vm, dev, ev.ts_ns, out)
        elif reg in _MSIX_REGS:
            if dev.pci_bdf is not None:
                self._sync_config_irq(vm, dev)
            elif reg == Register.MSIX_CONFIG and ev.op == Op.WRITE:
                dev.msix_config = ev.value
        elif reg == Register.QUEUE_NOTIFY and ev.op == Op.WRITE:
            self._kick(vm, ev.addr, ev.ts_ns, out)
        # config_generation: watched for completeness, no state

    def _status(self, vm: VmState, dev: DeviceState, ev: RegisterAccess, out: list[Output]) -> None:
        value = ev.value & 0xFF
        if dev.open_episode is not None:
            self.changes += 1       # its marks may move
        if dev.resumed:
            out.extend(dev.after_gap(ev.ts_ns, value, ev.op == Op.WRITE))
        if dev.suspect_irq_ns is not None and ev.ts_ns >= dev.suspect_irq_ns:
            # the guest looks at status: the state machine sees NEEDS_RESET (or not) itself
            dev.clear_suspicion()
            self._suspects.pop(id(dev), None)
        if ev.op == Op.WRITE:
            out.extend(dev.status_write(vm.identity, ev.ts_ns, value,
                                        self.config.max_reinit_values))
            return
        prev_status, inferred = dev.status, dev.inferred_resets_total
        if dev.status_read(ev.ts_ns, value):
            self._start_from_read(vm, dev, ev.ts_ns, prev_status, out)
        self._stats["inferred_resets"] += dev.inferred_resets_total - inferred

    def _start_from_read(self, vm: VmState, dev: DeviceState, ts: int,
                         prev_status: Optional[int], out: list[Output]) -> None:
        """The guest read NEEDS_RESET: the episode starts at the config interrupt that told it,
        if that interrupt was raised on the device's exact vector or line within the window;
        otherwise at this read (the notify phase is then unknown, not zero)."""
        window = self.config.notify_window_ns
        start, evidence = ts, Evidence.STATUS_READ
        irq = dev.recent_config_irq(ts, window)
        if irq is not None:
            start, evidence = irq, Evidence.CONFIG_INTERRUPT
        dev.start_episode(vm.identity, start, evidence, guest_saw_ns=ts)
        if (evidence == Evidence.STATUS_READ and dev.config_irq_known
                and not dev.notified_since(ts, window)):
            dev.notify_deadline_ns = start + window
            dev.notify_episode_start_ns = start
        self._arm(vm, dev)

    def _discover(self, vm: VmState, ev: RegisterAccess,
                  out: list[Output]) -> Optional[DeviceState]:
        """Decide whether an unknown address is a status register; the device if it now is."""
        space, addr = ev.space, ev.addr
        hint = self._hint_for(vm, space, addr)
        if hint is not None or ev.register == Register.STATUS:
            return self._confirm(vm, space, addr, ev.size, ev.ts_ns, out, hint=hint)
        if space == Space.MMIO and ev.size == 4 and ev.op == Op.READ:
            # DeviceID of a virtio-mmio device found already (its window at any alignment)
            dev = vm.devices.get(Layout(Transport.MMIO, space,
                                        addr - MMIO_DEVICE_ID_OFFSET).device_id)
            if dev is not None and dev.transport == Transport.MMIO:
                dev.type = type_from_virtio_id(ev.value)
                self.changes += 1
                return None
            offset = addr % MMIO_ALIGN
            if offset in (MMIO_DEVICE_ID_OFFSET, MMIO_MAGIC_OFFSET):
                if Layout(Transport.MMIO, space, addr - offset).device_id in vm.devices:
                    return None     # (a PCI device's registers: no virtio-mmio window)
                if offset == MMIO_MAGIC_OFFSET and ev.value != VIRTIO_MMIO_MAGIC:
                    return None
                self._candidate(vm, ev).last_read = ev.value
                return None
        layout = layout_for(space, addr, ev.size)
        if layout is None:
            self._stats["accesses_not_status_layout"] += 1
            return None
        cand = self._candidate(vm, ev)
        value = ev.value & 0xFF
        if ev.op == Op.WRITE:
            cand.writes.append(value)
            if tuple(cand.writes) == RESET_SEQUENCE:
                # (a device at this base already, of another transport: not its status)
                known = layout.device_id in vm.devices
                dev = self._confirm(vm, space, addr, ev.size, ev.ts_ns, out)
                if dev is not None and not known:
                    # the 0 and 1 writes that made the sequence happened before the device existed
                    dev.resets_total += 1
                    dev.driver_bits = 1
                    dev.status = 1
                return dev
            if value == 0 or not (layout.aligned()
                                  and looks_initialised(value, layout.transport)):
                return None
        else:
            cand.last_read = value
            if not (layout.aligned() and looks_initialised(value, layout.transport)):
                return None
        # a running device first seen now (the agent started after the guest driver)
        return self._confirm(vm, space, addr, ev.size, ev.ts_ns, out)

    def _candidate(self, vm: VmState, ev: RegisterAccess) -> Candidate:
        key = (ev.space, ev.addr)
        cand = vm.candidates.get(key)
        if cand is None:
            if len(vm.candidates) >= self.config.max_candidates_per_vm:
                vm.candidates.popitem(last=False)
                self._stats["candidates_evicted"] += 1
            cand = vm.candidates[key] = Candidate(size=ev.size)
        else:
            vm.candidates.move_to_end(key)
        return cand

    # -- interrupts ------------------------------------------------------------------------

    def _remember(self, ring: deque, item: tuple[int, int]) -> None:
        ring.append(item)
        while len(ring) > self.config.max_recent_interrupts:
            ring.popleft()

    def _apic(self, vm: VmState, ev: ApicAccepted, out: list[Output]) -> None:
        dev = vm.vectors.get(ev.vector)
        if dev is not None and (dev.config_dest is None or dev.config_dest == ev.apicid):
            self._config_irq(vm, dev, ev.ts_ns, out)
        else:
            vm.last_progress_ns = max(vm.last_progress_ns, ev.ts_ns)

    def _isr_config(self, vm: VmState, dev: DeviceState, ts: int, out: list[Output]) -> None:
        """ISR / InterruptStatus read (or ACK) with the configuration-change bit: the device
        raised a config interrupt. It was raised at the last rise of the device's own line
        within the window, when that line is known exactly and no other device shares it;
        otherwise when is unknown (counted, not timed)."""
        if dev.gsi is not None and not dev.gsi_shared:
            for t, gsi in reversed(vm.recent_irq):
                if t < ts - self.config.notify_window_ns:
                    break
                if t <= ts and gsi == dev.gsi:
                    if dev.last_config_irq_ns == t:
                        return      # that rise was already counted (read, then ACK)
                    self._config_irq(vm, dev, t, out)
                    return
        self._config_irq(vm, dev, ts, out, timed=False)

    # -- vhost-vdpa ------------------------------------------------------------------------

    def _vhost(self, vm: VmState, ev: VhostStatus, out: list[Output]) -> None:
        dev_id = f"vhost-fd{ev.fd}"
        dev = vm.devices.get(dev_id)
        if dev is None:
            dev = DeviceState(id=dev_id, type="unknown", transport=Transport.VHOST, layout=None,
                              last_ts=ev.ts_ns)
            self._add_device(vm, dev, out)
        value = ev.value & 0xFF
        if dev.open_episode is not None:
            self.changes += 1       # its marks may move
        if dev.resumed:
            out.extend(dev.after_gap(ev.ts_ns, value, ev.op == Op.WRITE))
        if ev.op == Op.WRITE:
            out.extend(dev.status_write(vm.identity, ev.ts_ns, value,
                                        self.config.max_reinit_values))
        elif dev.status_read(ev.ts_ns, value):
            dev.start_episode(vm.identity, ev.ts_ns, Evidence.VHOST, guest_saw_ns=None)
            self._arm(vm, dev)

    # -- NEEDS_RESET suspicion (the guest never reads status) --------------------------------

    def _config_irq(self, vm: VmState, dev: DeviceState, ts: int, out: list[Output],
                    timed: bool = True) -> None:
        """A config interrupt attributed to dev: count it, and wait for what follows. A guest that
        reads status is judged by the state machine; one that goes on kicking the device with no
        completion and never reads status is how a Linux guest looks after NEEDS_RESET."""
        out.extend(dev.config_interrupt(vm.identity, ts, timed))
        ep = dev.open_episode
        if (timed and ep is not None and ep.evidence == Evidence.STATUS_READ
                and ep.guest_saw_ns is not None and ep.reset_written_ns is None
                and 0 <= ep.guest_saw_ns - ts <= self.config.notify_window_ns
                and ts > dev.last_episode_end_ns):
            # the guest read status before its ISR (which said "config change"): the line's
            # rise before that read is the interrupt that told it, as if seen first
            ep.start_ns, ep.evidence = ts, Evidence.CONFIG_INTERRUPT
            self._started[Evidence.STATUS_READ] -= 1
            if not self._started[Evidence.STATUS_READ]:
                del self._started[Evidence.STATUS_READ]
            self._started[Evidence.CONFIG_INTERRUPT] += 1
            dev.notify_deadline_ns = None
            self.changes += 1
        if dev.open_episode is None and not dev.suspected:
            dev.suspect_irq_ns = ts
            dev.suspect_kick_ns = None
            # a device kicked within the window before the interrupt was in use: silence after
            # it counts too. Real Linux often never kicks a broken queue again: with EVENT_IDX it
            # kicks only past the avail_event QEMU stopped moving (docs/correlation.md)
            kick = dev.last_kick_ns
            if kick is not None and 0 <= ts - kick <= self.config.suspect_window_ns:
                dev.suspect_kick_ns = kick
            self._suspects[id(dev)] = (vm, dev)

    def _kick_device(self, vm: VmState, addr: int, count: bool = True) -> Optional[DeviceState]:
        if addr in vm.notify:
            return vm.notify[addr]
        found = None
        mmio = vm.devices.get(f"{Space.MMIO}-0x{addr - MMIO_QUEUE_NOTIFY_OFFSET:x}")
        pv = self._pci.get(vm.identity.pid)
        for bdf, dev in vm.pci_devices.items():
            v = pv.model.virtio(bdf) if pv is not None else None
            if v is not None and v.notify is not None and v.notify.contains(Space.MMIO, addr):
                found = dev
                break
        if found is not None:
            pass
        elif (addr % MMIO_ALIGN == MMIO_QUEUE_NOTIFY_OFFSET and mmio is not None
                and mmio.transport == Transport.MMIO):
            found = mmio
        else:
            # a device found from its traffic only: QEMU's BAR layout places its notify area
            for dev in vm.devices.values():
                lay = dev.layout
                if (lay is not None and dev.pci_bdf is None
                        and lay.transport == Transport.PCI_MODERN
                        and 0 <= addr - lay.base - QEMU_NOTIFY_OFFSET < QEMU_NOTIFY_SIZE):
                    found = dev
                    break
        if found is None:
            if count:
                self._stats["kicks_unattributed"] += 1
            return None     # not cached: the device may be discovered later
        if len(vm.notify) >= MAX_NOTIFY_PER_VM:
            vm.notify.pop(next(iter(vm.notify)))
        vm.notify[addr] = found
        return found

    def _kick(self, vm: VmState, addr: int, ts: int, out: list[Output]) -> None:
        dev = self._kick_device(vm, addr)
        if dev is None:
            return
        dev.last_kick_ns = ts
        if dev.suspect_irq_ns is not None and dev.suspect_kick_ns is None \
                and ts >= dev.suspect_irq_ns:
            dev.suspect_kick_ns = ts
        if id(dev) in self._suspects:
            self._suspicion(vm, dev, ts, out)

    def _suspicion(self, vm: VmState, dev: DeviceState, now: int, out: list[Output]) -> None:
        """Judge a pending suspicion at event time `now` (all events up to it processed)."""
        irq, kick = dev.suspect_irq_ns, dev.suspect_kick_ns
        if irq is None or dev.open_episode is not None or vm.devices.get(dev.id) is not dev:
            dev.clear_suspicion()
            self._suspects.pop(id(dev), None)
            return
        if kick is not None:
            kick = max(kick, irq)   # a kick before the interrupt: silence is judged from it
        if kick is not None and vm.last_progress_ns > kick:
            # something completed after the kick: the device (or at least the VM) makes progress
            self._stats["suspicions_cleared_by_progress"] += 1
            dev.clear_suspicion()
            self._suspects.pop(id(dev), None)
            return
        if kick is None:
            if now - irq > self.config.suspect_idle_ns:
                dev.clear_suspicion()        # an idle device: no evidence either way
                self._suspects.pop(id(dev), None)
            return
        if not dev.suspected and now - kick >= self.config.suspect_window_ns:
            dev.suspected = True
            out.append(NeedsResetSuspected(now, vm.identity, dev.id, irq))
