// virtio-recovery-agent capture programs (BCC dialect).
//
// One source, several hook families. agent/capture compiles it with -DFAM_<NAME> for each
// family it wants and -DRAW_TP=1 when raw tracepoints are usable (cheaper: no trace record is
// built). Families are independent: every map is defined unconditionally, each program only
// under its family's macro.
//
// A guest controls the exit rate, so filtering happens here: register accesses are forwarded
// only when (value, op) changes per register (identical ones are counted and folded into the
// next event's `repeats`), unwatched addresses only as rate-limited discovery candidates,
// interrupts only for vectors/GSIs userspace marked interesting, PCI configuration-space
// accesses (ports 0xcf8/0xcfc, or the VM's ECAM window) on change per config address. Apart from
// status registers, everything forwarded is bounded per VM: by a token bucket, or to one event
// per register / address / vector per activity interval. Everything else is counted.

#include <uapi/linux/ptrace.h>

#ifndef RINGBUF_PAGES
#define RINGBUF_PAGES 64
#endif
#ifndef WATCH_ENTRIES
#define WATCH_ENTRIES 16384
#endif
#ifndef CAND_ENTRIES
#define CAND_ENTRIES 4096
#endif
#ifndef VM_ENTRIES
#define VM_ENTRIES 1024
#endif
#ifndef IRQ_ENTRIES
#define IRQ_ENTRIES 4096
#endif
#ifndef INFLIGHT_ENTRIES
#define INFLIGHT_ENTRIES 1024
#endif
#ifndef CFG_ENTRIES
#define CFG_ENTRIES 16384
#endif

// keep in sync with agent/capture/decode.py
#define EV_ACCESS 1
#define EV_FAST_MMIO 2
#define EV_MSI 3
#define EV_IRQ 4
#define EV_APIC 5
#define EV_VHOST_STATUS 6
#define EV_EXIT 7

#define SPACE_MMIO 0
#define SPACE_PIO 1
#define SPACE_PCICFG 3    // PCI configuration space: addr = bus << 20 | dev << 15 | fn << 12 | offset
#define OP_READ 0
#define OP_WRITE 1

#define REG_STATUS 1      // agent.events.Register.STATUS
#define REG_QUEUE_NOTIFY 4  // agent.events.Register.QUEUE_NOTIFY
#define REG_ISR 5         // agent.events.Register.ISR

#define IRQ_KIND_VECTOR 0
#define IRQ_KIND_GSI 1

// counters (per-CPU array); keep in sync with agent/capture/decode.py COUNTERS
#define C_FORWARDED 0
#define C_REPEAT 1
#define C_UNWATCHED 2
#define C_UNINTERESTING_IRQ 3
#define C_RATE_LIMITED 4
#define C_RINGBUF_FULL 5
#define C_UNSATISFIED_READ 6
#define C_CANDIDATE_MAP_FULL 7
#define C_VHOST_IOCTL 8
#define C_KVM_SIGNAL_MSI 9
#define C_KVM_IRQFD 10
#define C_KVM_IOEVENTFD 11
#define C_KVM_SET_GSI_ROUTING 12
#define C_USER_READ_ERROR 13
#define C_INFLIGHT_FULL 14
#define C_KERNEL_READ_ERROR 15
#define C_ACTIVITY_FORWARDED 16  // unwatched MSIs / kicks forwarded by activity discovery
#define C_ACTIVITY_FOLDED 17     // ... folded (same vector / address within the interval)
#define C_CONFIG_FORWARDED 18    // PCI configuration-space accesses forwarded (changes)
#define C_CONFIG_RATE_LIMITED 19 // ... changes over the VM's config bucket (also in C_RATE_LIMITED)
#define C_WATCHED_RATE_LIMITED 20 // changes of watched registers and virtio-BAR writes over the
                                  // VM's watched-register bucket (also in C_RATE_LIMITED)
#define C_IRQ_RATE_LIMITED 21    // watched interrupts over the VM's interrupt bucket (also in C_RATE_LIMITED)
#define C_NCOUNTERS 22

// config array slots; written by userspace before attaching
#define CFG_DISCOVERY_RATE 0   // candidate events per second per VM (0 = discovery off)
#define CFG_DISCOVERY_BURST 1  // bucket size
#define CFG_PIO_MIN_PORT 2     // lowest candidate port: below are ISA devices and PCI config (0xcf8)
#define CFG_INFLIGHT 3         // (kernel-owned) threads inside VHOST_VDPA_GET_STATUS right now
#define CFG_ACTIVITY_RATE 4    // refill of the activity, interrupt and watched-register buckets, per s per VM
#define CFG_ACTIVITY_BURST 5
#define CFG_ACTIVITY_INTERVAL 6  // ns: one event per MSI vector / notify address / identical
                                 // write or ISR read of a watched register per interval
#define CFG_ACTIVITY_DISCOVERY 7 // 1: unwatched MSIs and kicks are forwarded (activity discovery)
#define CFG_CONFIG_RATE 8      // refill of the config bucket (PCI config-space changes), per s per VM
#define CFG_CONFIG_BURST 9
#define CFG_ECAM_LO 10         // lowest base and highest end of all VMs' ECAM windows (userspace):
#define CFG_ECAM_HI 11         // other MMIO accesses skip the per-VM window lookup (the kernel
                               // only widens them, on a decoded PCIEXBAR write)
#define CFG_PCIEXBAR 12        // 1: a config write to 00:00.0 +0x60 (q35 MCH PCIEXBAR) sets the
                               // VM's ECAM window here, before userspace's WatchEcam arrives
#define CFG_DEVBAR_LO 13       // span of all VMs' virtio BAR windows (userspace, like the ECAM span)
#define CFG_DEVBAR_HI 14
#define CFG_WATCH_LO 15        // span of all VMs' watched MMIO registers (userspace): an MMIO
#define CFG_WATCH_HI 16        // access outside every span that no pattern matches is counted
                               // unwatched before its value is read or a map looked up
#define CFG_N 17

// token buckets per VM (take_token; `buckets` keyed by VM and kind)
#define B_DISCOVERY 0   // status-register candidates (CFG_DISCOVERY_*)
#define B_ACTIVITY 1    // unwatched MSIs and kicks
#define B_IRQ 2         // watched vectors / GSIs: a busy device's line must not
                        // starve the registers (an INTx / mmio line also carries queue interrupts)
#define B_WATCHED 3     // changes of watched non-status registers: a VM with many
                        // busy queues drains its activity bucket, and a re-initialising driver's
                        // msix_config writes must still pass
#define B_CONFIG 4      // changes of PCI configuration space (CFG_CONFIG_*): a firmware or OS
                        // enumeration is a burst of a few hundred to a few thousand
#define B_KINDS 5

#define SPACE_NOTIFY 2    // candidates-map key space of queue notify addresses (never watched)

// legacy PCI configuration mechanism #1: a 4-byte write to 0xcf8 latches
// enable (bit 31) | bus (23:16) | device (15:11) | function (10:8) | register (7:2); an access to
// 0xcfc..0xcff then reaches that register + (port & 3)
#define PCI_CONFIG_ADDRESS 0xcf8
#define PCI_CONFIG_DATA 0xcfc

struct event {
    u64 ts;
    u64 addr;       // gpa / port / MSI address / GSI / apicid / fd
    u64 value;      // access value / MSI data / level / vector / status byte
    u32 tgid;
    u32 tid;
    u32 repeats;
    u32 size;       // access size; delivery mode for APIC
    u8 type;
    u8 op;
    u8 space;
    u8 reg;
    u32 pad;
};

struct reg_key {
    u32 tgid;
    u32 space;
    u64 addr;
};

// last forwarded (value, op) of a register and how many identical accesses were folded since
struct reg_state {
    u64 last;
    u32 repeats;
    u8 op;
    u8 valid;
    u8 size;        // cfg_state only: the access size is part of "identical"
    u8 pad;
};

struct watch_val {
    struct reg_state st;
    u32 reg;        // agent.events.Register
    u32 fwd_ms;     // non-status: when the last event was forwarded (ktime >> 20, wraps; ~1 ms units)
};

struct bucket_key {
    u32 tgid;
    u32 which;      // B_*
};

struct bucket {
    u64 stamp_ns;
    u64 tokens;
};

struct irq_key {
    u32 tgid;
    u32 kind;
    u32 num;
    u32 pad;
};

struct inflight {
    u64 arg;
    u64 fd;
};

// a VM's ECAM (MMCONFIG) window, written by userspace (Capture.watch_ecam)
struct ecam_window {
    u64 base;
    u64 size;
};

BPF_RINGBUF_OUTPUT(events, RINGBUF_PAGES);
BPF_HASH(watch, struct reg_key, struct watch_val, WATCH_ENTRIES);
BPF_TABLE("lru_hash", struct reg_key, struct reg_state, candidates, CAND_ENTRIES);
BPF_TABLE("lru_hash", struct bucket_key, struct bucket, buckets, B_KINDS * VM_ENTRIES);
BPF_TABLE("lru_hash", u32, u8, tracked, VM_ENTRIES);
BPF_TABLE("lru_hash", struct irq_key, u64, irq_seen, CAND_ENTRIES);
// (VMM, vector) of an MSI activity discovery just forwarded: its LAPIC delivery is forwarded too
BPF_TABLE("lru_hash", struct irq_key, u64, apic_pending, VM_ENTRIES);
BPF_HASH(irq_watch, struct irq_key, u8, IRQ_ENTRIES);
BPF_TABLE("lru_hash", u64, struct inflight, inflight_ioctl, INFLIGHT_ENTRIES);
// PCI configuration space: each VM's 0xcf8 latch, its ECAM window, and the last forwarded
// (value, op, size) per (VM, config address)
BPF_TABLE("lru_hash", u32, u32, cf8_latch, VM_ENTRIES);
BPF_HASH(ecam, u32, struct ecam_window, VM_ENTRIES);
// per VM: the span of its virtio functions' memory BARs (userspace, from the device model).
// An unwatched 2- or 4-byte write there is forwarded with its value: a driver programs its
// MSI-X table and msix_config right after reading the capability, before a watch can land.
BPF_HASH(devbar, u32, struct ecam_window, VM_ENTRIES);
// the same, kernel-owned: the first page of each memory BAR the guest assigns to a virtio
// function (devbar_from_bar). Apart from `devbar` so that userspace, whose model lags the guest
// by a poll, never overwrites a widening it has not seen yet (the guest writes its MSI-X table
// within milliseconds of assigning the BAR).
BPF_HASH(devbar_k, u32, struct ecam_window, VM_ENTRIES);
// (VMM, bus << 8 | dev << 3 | fn) of functions whose vendor id read 0x1af4 (virtio): a memory
// BAR the guest assigns to one joins the VM's devbar span at once (devbar_from_bar); and
// (VMM, Q35_MCH_MARK) when its 00:00.0 read as a Q35 MCH (8086:29c0): PCIEXBAR is decoded
#define Q35_MCH_MARK 0x10000
BPF_TABLE("lru_hash", u64, u8, virtio_fns, 8 * VM_ENTRIES);  // ~8 functions a VM
BPF_TABLE("lru_hash", struct reg_key, struct reg_state, cfg_state, CFG_ENTRIES);
BPF_PERCPU_ARRAY(counters, u64, C_NCOUNTERS);
BPF_ARRAY(config, u64, CFG_N);

static __always_inline u64 count(int idx)
{
    u64 *c = counters.lookup(&idx);
    if (!c)
        return 0;
    return ++*c;
}

// Records are submitted without waking the consumer, which drains the ring on its poll
// timeout; only every WAKE_EVERY-th record of a CPU wakes it, so a burst cannot fill the ring
// in between. A wake-up on a sparse record (the consumer has caught up, the default
// adaptive notification) is an irq_work, a self-IPI: on a nested host that costs
// microseconds, more than the whole program (docs/benchmarks.md §4).
#ifndef WAKE_EVERY
#define WAKE_EVERY 64
#endif
static __always_inline void ringbuf_commit(struct event *e)
{
    u64 n = count(C_FORWARDED);
    events.ringbuf_submit(e, n % WAKE_EVERY ? BPF_RB_NO_WAKEUP : BPF_RB_FORCE_WAKEUP);
}

static __always_inline u64 cfg(int idx)
{
    u64 *v = config.lookup(&idx);
    return v ? *v : 0;
}

static __always_inline struct event *reserve(u8 type)
{
    struct event *e = events.ringbuf_reserve(sizeof(struct event));
    if (!e) {
        count(C_RINGBUF_FULL);
        return 0;
    }
    u64 pt = bpf_get_current_pid_tgid();
    e->ts = bpf_ktime_get_ns();
    e->tgid = pt >> 32;
    e->tid = (u32)pt;
    e->type = type;
    e->addr = 0;
    e->value = 0;
    e->repeats = 0;
    e->size = 0;
    e->op = 0;
    e->space = 0;
    e->reg = 0;
    e->pad = 0;
    return e;
}

static __always_inline void submit(struct event *e)
{
    u32 tgid = e->tgid;
    u8 one = 1;
    ringbuf_commit(e);
    if (!tracked.lookup(&tgid))
        tracked.update(&tgid, &one);
}

// token bucket per VM (tokens scaled by 1e9 to stay in integers): `which` is B_DISCOVERY
// (status-register candidates), B_CONFIG (PCI configuration-space changes), B_ACTIVITY
// (unwatched MSIs and kicks), B_IRQ (watched interrupts) or B_WATCHED (changes of watched
// non-status registers); the last three have the activity rate and burst
static __always_inline int take_token(u32 tgid, int which)
{
    int rate_slot = CFG_ACTIVITY_RATE, burst_slot = CFG_ACTIVITY_BURST;
    if (which == B_DISCOVERY) {
        rate_slot = CFG_DISCOVERY_RATE;
        burst_slot = CFG_DISCOVERY_BURST;
    } else if (which == B_CONFIG) {
        rate_slot = CFG_CONFIG_RATE;
        burst_slot = CFG_CONFIG_BURST;
    }
    u64 rate = cfg(rate_slot);
    if (rate == 0)
        return 0;
    u64 cap = cfg(burst_slot) * 1000000000ULL;
    u64 now = bpf_ktime_get_ns();
    struct bucket_key bk = {.tgid = tgid, .which = which};
    struct bucket *b = buckets.lookup(&bk);
    if (!b) {
        struct bucket nb = {.stamp_ns = now, .tokens = cap - 1000000000ULL};
        buckets.update(&bk, &nb);
        return 1;
    }
    u64 tokens = b->tokens + (now - b->stamp_ns) * rate;
    if (tokens > cap)
        tokens = cap;
    b->stamp_ns = now;
    if (tokens < 1000000000ULL) {
        b->tokens = tokens;
        return 0;
    }
    b->tokens = tokens - 1000000000ULL;
    return 1;
}

// the activity interval in ~1 ms units (ktime >> 20), at least 1
static __always_inline u32 interval_units(void)
{
    u32 u = (u32)(cfg(CFG_ACTIVITY_INTERVAL) >> 20);
    return u ? u : 1;
}

// the shape of an MMIO status access: modern common cfg device_status (1 byte), or virtio-mmio
// Status (32-bit at base + 0x70; bases are 0x200-aligned)
static __always_inline int mmio_status_shaped(u64 addr, u32 size)
{
    return size == 1 || (size == 4 && (addr & 0x1ff) == 0x70);
}

// the shape of a queue kick: modern virtio-pci notify is a 16-bit write of the queue index,
// virtio-mmio QueueNotify a 32-bit write at +0x50
static __always_inline int mmio_kick_shaped(u8 op, u64 addr, u32 size)
{
    return op == OP_WRITE && (size == 2 || (size == 4 && (addr & 0x1ff) == 0x50));
}

// does an unwatched access look like a virtio status register access?
static __always_inline int is_candidate(u32 space, u64 addr, u32 size, u64 value)
{
    if (value > 0xff || (value & 0x30))
        return 0;   // not a status value (0x10 and 0x20 are reserved)
    if (space == SPACE_PIO)     // legacy virtio-pci status: 1 byte at I/O BAR + 18
        return size == 1 && addr >= cfg(CFG_PIO_MIN_PORT);
    return mmio_status_shaped(addr, size);
}

static __always_inline void handle_notify(u64 gpa, struct watch_val *w);

// a reserved EV_ACCESS record, filled but for `repeats` (0 if the ring buffer is full)
static __always_inline struct event *access_event(u32 space, u8 op, u64 addr, u32 size,
                                                  u64 value, u32 reg)
{
    struct event *e = reserve(EV_ACCESS);
    if (!e)
        return 0;
    e->space = space;
    e->op = op;
    e->addr = addr;
    e->size = size;
    e->value = value;
    e->reg = reg;
    return e;
}

// An unwatched access that could be a status register: forwarded on change, within the VM's
// discovery bucket. A new address is only put into the shared `candidates` LRU once it got a
// token, so that a guest sweeping addresses cannot evict the state of other VMs faster than
// its bucket allows.
static __always_inline void handle_candidate(struct reg_key *k, u8 op, u32 size, u64 value,
                                             int which)
{
    struct reg_state *st = candidates.lookup(k);
    if (st && st->valid && st->last == value && st->op == op) {
        __sync_fetch_and_add(&st->repeats, 1);
        count(C_REPEAT);
        return;
    }
    if (!take_token(k->tgid, which)) {
        count(C_RATE_LIMITED);
        if (which == B_WATCHED)
            count(C_WATCHED_RATE_LIMITED);
        return;
    }
    struct event *e = access_event(k->space, op, k->addr, size, value, 0);
    if (!e)
        return;     // state untouched: the next identical access retries
    if (st) {
        e->repeats = st->repeats;
        st->repeats = 0;
        st->last = value;
        st->op = op;
        st->valid = 1;
    } else {
        struct reg_state z = {};
        z.last = value;
        z.op = op;
        z.valid = 1;
        if (candidates.update(k, &z) != 0)
            count(C_CANDIDATE_MAP_FULL);
    }
    submit(e);
}

// Widen a global span (config slots lo_slot/hi_slot: the lowest base and highest end of all
// VMs' windows of one map, which spares other accesses a per-VM lookup) to cover [base, end).
// Never shrunk here: other VMs' windows may be in it; userspace recomputes the exact span
// from the map.
static __always_inline void widen_span(int lo_slot, int hi_slot, u64 base, u64 end)
{
    u64 *lo = config.lookup(&lo_slot), *hi = config.lookup(&hi_slot);
    if (!lo || !hi)
        return;
    if (*hi == 0 || base < *lo)
        *lo = base;     // an empty span (hi 0) starts at this window
    if (end > *hi)
        *hi = end;
}

// q35 MCH PCIEXBAR (00:00.0 +0x60, low dword): bit 0 enable, bits 2:1 length (0 = 256 MiB,
// 1 = 128 MiB, 2 = 64 MiB, 3 reserved: ignored), base in the bits above the length. SeaBIOS
// uses the window right after writing it, before userspace could install it: set (or delete)
// the VM's window here, 32-bit base (the high dword at +0x64 is taken as 0), and widen the
// global span to cover it (never shrink: other VMs' windows may be in it; userspace recomputes
// the exact span from the map on its next watch_ecam / exit).
static __always_inline void decode_pciexbar(u32 tgid, u32 value)
{
    u32 len = (value >> 1) & 3;
    if (len == 3)
        return;
    if (!(value & 1)) {
        ecam.delete(&tgid);
        return;
    }
    struct ecam_window win = {};
    win.size = (256ULL << 20) >> len;
    win.base = value & ~(u32)(win.size - 1);
    struct ecam_window *cur = ecam.lookup(&tgid);
    if (cur && cur->base == win.base && cur->size == win.size)
        return;
    if (ecam.update(&tgid, &win) != 0) {
        count(C_CANDIDATE_MAP_FULL);   // the ecam hash is full
        return;
    }
    widen_span(CFG_ECAM_LO, CFG_ECAM_HI, win.base, win.base + win.size);
}

// A driver programs its MSI-X table and common configuration right after it assigned the BAR
// (the lab guest within 2 ms): too soon for userspace's WatchDeviceBars. So the kernel adds the
// first page of a virtio function's newly assigned memory BAR to the VM's span itself (widening
// only); userspace later sets the exact span from its device model.
static __always_inline void devbar_from_bar(u32 tgid, u64 addr, u64 value)
{
    u64 key = (u64)tgid << 32 | ((addr >> 12) & 0xffff);
    if (!virtio_fns.lookup(&key) || (value & 1) || value == 0xffffffff || !(value & ~0xfULL))
        return;
    u64 base = value & ~0xfULL, end = base + 4096;
    struct ecam_window *cur = devbar_k.lookup(&tgid);
    struct ecam_window win = {.base = base, .size = 4096};
    if (cur) {
        u64 lo = cur->base < base ? cur->base : base;
        u64 hi = cur->base + cur->size > end ? cur->base + cur->size : end;
        win.base = lo;
        win.size = hi - lo;
    }
    if (devbar_k.update(&tgid, &win) != 0)
        return;
    widen_span(CFG_DEVBAR_LO, CFG_DEVBAR_HI, win.base, win.base + win.size);
}

// A PCI configuration-space access (through 0xcf8/0xcfc or an ECAM window): forwarded when
// (value, op, size) differs from the last one forwarded for that config address of the VM;
// identical ones are folded into the next event's `repeats`. A change needs a token of the VM's
// config bucket. Per config address, not per port: two functions with the same ids, read one
// after the other, are both forwarded. A PCIEXBAR write is decoded first (CFG_PCIEXBAR), virtio
// functions and their BAR assignments are noted (devbar_from_bar).
static __always_inline void handle_config(u32 tgid, u8 op, u64 addr, u32 size, u64 value)
{
    u32 reg_off = addr & 0xfff;
    if (addr == 0x60 && size == 4 && op == OP_WRITE && cfg(CFG_PCIEXBAR)) {
        // only on a Q35 MCH (its ids read at 00:00.0 first, as firmware does to detect it):
        // 00:00.0 +0x60 is another register on other host bridges (i440FX: DRAM rows)
        u64 mch = (u64)tgid << 32 | Q35_MCH_MARK;
        if (virtio_fns.lookup(&mch))
            decode_pciexbar(tgid, value);
    }
    if (addr == 0 && op == OP_READ && size == 4 && value == 0x29c08086) {
        u64 mch = (u64)tgid << 32 | Q35_MCH_MARK;
        u8 one = 1;
        virtio_fns.update(&mch, &one);
    }
    if (reg_off == 0 && op == OP_READ && size >= 2 && (value & 0xffff) == 0x1af4) {
        u64 key = (u64)tgid << 32 | ((addr >> 12) & 0xffff);
        u8 one = 1;
        virtio_fns.update(&key, &one);
    } else if (op == OP_WRITE && size == 4 && reg_off >= 0x10 && reg_off <= 0x24) {
        devbar_from_bar(tgid, addr, value);
    }
    struct reg_key k = {};
    k.tgid = tgid;
    k.space = SPACE_PCICFG;
    k.addr = addr;
    struct reg_state *st = cfg_state.lookup(&k);
    if (st && st->valid && st->last == value && st->op == op && st->size == size) {
        __sync_fetch_and_add(&st->repeats, 1);
        count(C_REPEAT);
        return;
    }
    if (!take_token(tgid, B_CONFIG)) {
        count(C_RATE_LIMITED);
        count(C_CONFIG_RATE_LIMITED);
        return;     // state untouched: a later access equal to the last forwarded one folds
    }
    struct event *e = access_event(SPACE_PCICFG, op, addr, size, value, 0);
    if (!e)
        return;     // state untouched: the next identical access retries
    if (st) {
        e->repeats = st->repeats;
        st->repeats = 0;
        st->last = value;
        st->op = op;
        st->size = size;
        st->valid = 1;
    } else {
        struct reg_state z = {};
        z.last = value;
        z.op = op;
        z.size = size;
        z.valid = 1;
        if (cfg_state.update(&k, &z) != 0)
            count(C_CANDIDATE_MAP_FULL);
    }
    count(C_CONFIG_FORWARDED);
    submit(e);
}

// Ports 0xcf8..0xcff: a 4-byte write to 0xcf8 sets the VM's latch (not forwarded); an access
// to 0xcfc..0xcff with the latch enabled is a config-space access. Returns 1 if it consumed
// the access (anything else, e.g. 0xcf9 reset control, goes the usual way).
static __always_inline int handle_pci_port(u32 tgid, u8 op, u64 port, u32 size, u64 value)
{
    if (port == PCI_CONFIG_ADDRESS) {
        if (op != OP_WRITE || size != 4)
            return 0;
        u32 latch = value;
        u32 *cur = cf8_latch.lookup(&tgid);
        if (cur)
            *cur = latch;
        else
            cf8_latch.update(&tgid, &latch);
        return 1;
    }
    if (port < PCI_CONFIG_DATA)
        return 0;
    u32 *latch = cf8_latch.lookup(&tgid);
    if (!latch)
        return 0;
    u32 l = *latch;
    if (!(l & 0x80000000))
        return 0;
    handle_config(tgid, op, (u64)((l >> 8) & 0xffff) << 12 | (l & 0xfc) | (port & 3), size,
                  value);
    return 1;
}

static __always_inline void handle_access(u32 space, u8 op, u64 addr, u32 size, u64 value)
{
    struct reg_key k = {};
    k.tgid = bpf_get_current_pid_tgid() >> 32;
    k.space = space;
    k.addr = addr;

    // the port compare first: every other port goes straight to the watch lookup
    if (space == SPACE_PIO && (addr & ~7ULL) == PCI_CONFIG_ADDRESS &&
        handle_pci_port(k.tgid, op, addr, size, value))
        return;

    struct watch_val *w = watch.lookup(&k);
    if (!w) {
        // the VM's ECAM window, if userspace gave one: config-space accesses
        if (space == SPACE_MMIO && addr >= cfg(CFG_ECAM_LO) && addr < cfg(CFG_ECAM_HI)) {
            struct ecam_window *win = ecam.lookup(&k.tgid);
            if (win && addr - win->base < win->size) {
                handle_config(k.tgid, op, addr - win->base, size, value);
                return;
            }
        }
        // a write in the VM's virtio BARs (MSI-X table, common cfg): forwarded with its value,
        // changes only, within the watched-register bucket
        if (space == SPACE_MMIO && op == OP_WRITE && (size == 2 || size == 4) &&
            addr >= cfg(CFG_DEVBAR_LO) && addr < cfg(CFG_DEVBAR_HI)) {
            struct ecam_window *bars = devbar.lookup(&k.tgid);
            if (!(bars && addr - bars->base < bars->size))
                bars = devbar_k.lookup(&k.tgid);
            if (bars && addr - bars->base < bars->size) {
                handle_candidate(&k, op, size, value, B_WATCHED);
                return;
            }
        }
        // queue kicks (an ioeventfd: kvm_fast_mmio where KVM has that path, else here). Other
        // 16-bit writes (queue setup) pass here too: correlation ignores addresses it cannot
        // place; the activity bucket bounds them all.
        if (space == SPACE_MMIO && mmio_kick_shaped(op, addr, size)) {
            handle_notify(addr, 0);
            return;
        }
        if (!is_candidate(space, addr, size, value)) {
            count(C_UNWATCHED);
            return;
        }
        handle_candidate(&k, op, size, value, B_DISCOVERY);
        return;
    }

    u32 reg = w->reg;
    if (reg == REG_QUEUE_NOTIFY && space == SPACE_MMIO && op == OP_WRITE) {
        handle_notify(addr, w);     // a kick, whichever way KVM traced it
        return;
    }
    struct reg_state *st = &w->st;
    int identical = st->valid && st->last == value && st->op == op;
    u32 now_ms = 0;
    if (reg == REG_STATUS) {
        // status: every change forwarded, identical accesses folded
        if (identical) {
            __sync_fetch_and_add(&st->repeats, 1);
            count(C_REPEAT);
            return;
        }
    } else {
        // Other watched registers (msix_config, InterruptACK, config_generation, ISR, ...).
        // An identical access is folded; an identical write or ISR read is still forwarded once
        // per activity interval: a driver writes InterruptACK and reads ISR on every interrupt,
        // mostly with the same value, and these are the progress evidence of an INTx /
        // virtio-mmio device. A change needs a token of the VM's watched-register bucket, which
        // the identical ones never drain (a config interrupt's ACK still passes while a busy
        // device acks its queue interrupts); not for ISR reads: the device sets ISR, not the
        // guest.
        now_ms = (u32)(bpf_ktime_get_ns() >> 20);
        if (identical) {
            if ((op == OP_READ && reg != REG_ISR) || now_ms - w->fwd_ms < interval_units()) {
                __sync_fetch_and_add(&st->repeats, 1);
                count(C_REPEAT);
                return;
            }
        } else if (!(reg == REG_ISR && op == OP_READ) && !take_token(k.tgid, B_WATCHED)) {
            count(C_RATE_LIMITED);
            count(C_WATCHED_RATE_LIMITED);
            return;
        }
    }
    struct event *e = access_event(space, op, addr, size, value, reg);
    if (!e)
        return;     // state untouched: the next identical access retries
    e->repeats = st->repeats;
    st->repeats = 0;
    st->last = value;
    st->op = op;
    st->valid = 1;
    if (reg != REG_STATUS)
        w->fwd_ms = now_ms;
    submit(e);
}

static __always_inline int irq_watched(u32 kind, u32 num)
{
    struct irq_key k = {};
    k.tgid = bpf_get_current_pid_tgid() >> 32;
    k.kind = kind;
    k.num = num;
    if (irq_watch.lookup(&k))
        return 1;
    k.tgid = 0;
    return irq_watch.lookup(&k) != 0;
}

static __always_inline int irq_interesting(u32 kind, u32 num)
{
    struct irq_key k = {};
    k.tgid = bpf_get_current_pid_tgid() >> 32;
    k.kind = kind;
    k.num = num;
    if (irq_watch.lookup(&k))
        return 1;
    k.tgid = 0;     // tgid 0: watched for every VMM
    if (irq_watch.lookup(&k))
        return 1;
    count(C_UNINTERESTING_IRQ);
    return 0;
}

// An MMIO access nothing can concern, decided from gpa and len before the value is read or a
// map looked up: outside the watched, ECAM and device-BAR spans, and shaped neither like a kick
// nor like a status access (handle_access's paths for an unwatched access).
static __always_inline int mmio_outside(u8 op, u32 len, u64 gpa)
{
    if (mmio_status_shaped(gpa, len) || mmio_kick_shaped(op, gpa, len))
        return 0;
    if (gpa >= cfg(CFG_WATCH_LO) && gpa < cfg(CFG_WATCH_HI))
        return 0;
    if (gpa >= cfg(CFG_ECAM_LO) && gpa < cfg(CFG_ECAM_HI))
        return 0;
    return !(op == OP_WRITE && gpa >= cfg(CFG_DEVBAR_LO) && gpa < cfg(CFG_DEVBAR_HI));
}

// kvm_mmio's first steps; 1 if that was all: an "unsatisfied-read" (the completed read follows
// with the value) or an access outside everything
static __always_inline int mmio_done_early(u32 type, u32 len, u64 gpa)
{
    if (type == 0) {
        count(C_UNSATISFIED_READ);
        return 1;
    }
    if (mmio_outside(type == 2 ? OP_WRITE : OP_READ, len, gpa)) {
        count(C_UNWATCHED);
        return 1;
    }
    return 0;
}

// A queue kick (fast MMIO ioeventfd, or a virtio-mmio QueueNotify write). Kicks come as fast
// as the guest likes, so per address at most one is forwarded per CFG_ACTIVITY_INTERVAL (the
// rest are folded into the next one's `repeats`); unwatched addresses also need a token of the
// VM's activity bucket, taken before a new address goes into the shared `candidates` LRU (a
// guest sweeping addresses cannot evict other VMs' state faster than its bucket allows).
// Correlation uses them to tell a device that is still driven from one that is idle.
// `w`: the address's watch entry (0 if unwatched).
static __always_inline void handle_notify(u64 gpa, struct watch_val *w)
{
    struct reg_key k = {};
    k.tgid = bpf_get_current_pid_tgid() >> 32;
    k.space = SPACE_NOTIFY;
    k.addr = gpa;
    struct reg_state *st;
    int candidate = 0;
    if (w) {
        st = &w->st;
    } else {
        if (!cfg(CFG_ACTIVITY_DISCOVERY)) {
            count(C_UNWATCHED);
            return;
        }
        candidate = 1;
        st = candidates.lookup(&k);
    }
    u64 now = bpf_ktime_get_ns();
    if (st && st->valid && now - st->last < cfg(CFG_ACTIVITY_INTERVAL)) {
        __sync_fetch_and_add(&st->repeats, 1);
        count(candidate ? C_ACTIVITY_FOLDED : C_REPEAT);
        return;
    }
    if (candidate && !take_token(k.tgid, B_ACTIVITY)) {
        count(C_RATE_LIMITED);
        return;
    }
    struct event *e = reserve(EV_FAST_MMIO);
    if (!e)
        return;
    e->addr = gpa;
    e->space = SPACE_MMIO;
    e->op = OP_WRITE;
    if (st) {
        e->repeats = st->repeats;
        st->repeats = 0;
        st->last = now;
        st->valid = 1;
    } else {
        struct reg_state z = {};
        z.last = now;
        z.valid = 1;
        if (candidates.update(&k, &z) != 0)
            count(C_CANDIDATE_MAP_FULL);
    }
    if (candidate)
        count(C_ACTIVITY_FORWARDED);
    submit(e);
}

static __always_inline void handle_fast_mmio(u64 gpa)
{
    struct reg_key k = {};
    k.tgid = bpf_get_current_pid_tgid() >> 32;
    k.space = SPACE_MMIO;
    k.addr = gpa;
    handle_notify(gpa, watch.lookup(&k));
}

// An MSI on a vector nobody watches yet: forwarded at most once per vector per interval and
// within the VM's activity bucket, so correlation can learn config vectors (the MSI right
// before a config_generation read) and see queue completions. Only MSIs: LAPIC timer and IPI
// vectors never pass here (they would in kvm_apic_accept_irq).
static __always_inline int msi_discovered(u32 vector)
{
    if (!cfg(CFG_ACTIVITY_DISCOVERY))
        return 0;
    struct irq_key k = {};
    k.tgid = bpf_get_current_pid_tgid() >> 32;
    k.kind = IRQ_KIND_VECTOR;
    k.num = vector;
    u64 now = bpf_ktime_get_ns();
    u64 *last = irq_seen.lookup(&k);
    if (last && now - *last < cfg(CFG_ACTIVITY_INTERVAL)) {
        count(C_ACTIVITY_FOLDED);
        return 0;
    }
    if (!take_token(k.tgid, B_ACTIVITY)) {
        count(C_RATE_LIMITED);
        return 0;
    }
    irq_seen.update(&k, &now);
    apic_pending.update(&k, &now);
    count(C_ACTIVITY_FORWARDED);
    return 1;
}

// The LAPIC delivery right after an MSI that activity discovery forwarded (same VMM, vector,
// within APIC_AFTER_MSI_NS), once: correlation trusts an interrupt only with its delivery
// (split-irqchip VMMs inject MSIs that are never delivered), and learns a config vector from
// the delivery right before the first NEEDS_RESET read, before it can watch the vector.
#define APIC_AFTER_MSI_NS 1000000ULL
static __always_inline int apic_after_discovered_msi(u32 vector)
{
    if (!cfg(CFG_ACTIVITY_DISCOVERY))
        return 0;   // nothing discovered: no LRU lookup on every delivery
    struct irq_key k = {};
    k.tgid = bpf_get_current_pid_tgid() >> 32;
    k.kind = IRQ_KIND_VECTOR;
    k.num = vector;
    u64 *at = apic_pending.lookup(&k);
    if (!at)
        return 0;
    u64 then = *at;
    apic_pending.delete(&k);
    return bpf_ktime_get_ns() - then < APIC_AFTER_MSI_NS;
}

// A watched vector or GSI (a config interrupt, or a device's INTx / mmio line) still needs a
// token of the VM's interrupt bucket: a guest can send itself IPIs on its config vector as fast
// as it likes. Genuine config interrupts are rare (the burst covers them); a busy line drains
// only this bucket, never the one the device's registers need.
static __always_inline int irq_token(void)
{
    if (take_token(bpf_get_current_pid_tgid() >> 32, B_IRQ))
        return 1;
    count(C_RATE_LIMITED);
    count(C_IRQ_RATE_LIMITED);
    return 0;
}

static __always_inline void handle_msi(u64 address, u64 data)
{
    if (irq_watched(IRQ_KIND_VECTOR, data & 0xff)) {
        if (!irq_token())
            return;
    } else if (!msi_discovered(data & 0xff)) {
        count(C_UNINTERESTING_IRQ);
        return;
    }
    struct event *e = reserve(EV_MSI);
    if (!e)
        return;
    e->addr = address;
    e->value = data;
    submit(e);
}

static __always_inline void handle_set_irq(u32 gsi, int level)
{
    if (!irq_interesting(IRQ_KIND_GSI, gsi) || !irq_token())
        return;
    struct event *e = reserve(EV_IRQ);
    if (!e)
        return;
    e->addr = gsi;
    e->value = (u64)(s64)level;
    submit(e);
}

static __always_inline void handle_apic(u32 apicid, u32 dm, u32 vec)
{
    // the delivery of an MSI activity discovery forwarded: that MSI already took a token
    if (!apic_after_discovered_msi(vec) &&
        (!irq_interesting(IRQ_KIND_VECTOR, vec) || !irq_token()))
        return;
    struct event *e = reserve(EV_APIC);
    if (!e)
        return;
    e->addr = apicid;
    e->value = vec;
    e->size = dm;
    submit(e);
}

static __always_inline void handle_exit(int group_dead)
{
    if (!group_dead)
        return;
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    if (!tracked.lookup(&tgid))
        return;
    tracked.delete(&tgid);
    for (u32 which = 0; which < B_KINDS; which++) {
        struct bucket_key bk = {.tgid = tgid, .which = which};
        buckets.delete(&bk);
    }
    struct event *e = events.ringbuf_reserve(sizeof(struct event));
    if (!e) {
        count(C_RINGBUF_FULL);
        return;
    }
    __builtin_memset(e, 0, sizeof(*e));
    e->ts = bpf_ktime_get_ns();
    e->tgid = tgid;
    e->tid = (u32)bpf_get_current_pid_tgid();
    e->type = EV_EXIT;
    ringbuf_commit(e);
}

// read a 1/2/4/8-byte little-endian value the tracepoint passes by pointer
static __always_inline u64 read_sized(const void *p, u32 len)
{
    u64 v = 0;
    int rc = 0;
    if (!p)
        return 0;
    if (len == 1) {
        u8 b = 0;
        rc = bpf_probe_read_kernel(&b, sizeof(b), p);
        v = b;
    } else if (len == 2) {
        u16 h = 0;
        rc = bpf_probe_read_kernel(&h, sizeof(h), p);
        v = h;
    } else if (len == 4) {
        u32 w = 0;
        rc = bpf_probe_read_kernel(&w, sizeof(w), p);
        v = w;
    } else {
        rc = bpf_probe_read_kernel(&v, sizeof(v), p);
    }
    if (rc != 0)
        count(C_KERNEL_READ_ERROR);
    return v;
}

#ifdef FAM_MMIO
#if RAW_TP
int rtp_kvm_mmio(struct bpf_raw_tracepoint_args *ctx)
{
    // TP_PROTO(int type, int len, u64 gpa, const void *val)
    u32 type = ctx->args[0];
    u32 len = ctx->args[1];
    u64 gpa = ctx->args[2];
    if (mmio_done_early(type, len, gpa))
        return 0;
    handle_access(SPACE_MMIO, type == 2 ? OP_WRITE : OP_READ, gpa, len,
                  read_sized((const void *)ctx->args[3], len));
    return 0;
}
#else
TRACEPOINT_PROBE(kvm, kvm_mmio)
{
    u32 type = args->type;
    if (mmio_done_early(type, args->len, args->gpa))
        return 0;
    handle_access(SPACE_MMIO, type == 2 ? OP_WRITE : OP_READ, args->gpa, args->len, args->val);
    return 0;
}
#endif
#endif

#ifdef FAM_PIO
#if RAW_TP
int rtp_kvm_pio(struct bpf_raw_tracepoint_args *ctx)
{
    // TP_PROTO(unsigned int rw, unsigned int port, unsigned int size, unsigned int count,
    //          const void *data); the value of the first element, like the tracepoint's `val`
    u32 size = ctx->args[2];
    u64 val = read_sized((const void *)ctx->args[4], size > 4 ? 4 : size);
    handle_access(SPACE_PIO, ctx->args[0] ? OP_WRITE : OP_READ, (u32)ctx->args[1], size, val);
    return 0;
}
#else
TRACEPOINT_PROBE(kvm, kvm_pio)
{
    handle_access(SPACE_PIO, args->rw ? OP_WRITE : OP_READ, args->port, args->size, args->val);
    return 0;
}
#endif
#endif

#ifdef FAM_FAST_MMIO
#if RAW_TP
int rtp_kvm_fast_mmio(struct bpf_raw_tracepoint_args *ctx)
{
    handle_fast_mmio(ctx->args[0]);
    return 0;
}
#else
TRACEPOINT_PROBE(kvm, kvm_fast_mmio)
{
    handle_fast_mmio(args->gpa);
    return 0;
}
#endif
#endif

#ifdef FAM_MSI
#if RAW_TP
int rtp_kvm_msi_set_irq(struct bpf_raw_tracepoint_args *ctx)
{
    handle_msi(ctx->args[0], ctx->args[1]);
    return 0;
}
#else
TRACEPOINT_PROBE(kvm, kvm_msi_set_irq)
{
    handle_msi(args->address, args->data);
    return 0;
}
#endif
#endif

#ifdef FAM_GSI
#if RAW_TP
int rtp_kvm_set_irq(struct bpf_raw_tracepoint_args *ctx)
{
    handle_set_irq(ctx->args[0], (int)ctx->args[1]);
    return 0;
}
#else
TRACEPOINT_PROBE(kvm, kvm_set_irq)
{
    handle_set_irq(args->gsi, args->level);
    return 0;
}
#endif
#endif

#ifdef FAM_APIC
#if RAW_TP
int rtp_kvm_apic_accept_irq(struct bpf_raw_tracepoint_args *ctx)
{
    // TP_PROTO(__u32 apicid, __u16 dm, __u16 tm, __u8 vec)
    handle_apic(ctx->args[0], (u16)ctx->args[1], (u8)ctx->args[3]);
    return 0;
}
#else
TRACEPOINT_PROBE(kvm, kvm_apic_accept_irq)
{
    handle_apic(args->apicid, args->dm, args->vec);
    return 0;
}
#endif
#endif

#ifdef FAM_EXIT
#if RAW_TP
int rtp_sched_process_exit(struct bpf_raw_tracepoint_args *ctx)
{
    // TP_PROTO(struct task_struct *p, bool group_dead); p is current
    handle_exit((u8)ctx->args[1]);
    return 0;
}
#else
TRACEPOINT_PROBE(sched, sched_process_exit)
{
    handle_exit(args->group_dead);
    return 0;
}
#endif
#endif

#ifdef FAM_IOCTL
// ioctl numbers: type in bits 8..15, number in bits 0..7 (size and direction ignored)
#define IOC_TYPE(c) (((c) >> 8) & 0xff)
#define IOC_NR(c) ((c) & 0xff)
#define VHOST_VIRTIO 0xAF
#define KVMIO 0xAE
#define VHOST_VDPA_GET_STATUS_NR 0x71
#define VHOST_VDPA_SET_STATUS_NR 0x72

static __always_inline void emit_vhost_status(u8 op, u64 fd, u64 uptr)
{
    u8 status = 0;
    if (bpf_probe_read_user(&status, 1, (const void *)uptr) != 0) {
        count(C_USER_READ_ERROR);
        return;
    }
    struct event *e = reserve(EV_VHOST_STATUS);
    if (!e)
        return;
    e->op = op;
    e->addr = fd;
    e->value = status;
    e->size = 1;
    submit(e);
}

TRACEPOINT_PROBE(syscalls, sys_enter_ioctl)
{
    u32 cmd = args->cmd;
    u32 type = IOC_TYPE(cmd);
    if (type == KVMIO) {
        switch (IOC_NR(cmd)) {
        case 0xa5: count(C_KVM_SIGNAL_MSI); break;
        case 0x76: count(C_KVM_IRQFD); break;
        case 0x79: count(C_KVM_IOEVENTFD); break;
        case 0x6a: count(C_KVM_SET_GSI_ROUTING); break;
        }
        return 0;
    }
    if (type != VHOST_VIRTIO)
        return 0;
    count(C_VHOST_IOCTL);
    if (IOC_NR(cmd) == VHOST_VDPA_SET_STATUS_NR) {
        emit_vhost_status(OP_WRITE, args->fd, args->arg);
    } else if (IOC_NR(cmd) == VHOST_VDPA_GET_STATUS_NR) {
        u64 pt = bpf_get_current_pid_tgid();
        struct inflight in = {.arg = args->arg, .fd = args->fd};
        int slot = CFG_INFLIGHT;
        u64 *n = config.lookup(&slot);
        if (inflight_ioctl.update(&pt, &in) != 0)
            count(C_INFLIGHT_FULL);
        else if (n)
            __sync_fetch_and_add(n, 1);
    }
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_exit_ioctl)
{
    // every ioctl of the host ends here (KVM_RUN included): an array read decides cheaply
    int slot = CFG_INFLIGHT;
    u64 *n = config.lookup(&slot);
    if (!n || *n == 0)
        return 0;
    u64 pt = bpf_get_current_pid_tgid();
    struct inflight *in = inflight_ioctl.lookup(&pt);
    if (!in)
        return 0;
    u64 arg = in->arg, fd = in->fd;
    inflight_ioctl.delete(&pt);
    __sync_fetch_and_add(n, -1);
    if (args->ret == 0)
        emit_vhost_status(OP_READ, fd, arg);
    return 0;
}
#endif

#ifdef FAM_VHOST_KPROBE
// vdpa_set_status(struct vdpa_device *vdev, u8 status): in-kernel status writes (vhost-vdpa
// and virtio-vdpa). Only compiled where the symbol exists and kprobes work.
int kp_vdpa_set_status(struct pt_regs *ctx)
{
    struct event *e = reserve(EV_VHOST_STATUS);
    if (!e)
        return 0;
    e->op = OP_WRITE;
    e->addr = (u64)-1;
    e->value = (u8)PT_REGS_PARM2(ctx);
    e->size = 1;
    submit(e);
    return 0;
}
#endif
