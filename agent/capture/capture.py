"""Capture: compile bpf/capture.c with BCC, attach each hook family, read the ring buffer."""
from __future__ import annotations

import ctypes
import errno
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

from agent.events import Event, ProcessExit, Register, Space
from agent.model import WatchDeviceBars, WatchEcam, WatchInterrupt, WatchRegister

from . import decode as dec
from .hooks import FAMILIES, Family, HookStatus, check, kvm_is_module
from .stats import FILTER_REASONS, CaptureStats, MapFill, bpf_stats_enabled, prog_fdinfo

log = logging.getLogger(__name__)

SOURCE = "capture.c"
# maps whose fill is reported (name -> grows with guests)
REPORTED_MAPS = ("watch", "candidates", "buckets", "tracked", "irq_watch", "inflight_ioctl",
                 "irq_seen", "apic_pending", "cf8_latch", "ecam", "cfg_state", "devbar",
                 "devbar_k", "virtio_fns")
CFG_DISCOVERY_RATE = 0
CFG_DISCOVERY_BURST = 1
CFG_PIO_MIN_PORT = 2
CFG_ACTIVITY_RATE = 4
CFG_ACTIVITY_BURST = 5
CFG_ACTIVITY_INTERVAL = 6
CFG_ACTIVITY_DISCOVERY = 7
CFG_CONFIG_RATE = 8
CFG_CONFIG_BURST = 9
CFG_ECAM_LO = 10
CFG_ECAM_HI = 11
CFG_PCIEXBAR = 12
CFG_DEVBAR_LO = 13
CFG_DEVBAR_HI = 14
CFG_WATCH_LO = 15
CFG_WATCH_HI = 16
# an ECAM window covers at most 256 buses of 32 devices of 8 functions of 4 KiB
ECAM_MAX_SIZE = 1 << 28
# activity bucket refill (per second per VM) when activity_rate=0 turned activity discovery off:
# changes of watched non-status registers and watched interrupts are still rate limited
DEFAULT_ACTIVITY_RATE = 100


class CaptureError(RuntimeError):
    pass


@dataclass(frozen=True, slots=True)
class RegisterState:
    register: int
    valid: bool
    last: int
    op: str
    repeats: int


def bpf_dir() -> Path:
    """bpf/ of this checkout, or $VRA_BPF_DIR (set by the container image)."""
    env = os.environ.get("VRA_BPF_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "bpf"


def raw_tracepoints_usable() -> bool:
    from bcc import BPF
    if not BPF.support_raw_tracepoint():
        return False
    return not kvm_is_module() or BPF.support_raw_tracepoint_in_module()


class Capture:
    """BPF capture of KVM/vhost events. See docs/capture.md for the contract."""

    def __init__(self, hooks: Optional[Iterable[str]] = None, ringbuf_pages: int = 64, *,
                 discovery_rate: int = 200, discovery_burst: int = 64,
                 pio_min_port: int = 0x1000, activity_rate: int = DEFAULT_ACTIVITY_RATE,
                 activity_burst: int = 64, activity_interval_ms: int = 200,
                 raw_tracepoints: Optional[bool] = None, watch_entries: int = 16384,
                 candidate_entries: int = 4096, vm_entries: int = 1024,
                 irq_entries: int = 4096, config_rate: int = 1000, config_burst: int = 4096,
                 config_entries: int = 16384, pciexbar_decode: bool = True) -> None:
        names = set(FAMILIES) if hooks is None else set(hooks)
        unknown = names - set(FAMILIES)
        if unknown:
            raise ValueError(f"unknown hook families {sorted(unknown)}; known: {sorted(FAMILIES)}")
        if ringbuf_pages < 1 or ringbuf_pages & (ringbuf_pages - 1):
            raise ValueError(f"ringbuf_pages must be a power of two, got {ringbuf_pages}")
        if discovery_rate < 0 or discovery_burst < 1:
            raise ValueError("discovery_rate must be >= 0 and discovery_burst >= 1")
        if activity_rate < 0 or activity_burst < 1 or activity_interval_ms < 1:
            raise ValueError("activity_rate must be >= 0, activity_burst and "
                             "activity_interval_ms >= 1")
        if config_rate < 0 or config_burst < 1 or config_entries < 1:
            raise ValueError("config_rate must be >= 0, config_burst and config_entries >= 1")
        self.config_rate = config_rate
        # the kernel sets a VM's ECAM window itself from a q35 MCH PCIEXBAR write (00:00.0
        # +0x60), so the firmware's first ECAM accesses are not lost before WatchEcam arrives
        self.pciexbar_decode = pciexbar_decode
        self.config_burst = config_burst
        self.activity_rate = activity_rate
        self.activity_burst = activity_burst
        self.activity_interval_ms = activity_interval_ms
        self.families = sorted(names)
        self.ringbuf_pages = ringbuf_pages
        self.discovery_rate = discovery_rate
        self.discovery_burst = discovery_burst
        self.pio_min_port = pio_min_port
        self.raw_tracepoints = raw_tracepoints
        self.sizes = {"WATCH_ENTRIES": watch_entries, "CAND_ENTRIES": candidate_entries,
                      "VM_ENTRIES": vm_entries, "IRQ_ENTRIES": irq_entries,
                      "CFG_ENTRIES": config_entries}
        self.hook_status: dict[str, HookStatus] = {}
        self.bpf = None
        self._batch: list[Event] = []
        self._delivered = 0
        self._decode_errors = 0
        self._watch_errors = 0
        # mirror of what we put in watch / irq_watch, per pid, to clean up on ProcessExit
        self._watched: dict[int, set] = {}
        self._watch_span = (0, 0)       # CFG_WATCH_LO/HI as last written
        self._irqs: dict[int, set] = {}
        self._exited: list[int] = []

    # ---- lifecycle -------------------------------------------------------------------
    def __enter__(self) -> "Capture":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> dict[str, HookStatus]:
        if self.bpf is not None:
            return self.hook_status
        try:
            from bcc import BPF  # noqa: F401
        except Exception as exc:
            raise CaptureError(f"BCC is not importable: {exc}") from exc
        src_path = bpf_dir() / SOURCE
        try:
            self._text = src_path.read_text()
        except OSError as exc:
            raise CaptureError(f"cannot read BPF source {src_path}: {exc} "
                               "(set VRA_BPF_DIR to the bpf/ directory)") from exc
        if self.raw_tracepoints is None:
            self.raw_tracepoints = raw_tracepoints_usable()

        wanted: list[Family] = []
        for name in self.families:
            fam = FAMILIES[name]
            problem = check(fam)
            if problem:
                self.hook_status[name] = HookStatus(name, False, problem)
            else:
                wanted.append(fam)
        self.bpf, failed = self._compile(wanted)
        for fam, reason in failed.items():
            self.hook_status[fam] = HookStatus(fam, False, reason)
        if self.bpf is None:
            self.hook_status = dict(sorted(self.hook_status.items()))
            return self.hook_status
        self._configure()
        for fam in wanted:
            if fam.name not in failed:
                self.hook_status[fam.name] = self._attach(fam)
        self.bpf[b"events"].open_ring_buffer(self._on_event)
        self.hook_status = dict(sorted(self.hook_status.items()))
        return self.hook_status

    def close(self) -> None:
        if self.bpf is not None:
            try:
                self.bpf.cleanup()
            finally:
                self.bpf = None

    # ---- compile / attach ------------------------------------------------------------
    def _cflags(self, fams: Iterable[Family]) -> list[str]:
        flags = [f"-D{f.macro}" for f in fams]
        flags.append(f"-DRAW_TP={1 if self.raw_tracepoints else 0}")
        flags.append(f"-DRINGBUF_PAGES={self.ringbuf_pages}")
        flags += [f"-D{k}={v}" for k, v in self.sizes.items()]
        return flags

    def _build(self, fams: list[Family]):
        from bcc import BPF
        # Tracepoint-mode programs (TRACEPOINT_PROBE) are attached by BCC while loading.
        return BPF(text=self._text.encode(), cflags=self._cflags(fams))

    def _compile(self, fams: list[Family]):
        """Build all families together; if that fails, find the culprits one by one."""
        failed: dict[str, str] = {}
        if not fams:
            return None, failed
        try:
            return self._build(fams), failed
        except Exception as exc:
            if len(fams) == 1:
                return None, {fams[0].name: f"compile/load failed: {_short(exc)}"}
            log.warning("BPF build with all families failed (%s); isolating", _short(exc))
        ok = []
        for fam in fams:
            try:
                self._build([fam]).cleanup()
                ok.append(fam)
            except Exception as exc:
                failed[fam.name] = f"compile/load failed: {_short(exc)}"
        if not ok:
            return None, failed
        try:
            return self._build(ok), failed
        except Exception as exc:
            for fam in ok:
                failed[fam.name] = f"compile/load failed together: {_short(exc)}"
            return None, failed

    def _attach(self, fam: Family) -> HookStatus:
        from bcc import BPF
        b = self.bpf
        try:
            if fam.kprobes:
                for sym in fam.kprobes:
                    b.attach_kprobe(event=sym.encode(), fn_name=f"kp_{sym}".encode())
                return HookStatus(fam.name, True, "kprobe")
            if fam.raw and self.raw_tracepoints:
                for _cat, ev in fam.tracepoints:
                    b.attach_raw_tracepoint(tp=ev.encode(), fn_name=f"rtp_{ev}".encode())
                return HookStatus(fam.name, True, "raw tracepoint")
            # TRACEPOINT_PROBE programs were attached by BCC when loading
            for cat, ev in fam.tracepoints:
                fn = f"tracepoint__{cat}__{ev}".encode()
                if fn not in b.funcs:
                    b.load_func(fn, BPF.TRACEPOINT)
                    b.attach_tracepoint(tp=f"{cat}:{ev}".encode(), fn_name=fn)
            return HookStatus(fam.name, True, "tracepoint")
        except Exception as exc:
            return HookStatus(fam.name, False, f"attach failed: {_short(exc)}")

    def _configure(self) -> None:
        cfg = self.bpf[b"config"]
        cfg[ctypes.c_int(CFG_DISCOVERY_RATE)] = ctypes.c_uint64(self.discovery_rate)
        cfg[ctypes.c_int(CFG_DISCOVERY_BURST)] = ctypes.c_uint64(self.discovery_burst)
        cfg[ctypes.c_int(CFG_PIO_MIN_PORT)] = ctypes.c_uint64(self.pio_min_port)
        # activity_rate=0 turns activity discovery off; the buckets keep bounding watched
        # traffic (changes of non-status registers, watched interrupts) at the default rate
        cfg[ctypes.c_int(CFG_ACTIVITY_RATE)] = ctypes.c_uint64(
            self.activity_rate or DEFAULT_ACTIVITY_RATE)
        cfg[ctypes.c_int(CFG_ACTIVITY_DISCOVERY)] = ctypes.c_uint64(1 if self.activity_rate else 0)
        cfg[ctypes.c_int(CFG_ACTIVITY_BURST)] = ctypes.c_uint64(self.activity_burst)
        cfg[ctypes.c_int(CFG_ACTIVITY_INTERVAL)] = ctypes.c_uint64(
            self.activity_interval_ms * 1_000_000)
        cfg[ctypes.c_int(CFG_CONFIG_RATE)] = ctypes.c_uint64(self.config_rate)
        cfg[ctypes.c_int(CFG_CONFIG_BURST)] = ctypes.c_uint64(self.config_burst)
        cfg[ctypes.c_int(CFG_PCIEXBAR)] = ctypes.c_uint64(1 if self.pciexbar_decode else 0)

    # ---- events ----------------------------------------------------------------------
    def _on_event(self, _ctx, data, size) -> None:
        try:
            ev = dec.decode(ctypes.string_at(data, size))
        except dec.DecodeError as exc:
            self._decode_errors += 1
            log.debug("decode error: %s", exc)
            return
        self._batch.append(ev)

    def poll(self, timeout_ms: int = 100) -> list[Event]:
        """Events of the last timeout_ms (less when a burst wakes it), sorted by ts."""
        if self.bpf is None:
            raise CaptureError("capture is not started (or failed to load): call start()")
        # watches of VMMs that exited are dropped one poll late, so that a caller can still
        # read their final state (register_state) after seeing the ProcessExit
        for pid in self._exited:
            try:
                self._forget(pid)
            except Exception:     # a map that could not be cleaned must not stop the capture
                self._watch_errors += 1
                log.exception("forgetting the maps of exited VMM %s failed", pid)
        self._exited = []
        self._batch = []
        # the kernel wakes this poll only every WAKE_EVERY records (bpf/capture.c): the rest is
        # drained here, when the timeout ends the wait
        self.bpf.ring_buffer_poll(timeout_ms)
        self.bpf.ring_buffer_consume()
        batch, self._batch = self._batch, []
        batch.sort(key=lambda e: e.ts_ns)
        self._delivered += len(batch)
        self._exited = [ev.pid for ev in batch if isinstance(ev, ProcessExit)]
        return batch

    # ---- watch maps ------------------------------------------------------------------
    def _reg_key(self, pid: int, space: str, addr: int):
        k = self.bpf[b"watch"].Key()
        k.tgid = pid
        k.space = dec.SPACE_CODES[space]
        k.addr = addr
        return k

    def watch_register(self, req: WatchRegister) -> bool:
        """Apply correlation's request. Returns False (and counts) if the map refused it."""
        if self.bpf is None:
            raise CaptureError("capture is not started")
        if req.space not in dec.SPACE_CODES:
            raise ValueError(f"unknown address space {req.space!r}")
        if req.space == Space.PCICFG:
            raise ValueError("PCI configuration space is forwarded on change without watches")
        if req.register not in Register.NAMES:
            raise ValueError(f"unknown register kind {req.register!r}")
        watch, cands = self.bpf[b"watch"], self.bpf[b"candidates"]
        key = self._reg_key(req.pid, req.space, req.addr)
        ident = (req.space, req.addr)
        if not req.add:
            try:
                del watch[key]
            except KeyError:
                pass
            self._watched.get(req.pid, set()).discard(ident)
            return True
        cur = watch.get(key)
        if cur is not None and cur.reg == req.register:
            return True
        val = watch.Leaf()
        val.reg = req.register
        # carry the discovery state over, so the already-forwarded value is not re-sent
        ckey = cands.Key(key.tgid, key.space, key.addr)
        cand = cands.get(ckey)
        if cand is not None:
            for name in ("last", "repeats", "op", "valid"):
                setattr(val.st, name, getattr(cand, name))
        if req.space == Space.MMIO:
            self._widen_watch_span(req.addr)   # before the insert: no access of it skips the lookup
        try:
            watch[key] = val
        except Exception as exc:
            self._watch_errors += 1
            log.debug("watch map update failed: %s", exc)
            return False
        if cand is not None:
            try:
                del cands[ckey]
            except KeyError:
                pass
        self._watched.setdefault(req.pid, set()).add(ident)
        return True

    def _widen_watch_span(self, addr: int) -> None:
        lo, hi = self._watch_span
        if lo <= addr < hi:
            return
        self._set_watch_span(min(lo, addr) if hi else addr, max(hi, addr + 1))

    def _set_watch_span(self, lo: int, hi: int) -> None:
        """The kernel looks MMIO accesses up in `watch` only within [lo, hi) (or when another
        span or an access pattern needs it: mmio_outside() in bpf/capture.c)."""
        cfg = self.bpf[b"config"]
        cfg[ctypes.c_int(CFG_WATCH_LO)] = ctypes.c_uint64(lo)
        cfg[ctypes.c_int(CFG_WATCH_HI)] = ctypes.c_uint64(hi)
        self._watch_span = (lo, hi)

    def register_state(self, pid: int, space: str, addr: int) -> Optional[RegisterState]:
        """What the kernel keeps for a watched register: last forwarded value and op, and
        the identical accesses folded since (not yet carried by an event)."""
        if self.bpf is None:
            raise CaptureError("capture is not started")
        val = self.bpf[b"watch"].get(self._reg_key(pid, space, addr))
        if val is None:
            return None
        return RegisterState(register=val.reg, valid=bool(val.st.valid), last=val.st.last,
                             op=dec.OPS.get(val.st.op, "?"), repeats=val.st.repeats)

    def config_state(self, pid: int, addr: int) -> Optional[RegisterState]:
        """What the kernel keeps for a PCI configuration-space address of VM `pid` (last
        forwarded value and op, identical accesses folded since); None if it keeps nothing."""
        if self.bpf is None:
            raise CaptureError("capture is not started")
        table = self.bpf[b"cfg_state"]
        val = table.get(table.Key(pid, dec.SPACE_PCICFG, addr))
        if val is None:
            return None
        return RegisterState(register=Register.UNKNOWN, valid=bool(val.valid), last=val.last,
                             op=dec.OPS.get(val.op, "?"), repeats=val.repeats)

    def _set_window(self, name: bytes, pid: int, base: int, size: int, add: bool) -> bool:
        """A VM's window in a per-VM (base, size) map (`ecam`, `devbar`): set, or forgotten
        with add=False. False (and counted) if the map refused it."""
        table = self.bpf[name]
        key = ctypes.c_uint32(pid)
        if not add:
            try:
                del table[key]
            except KeyError:
                pass
            return True
        if pid <= 0 or pid >= 1 << 32:
            raise ValueError(f"bad pid {pid}")
        if not 0 <= base < 2**64 - size:
            raise ValueError(f"base {base:#x} out of range")
        val = table.Leaf()
        val.base, val.size = base, size
        try:
            table[key] = val
        except Exception as exc:
            self._watch_errors += 1
            log.debug("%s map update failed: %s", name.decode(), exc)
            return False
        return True

    def watch_ecam(self, req: WatchEcam) -> bool:
        """Translate VM req.pid's MMIO accesses in [base, base + size) into PCI configuration
        space (addr = gpa - base); add=False forgets the VM's window. One window per VM: a
        new one replaces the old. False (and counted) if the map refused it."""
        if self.bpf is None:
            raise CaptureError("capture is not started")
        if req.add and (not 0 < req.size <= ECAM_MAX_SIZE or req.size % 4096):
            raise ValueError(f"WatchEcam: size {req.size:#x} is not a multiple of 4 KiB "
                             f"up to {ECAM_MAX_SIZE:#x}")
        try:
            ok = self._set_window(b"ecam", req.pid, req.base, req.size, req.add)
        except ValueError as exc:
            raise ValueError(f"WatchEcam: {exc}") from None
        if not ok:
            return False
        self._span_bounds((b"ecam",), CFG_ECAM_LO, CFG_ECAM_HI)
        return True

    def watch_device_bars(self, req: WatchDeviceBars) -> bool:
        """Forward VM req.pid's unwatched 2/4-byte MMIO writes in [base, base + size) with their
        values (one span per VM; add=False forgets it). False (and counted) if refused."""
        if self.bpf is None:
            raise CaptureError("capture is not started")
        if req.add and req.size <= 0:
            raise ValueError(f"WatchDeviceBars: size {req.size} is not positive")
        try:
            if not self._set_window(b"devbar", req.pid, req.base, req.size, req.add):
                return False
        except ValueError as exc:
            raise ValueError(f"WatchDeviceBars: {exc}") from None
        self._span_bounds((b"devbar", b"devbar_k"), CFG_DEVBAR_LO, CFG_DEVBAR_HI)
        return True

    def _span_bounds(self, names: tuple[bytes, ...], lo_slot: int, hi_slot: int) -> None:
        """The kernel looks a VM's windows (`ecam`; `devbar` and the kernel's own `devbar_k`)
        up only for MMIO accesses within all windows' span (config slots lo_slot/hi_slot). The
        span is computed from the maps themselves: the kernel inserts or widens windows
        (PCIEXBAR, virtio BAR assignments) that userspace has not been told about yet. The
        kernel inserts before it widens, so re-reading the maps after the store catches a
        window whose widening the store overwrote."""
        tables, cfg = [self.bpf[n] for n in names], self.bpf[b"config"]
        for _ in range(8):
            wins = [(v.base, v.base + v.size) for t in tables for v in t.values()]
            lo = min((b for b, _ in wins), default=0)
            hi = max((e for _, e in wins), default=0)
            cfg[ctypes.c_int(lo_slot)] = ctypes.c_uint64(lo)
            cfg[ctypes.c_int(hi_slot)] = ctypes.c_uint64(hi)
            if all(lo <= v.base and v.base + v.size <= hi for t in tables for v in t.values()):
                return

    def watch_interrupt(self, req: WatchInterrupt) -> bool:
        if self.bpf is None:
            raise CaptureError("capture is not started")
        if req.vector is None and req.gsi is None:
            raise ValueError("WatchInterrupt needs a vector or a gsi")
        table = self.bpf[b"irq_watch"]
        ok = True
        for kind, num in ((dec.IRQ_KIND_VECTOR, req.vector), (dec.IRQ_KIND_GSI, req.gsi)):
            if num is None:
                continue
            key = table.Key(req.pid, kind, num, 0)
            if req.add:
                try:
                    table[key] = ctypes.c_uint8(1)
                    self._irqs.setdefault(req.pid, set()).add((kind, num))
                except Exception as exc:
                    self._watch_errors += 1
                    log.debug("irq_watch update failed: %s", exc)
                    ok = False
            else:
                try:
                    del table[key]
                except KeyError:
                    pass
                self._irqs.get(req.pid, set()).discard((kind, num))
        return ok

    def _forget(self, pid: int) -> None:
        forgotten = self._watched.pop(pid, ())
        mmio = [a for ws in self._watched.values() for sp, a in ws if sp == Space.MMIO]
        if any(sp == Space.MMIO for sp, _ in forgotten):    # removals only shrink it here
            self._set_watch_span(min(mmio, default=0), max(mmio, default=-1) + 1)
        for space, addr in forgotten:
            try:
                del self.bpf[b"watch"][self._reg_key(pid, space, addr)]
            except KeyError:
                pass
        table = self.bpf[b"irq_watch"]
        for kind, num in self._irqs.pop(pid, ()):
            try:
                del table[table.Key(pid, kind, num, 0)]
            except KeyError:
                pass
        # PCI configuration space: the latch, the ECAM window and the folding state (else a
        # new VM that gets the pid would have its first reads folded against the old VM's)
        try:
            del self.bpf[b"cf8_latch"][ctypes.c_uint32(pid)]
        except KeyError:
            pass
        for names, lo_slot, hi_slot in (((b"ecam",), CFG_ECAM_LO, CFG_ECAM_HI),
                                        ((b"devbar", b"devbar_k"), CFG_DEVBAR_LO, CFG_DEVBAR_HI)):
            found = False
            for name in names:
                try:    # also a window the kernel set (PCIEXBAR, a virtio BAR assignment)
                    del self.bpf[name][ctypes.c_uint32(pid)]
                    found = True
                except KeyError:
                    pass
            if found:
                self._span_bounds(names, lo_slot, hi_slot)
        fns = self.bpf[b"virtio_fns"]
        for key in [int(getattr(k, "value", k)) for k in _map_keys(fns)]:
            if key >> 32 != pid:
                continue
            try:
                del fns[fns.Key(key)]
            except KeyError:
                pass
        cfg = self.bpf[b"cfg_state"]
        for key in [k for k in _map_keys(cfg) if k.tgid == pid]:
            try:
                del cfg[key]
            except KeyError:
                pass

    # ---- stats -----------------------------------------------------------------------
    def counters(self) -> dict[str, int]:
        if self.bpf is None:
            return {}
        table = self.bpf[b"counters"]
        out = {}
        for i, name in enumerate(dec.COUNTERS):
            out[name] = int(sum(table[ctypes.c_int(i)]))
        return out

    def stats(self) -> CaptureStats:
        c = self.counters()
        maps: dict[str, MapFill] = {}
        programs = {}
        if self.bpf is not None:
            for name in REPORTED_MAPS:
                t = self.bpf[name.encode()]
                maps[name] = MapFill(len(_map_keys(t)), t.max_entries)
            for fname, fn in self.bpf.funcs.items():
                ps = prog_fdinfo(fn.fd)
                if ps is not None:
                    programs[fname.decode()] = ps
        lost = {"ringbuf_full": c.get("ringbuf_full", 0), "decode_error": self._decode_errors,
                "candidate_map_full": c.get("candidate_map_full", 0),
                "watch_map_full": self._watch_errors,
                "kernel_read_error": c.get("kernel_read_error", 0),
                "user_read_error": c.get("user_read_error", 0)}
        return CaptureStats(
            forwarded=c.get("forwarded", 0), delivered=self._delivered,
            filtered={r: c.get(r, 0) for r in FILTER_REASONS}, lost=lost, counters=c,
            maps=maps, programs=programs, bpf_stats_enabled=bpf_stats_enabled())


def _map_keys(table) -> list:
    """The keys of a BPF hash map: one BPF_MAP_LOOKUP_BATCH (Linux 5.6+) rather than a syscall
    per key (a full 16k-entry map: ~2 ms instead of ~25 ms); iterates where batches fail."""
    from bcc.libbcc import lib
    n = table.max_entries
    keys, values = (table.Key * n)(), (table.Leaf * n)()
    token, count, total = ctypes.c_uint32(0), ctypes.c_uint32(0), 0
    while total < n:
        count.value = n - total
        res = lib.bpf_lookup_batch(table.map_fd, ctypes.byref(token) if total else None,
                                   ctypes.byref(token),
                                   ctypes.byref(keys, ctypes.sizeof(table.Key) * total),
                                   ctypes.byref(values, ctypes.sizeof(table.Leaf) * total),
                                   ctypes.byref(count))
        err = ctypes.get_errno()
        total += count.value
        if res != 0:
            if err == errno.ENOENT:
                break           # the whole map was read
            return list(table.keys())
        if count.value == 0:
            break
    return list(keys[:total])


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    msg = text[-1] if text else type(exc).__name__
    if isinstance(exc, OSError) and exc.errno:
        msg = f"{errno.errorcode.get(exc.errno, exc.errno)}: {msg}"
    return msg[:300]
