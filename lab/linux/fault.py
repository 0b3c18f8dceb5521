"""Break a real Linux driver's virtqueue from the host: QMP and the guest's RAM file.

`stop`; `x-query-virtio-queue-status` gives the ring addresses and QEMU's last_avail_idx; the
avail ring's `idx` (at vring-avail + 2, u16) becomes last_avail_idx + 1000; `cont`. The next
time QEMU looks at the queue it finds 1000 new buffers in a ring of 256 or fewer and calls
virtio_error() ("Guest moved used index from N to N+1000"): DEVICE_NEEDS_RESET and a config
interrupt.

Linux writes the avail idx from its own copy (vring_virtqueue.split.avail_idx_shadow) on every
buffer it adds, so on a queue QEMU only reads when kicked (virtio-blk's, virtio-net's tx) the
guest's next add would undo the poke before QEMU saw it. The driver's copy is therefore moved
too, where it can be found unambiguously: Linux 6.1's `struct vring` (num, desc, avail, used
pointers in the direct map) followed by avail_flags_shadow and avail_idx_shadow. The guest then
goes on from the bad index like a driver with that bug would. Linux negotiates
VIRTIO_F_EVENT_IDX, so it kicks only when its new index passes the device's avail_event (the
u16 after the used ring), which QEMU left at last_avail_idx: that is moved along too, or the
guest would never kick.
Where the shadow is not found (another kernel), only the ring is written and `shadow_patched`
is false.
"""
from __future__ import annotations

import mmap
import struct
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

FAULT_STEP = 1000
# which queue to break per device type, and why
QUEUES = {
    "rng": 0,    # requestq: QEMU re-reads it when the VM resumes (virtio_rng_vm_state_change)
    "net": 0,    # receiveq 0: read when the next frame arrives (the guest pings the gateway)
    "blk": 0,    # requestq 0: read on the guest's next request (shadow moved, see above)
}


# the x86-64 direct map without KASLR: 5-level paging (TCG's -cpu max has LA57), 4-level
NOKASLR_BASES = (0xFF11000000000000, 0xFFFF888000000000)


class FaultError(RuntimeError):
    pass


@dataclass(frozen=True, slots=True)
class Fault:
    queue: int
    vring_desc: int
    vring_avail: int
    vring_used: int
    last_avail_idx: int
    avail_idx_before: int
    avail_idx_written: int
    shadow_addr: Optional[int]       # guest-physical address of the driver's avail_idx_shadow
    shadow_patched: bool
    shadow_search_s: float           # the VM stays stopped this long for the search

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def find_shadow(ram: mmap.mmap, desc: int, avail: int, used: int, idx: int) -> Optional[int]:
    """Offset in RAM of the driver's avail_idx_shadow for this ring, if exactly one `struct
    vring` points at it (desc, avail and used in the direct map, whose base is 1 GiB aligned
    and randomised under KASLR) and its shadow equals the ring's idx."""
    for base in NOKASLR_BASES:      # the guest boots with nokaslr: one exact pattern
        pattern = struct.pack("<QQQ", base + desc, base + avail, base + used)
        at = ram.find(pattern)
        if at != -1 and at % 8 == 0 and ram.find(pattern, at + 1) == -1 \
                and struct.unpack_from("<H", ram, at + 26)[0] == idx:
            return at + 26
    hits = []
    for k in range(4):      # the base's bits 30-31 are unknown; below bit 30 it is zero
        low = struct.pack("<I", (desc + (k << 30)) & 0xFFFFFFFF)
        at = ram.find(low)
        while at != -1 and len(hits) < 4:
            if at % 8 == 0 and at + 28 <= len(ram):
                d, a, u = struct.unpack_from("<QQQ", ram, at)
                base = d - desc
                if (d >> 56 == 0xFF and base % (1 << 30) == 0 and a == base + avail
                        and u == base + used
                        and struct.unpack_from("<H", ram, at + 26)[0] == idx):
                    hits.append(at + 26)
            at = ram.find(low, at + 1)
    return hits[0] if len(hits) == 1 else None


def break_queue(qmp, ram_path: Path, qom_path: str, queue: int) -> Fault:
    """Stop the VM, corrupt the queue's avail idx (and the driver's copy), resume."""
    qmp.execute("stop")
    try:
        st = qmp.execute("x-query-virtio-queue-status", {"path": qom_path, "queue": queue})
        desc, avail, used = st["vring-desc"], st["vring-avail"], st["vring-used"]
        last, num = st["last-avail-idx"], st["vring-num"]
        if not avail:
            raise FaultError(f"queue {queue} of {qom_path} is not set up (vring-avail 0)")
        new = (last + FAULT_STEP) & 0xFFFF
        with open(ram_path, "r+b") as f, mmap.mmap(f.fileno(), 0) as ram:
            if avail + 4 > len(ram):
                raise FaultError(f"vring-avail 0x{avail:x} is outside the RAM file")
            before = struct.unpack_from("<H", ram, avail + 2)[0]
            t0 = time.monotonic()
            shadow = find_shadow(ram, desc, avail, used, before)
            search_s = time.monotonic() - t0
            struct.pack_into("<H", ram, avail + 2, new)
            event = used + 4 + 8 * num
            if shadow is not None:
                struct.pack_into("<H", ram, shadow, new)
                if event + 2 <= len(ram):
                    # with VIRTIO_F_EVENT_IDX the driver kicks only when its new idx passes
                    # the device's avail_event (after the used ring), which QEMU left at
                    # last_avail_idx: moved along, the driver's next buffer kicks
                    struct.pack_into("<H", ram, event, new)
            ram.flush()
    finally:
        qmp.execute("cont")
    return Fault(queue, desc, avail, used, last, before, new, shadow, shadow is not None,
                 round(search_s, 3))
