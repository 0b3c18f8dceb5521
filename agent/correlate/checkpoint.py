"""The correlator's state carried over an agent restart (pure: dicts in and out, no I/O).

What a restarted agent needs to go on as if it had not stopped: the VMs and their devices (so
capture watches their registers again at once, instead of waiting for discovery), each VM's
device model (the PCI configuration and MSI-X programming the guest did before: it is not done
again), interrupt vectors / GSIs, and each open NEEDS_RESET episode with its marks, so the episode keeps
its real start and is reported once, by the new agent. Cumulative counters are not carried: the
new process's counters start at 0 (a counter reset, which Prometheus handles).

Events while no agent ran are unseen. A restored open episode is `resumed`; the first status
access after the restore tells what the gap hid (DeviceState.after_gap). A VM that exited
meanwhile has its open episodes ended `abandoned` at the restore.

Timestamps are CLOCK_MONOTONIC: a state from another boot is meaningless (the caller checks
the boot id, agent/state_file.py).
"""
from __future__ import annotations

from typing import Any, Callable

from agent.model import Episode, EpisodeEnded, Outcome, Output, VmIdentity, WatchEcam
from agent.correlate.correlator import Correlator, PciVm, VmState
from agent.correlate.device import DeviceState
from agent.correlate.layout import Layout
from agent.correlate.pcimodel import (
    CFG_SIZE, MAX_FUNCTIONS, MAX_MSIX_ENTRIES, MAX_QUEUES, MsixEntry, PciFunction, PciModel,
    bdf_name,
)

VERSION = 2
_IDENTITY = ("pid", "start_time", "name", "namespace", "uuid", "vmm")
_DEVICE = ("id", "type", "transport", "config_vector", "config_dest", "gsi", "msix_config",
           "pci_bdf", "last_config_irq_ns", "last_episode_end_ns")
_EPISODE = ("evidence", "start_ns", "guest_saw_ns", "reset_written_ns", "reset_done_ns",
            "driver_ok_ns", "stuck", "reinit_values")


_INT, _OPT_INT, _BOOL, _STR = (int,), (int, type(None)), (bool,), (str,)
# what each restored field may hold (a file on a hostPath is input, not trusted)
_TYPES = {"pid": _INT, "start_time": _INT, "name": _STR, "namespace": _STR, "uuid": _STR,
          "vmm": _STR, "config_vector": _OPT_INT, "config_dest": _OPT_INT, "gsi": _OPT_INT,
          "pci_bdf": _OPT_INT,
          "msix_config": _OPT_INT, "last_config_irq_ns": _OPT_INT, "last_episode_end_ns": _INT,
          "evidence": _STR, "start_ns": _INT, "guest_saw_ns": _OPT_INT,
          "reset_written_ns": _OPT_INT, "reset_done_ns": _OPT_INT, "driver_ok_ns": _OPT_INT,
          "stuck": _BOOL, "status": _OPT_INT, "driver_bits": _OPT_INT, "failed": _BOOL}


class StateError(ValueError):
    """The state is not one this version can restore (wrong version, malformed)."""


def _get(d: dict[str, Any], key: str) -> Any:
    """d[key], if it has the type the field may hold (bools are not ints here)."""
    value = d[key]
    types = _TYPES[key]
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
        raise TypeError(f"{key} is {type(value).__name__}")
    return value


def dump(c: Correlator) -> dict[str, Any]:
    """The state of every tracked VM (exited ones, kept only for scrapes, are left out)."""
    vms = []
    for vm in c._vms.values():
        devices = []
        for dev in vm.devices.values():
            d: dict[str, Any] = {k: getattr(dev, k) for k in _DEVICE}
            d["layout"] = None if dev.layout is None else [
                dev.layout.transport, dev.layout.space, dev.layout.base]
            ep = dev.open_episode
            if ep is not None:
                d["episode"] = {k: getattr(ep, k) for k in _EPISODE}
                d["episode"]["reinit_values"] = list(ep.reinit_values)
                d["driver_bits"] = dev.driver_bits
                d["failed"] = dev.failed
                d["status"] = dev.status
            devices.append(d)
        entry = {"identity": {k: getattr(vm.identity, k) for k in _IDENTITY},
                 "fallback": vm.fallback, "devices": devices}
        pv = c._pci.get(vm.identity.pid)
        if pv is not None:
            entry["pci"] = _dump_model(pv.model)
        vms.append(entry)
    return {"version": VERSION, "vms": vms}


def restore(c: Correlator, state: dict[str, Any], alive: Callable[[VmIdentity], bool],
            now_ns: int) -> list[Output]:
    """Rebuild a fresh correlator's VMs and devices from `state`. Returns the outputs to apply:
    WatchRegister / WatchInterrupt / WatchEcam / WatchDeviceBars for capture (a restarted
    agent's kernel maps start empty), EpisodeEnded for episodes of VMs gone meanwhile.
    `alive(identity)`: is that VMM process still the same one (pid and start time)?"""
    if c._vms:
        raise StateError("restore needs a correlator that has seen no VM yet")
    if not isinstance(state, dict) or state.get("version") != VERSION:
        raise StateError(f"state version {state.get('version') if isinstance(state, dict) else None!r}"
                         f" is not {VERSION}")
    out: list[Output] = []
    pids: set[int] = set()
    try:
        for v in state["vms"]:
            identity = VmIdentity(**{k: _get(v["identity"], k) for k in _IDENTITY})
            if identity.pid in pids:
                raise ValueError(f"pid {identity.pid} twice")
            pids.add(identity.pid)
            devices = [(_device(d, now_ns), d) for d in v["devices"]]
            if len({dev.id for dev, _ in devices}) != len(devices):
                raise ValueError(f"a device of pid {identity.pid} twice")
            if not alive(identity):
                for dev, d in devices:
                    ep = d.get("episode")
                    if ep is not None:
                        dev.open_episode = _episode(ep, identity, dev)
                        c._started[dev.open_episode.evidence] += 1
                        out.extend(dev.abandon(now_ns))
                continue
            vm = c._new_vm(identity, bool(v["fallback"]), now_ns, out)
            if v.get("pci") is not None:
                pv = c._pci[identity.pid] = PciVm(_load_model(v["pci"]))
                if pv.model.ecam is not None:
                    out.append(WatchEcam(identity.pid, pv.model.ecam[0], pv.model.ecam[1]))
                for bdf in list(pv.model.functions):
                    c._replan(identity.pid, pv, bdf, out)
                c._watch_bars(identity.pid, pv, out)
            for dev, d in devices:
                hinted = vm.devices.get(dev.id)
                if hinted is not None:
                    # a hint naming this VM made the device again (_new_vm): the saved one,
                    # with its episode and interrupts, takes its place
                    c._remove_device(vm, hinted, now_ns, out)
                _restore_device(c, vm, dev, d, out)
    except (KeyError, TypeError, ValueError) as exc:
        raise StateError(f"malformed state: {exc!r}") from exc
    c._count_outputs(out)
    c._stats["restored_vms"] += len(c._vms)
    c._stats["restored_devices"] += c._devices
    return out


def _device(d: dict[str, Any], now_ns: int) -> DeviceState:
    lay = d["layout"]
    layout = None if lay is None else Layout(str(lay[0]), str(lay[1]), int(lay[2]))
    dev = DeviceState(id=str(d["id"]), type=str(d["type"]), transport=str(d["transport"]),
                      layout=layout, last_ts=now_ns)
    for k in _DEVICE[3:]:
        setattr(dev, k, _get(d, k))
    if dev.pci_bdf is not None:
        if dev.id != f"pci-{bdf_name(dev.pci_bdf)}":
            raise ValueError(f"device {dev.id} has the layout of PCI function {dev.pci_bdf:#x}")
    elif layout is not None and layout.device_id != dev.id:
        raise ValueError(f"device {dev.id} has the layout of {layout.device_id}")
    return dev


def _episode(e: dict[str, Any], identity: VmIdentity, dev: DeviceState) -> Episode:
    ep = Episode(vm=identity, device=dev.id, type=dev.type, transport=dev.transport,
                 evidence=_get(e, "evidence"), start_ns=_get(e, "start_ns"), resumed=True)
    for k in _EPISODE[2:-1]:
        setattr(ep, k, _get(e, k))
    if not isinstance(e["reinit_values"], list):
        raise TypeError("reinit_values is not a list")
    ep.reinit_values = [int(x) for x in e["reinit_values"]]
    ep.outcome = Outcome.OPEN
    return ep


def _restore_device(c: Correlator, vm: VmState, dev: DeviceState, d: dict[str, Any],
                    out: list[Output]) -> None:
    vector, gsi = dev.config_vector, dev.gsi
    dev.config_vector = dev.gsi = None
    c._add_device(vm, dev, out)
    if dev.pci_bdf is not None:
        # registers and interrupts come from the restored model
        vm.pci_devices[dev.pci_bdf] = dev
        c._pci_sync(vm, dev.pci_bdf, dev.last_ts, out)
    else:
        if dev.layout is not None:
            c._watch(vm, dev, out)
        if vector is not None and vector not in vm.vectors:
            c._learn_vector(vm, dev, vector, out)
        if gsi is not None:
            c._learn_gsi(vm, dev, gsi, out)
    ep = d.get("episode")
    if ep is not None:
        # the status as last seen: the first access after the gap is judged against it
        dev.status, dev.driver_bits, dev.failed = (_get(d, "status"), _get(d, "driver_bits"),
                                                   _get(d, "failed"))
        dev.open_episode = _episode(ep, vm.identity, dev)
        dev.needs_reset_total = 1
        dev.resumed = True
        c._arm(vm, dev)


def _dump_model(m: PciModel) -> dict[str, Any]:
    functions = []
    for bdf, fn in m.functions.items():
        functions.append({
            "bdf": bdf, "cfg": fn.cfg.hex(), "known": fn.known.hex(),
            "bar_masks": {str(k): v for k, v in fn.bar_masks.items()},
            "msix": {str(i): [e.address, e.data, e.masked] for i, e in fn.msix.items()},
            "msix_config": fn.msix_config, "queue_select": fn.queue_select,
            "queue_vectors": {str(q): e for q, e in fn.queue_vectors.items()},
        })
    return {"functions": functions, "ecam": list(m.ecam) if m.ecam else None}


def _small_int(value: Any, limit: int, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < limit:
        raise ValueError(f"{what} {value!r} out of range")
    return value


def _opt_small(value: Any, limit: int, what: str) -> Any:
    return None if value is None else _small_int(value, limit, what)


def _load_model(d: dict[str, Any]) -> PciModel:
    """A saved model, every field checked: the file is input, not trusted."""
    m = PciModel()
    if not isinstance(d["functions"], list) or len(d["functions"]) > MAX_FUNCTIONS:
        raise ValueError("too many PCI functions")
    for f in d["functions"]:
        fn = PciFunction(_small_int(f["bdf"], 1 << 16, "bdf"))
        cfg, known = bytes.fromhex(f["cfg"]), bytes.fromhex(f["known"])
        if len(cfg) != CFG_SIZE or len(known) != CFG_SIZE:
            raise ValueError("configuration space of the wrong size")
        fn.cfg[:], fn.known[:] = cfg, known
        for k, v in f["bar_masks"].items():
            fn.bar_masks[0x10 + 4 * _small_int(int(k) - 0x10 >> 2, 6, "bar")] = \
                _small_int(v, 1 << 32, "bar mask")
        if len(f["msix"]) > MAX_MSIX_ENTRIES or len(f["queue_vectors"]) > MAX_QUEUES:
            raise ValueError("too many MSI-X entries or queues")
        for i, (address, data, masked) in f["msix"].items():
            fn.msix[_small_int(int(i), MAX_MSIX_ENTRIES, "msix entry")] = MsixEntry(
                _opt_small(address, 1 << 32, "address"), _opt_small(data, 1 << 32, "data"),
                None if masked is None else bool(masked))
        fn.msix_config = _opt_small(f["msix_config"], 1 << 16, "msix_config")
        fn.queue_select = _opt_small(f["queue_select"], 1 << 16, "queue_select")
        for q, e in f["queue_vectors"].items():
            fn.queue_vectors[_small_int(int(q), 1 << 16, "queue")] = _small_int(e, 1 << 16, "entry")
        m.functions[fn.bdf] = fn
    if d.get("ecam") is not None:
        base, size = d["ecam"]
        m.ecam = (_small_int(base, 1 << 40, "ecam base"), _small_int(size, 1 << 29, "ecam size"))
    return m
