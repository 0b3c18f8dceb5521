#include "virtio.h"
#include "pci.h"
#include "irq.h"

struct vdev devs[MAX_DEVS];
int ndevs, nscen;
static u32 extra_type;	/* virtio type of the devices that are not the scenario's (0: none) */

static u8 rings[MAX_DEVS][8192] __attribute__((aligned(4096)));

/* modern common configuration (virtio 1.x 4.1.4.3) */
#define C_DFSEL 0x00
#define C_DF 0x04
#define C_GFSEL 0x08
#define C_GF 0x0c
#define C_MSIX 0x10
#define C_NUMQ 0x12
#define C_STATUS 0x14
#define C_GEN 0x15
#define C_QSEL 0x16
#define C_QSIZE 0x18
#define C_QMSIX 0x1a
#define C_QENABLE 0x1c
#define C_QNOFF 0x1e
#define C_QDESC 0x20
#define C_QAVAIL 0x28
#define C_QUSED 0x30

/* legacy I/O header (virtio 0.9.5) */
#define L_HF 0
#define L_GF 4
#define L_PFN 8
#define L_QNUM 12
#define L_QSEL 14
#define L_NOTIFY 16
#define L_STATUS 18
#define L_ISR 19
#define L_MSIX_CONFIG 20
#define L_MSIX_QUEUE 22

/* virtio-mmio v2 */
#define M_MAGIC 0x00
#define M_VERSION 0x04
#define M_DEVID 0x08
#define M_DF 0x10
#define M_DFSEL 0x14
#define M_GF 0x20
#define M_GFSEL 0x24
#define M_QSEL 0x30
#define M_QNUMMAX 0x34
#define M_QNUM 0x38
#define M_QREADY 0x44
#define M_NOTIFY 0x50
#define M_ISR 0x60
#define M_ACK 0x64
#define M_STATUS 0x70
#define M_QDESC 0x80
#define M_QAVAIL 0x90
#define M_QUSED 0xa0
#define M_GEN 0xfc
#define M_CONFIG 0x100

#define MMIO_WINDOW 0xfeb00000u	/* QEMU microvm: VIRTIO_MMIO_BASE */
#define MMIO_SLOT 0x200
#define MMIO_SLOTS 32

#define VIRTIO_F_VERSION_1_HI 1u	/* bit 32 */

static void setup_msix(struct vdev *d, u64 bars[6])
{
	u32 cap = pci_find_cap(d->bdf, 0x11, 0);
	if (!cap)
		fatal("no_msix_capability");
	u32 tbl = pci_read32(d->bdf, cap + 4);
	u32 base = (u32)bars[tbl & 7] + (tbl & ~7u);
	d->apic_vec_config = (u8)(0x40 + 2 * d->idx);
	d->apic_vec_queue = (u8)(0x41 + 2 * d->idx);
	u16 ctl = pci_read16(d->bdf, cap + 2);
	pci_write16(d->bdf, cap + 2, ctl | 0xc000);	/* enable + function mask while programming */
	for (int e = 0; e < 2; e++) {
		u32 ent = base + 16 * e;
		mw32(ent + 0, 0xfee00000u);	/* destination APIC 0, physical */
		mw32(ent + 4, 0);
		mw32(ent + 8, e ? d->apic_vec_queue : d->apic_vec_config);	/* fixed, edge */
		mw32(ent + 12, 0);		/* unmasked */
	}
	pci_write16(d->bdf, cap + 2, (ctl | 0x8000) & ~0x4000);
	d->msix = 1;
}

/* INTx: the line's IOAPIC entry, edge-triggered (every rising edge is one interrupt: the guest
 * lowers the line by reading the ISR). Devices sharing a line share its vector. */
static void route_intx(struct vdev *d)
{
	if (d->irq_line == 0xff || d->irq_line >= ioapic_pins(IOAPIC1))
		return;
	for (int i = 0; i < ndevs; i++)
		if (devs[i].line_vec && devs[i].irq_line == d->irq_line) {
			d->line_vec = devs[i].line_vec;
			return;
		}
	d->line_vec = (u8)(0x40 + 2 * d->idx);
	ioapic_route(IOAPIC1, d->irq_line, d->line_vec);
}

/* virtio device type of a virtio PCI function: modern ids are 0x1040 + type; transitional
 * (0x1000-0x103f) ones carry it in the subsystem id */
static u32 pci_virtio_type(u32 bdf, u16 id)
{
	return id >= 0x1040 ? id - 0x1040u : pci_read16(bdf, 0x2e);
}

static void add_pci(u32 bdf, u16 id, enum transport t, enum irq_mode irq)
{
	if (ndevs >= MAX_DEVS)
		fatal("too_many_devices");
	struct vdev *d = &devs[ndevs];
	memset(d, 0, sizeof(*d));
	d->idx = ndevs;
	d->t = t;
	d->irq = irq;
	d->bdf = bdf;
	d->pci_devid = id;
	d->type = pci_virtio_type(bdf, id);
	d->extra = extra_type && d->type == extra_type;
	d->ring = rings[ndevs];
	d->msix_config_vec = d->msix_queue_vec = 0xffff;
	u64 bars[6];
	int is_io[6];
	pci_assign_bars(bdf, bars, is_io);
	d->irq_line = pci_intx_irq(bdf);
	if (t == T_LEGACY) {
		if (!is_io[0])
			return;	/* modern-only device: not for the legacy transport */
		d->io = (u16)bars[0];
	} else {
		u32 notify_mult = 0, notify_off = 0;
		for (u32 c = pci_find_cap(bdf, 0x09, 0); c; c = pci_find_cap(bdf, 0x09, c)) {
			u8 cfg_type = pci_read8(bdf, c + 3);
			u8 bar = pci_read8(bdf, c + 4);
			u32 off = pci_read32(bdf, c + 8);
			if (bar > 5)
				continue;
			u32 a = (u32)bars[bar] + off;
			if (cfg_type == 1)
				d->common = a;
			else if (cfg_type == 2) {
				d->notify = a;
				notify_mult = pci_read32(bdf, c + 16);
			} else if (cfg_type == 3)
				d->isr = a;
			else if (cfg_type == 4)
				d->devcfg = a;
		}
		if (!d->common || !d->notify || !d->isr)
			return;	/* legacy-only device: not for the modern transport */
		mw16(d->common + C_QSEL, 0);
		notify_off = mr16(d->common + C_QNOFF);
		d->notify += notify_off * notify_mult;
	}
	if (irq == IRQ_MSIX)
		setup_msix(d, bars);
	else
		route_intx(d);
	ndevs++;
}

/* IOAPICs of QEMU's microvm: the primary at 0xfec00000; with ioapic2 (the default with ACPI) a
 * secondary at 0xfec10000 serving GSI 24-47, one pin per virtio-mmio slot; else slots use
 * GSI 16+. microvm runs a split irqchip: QEMU's IOAPIC raises the pin as kvm_set_irq(pin) on
 * KVM's routing table, whose entry for that number it points at the redirection entry's MSI. */

/* Edge-triggered, fixed, physical destination APIC 0, unmasked: every rising edge of the
 * device's line becomes one interrupt message with this vector (no remote IRR: the guest takes
 * and EOIs interrupts only while it waits for a queue interrupt, irq.c). */
static void route_mmio_irq(struct vdev *d, u32 slot)
{
	u32 base, pin;
	u32 ver2 = ioapic_read(IOAPIC2, 1);
	if (ver2 != 0xffffffffu && ((ver2 >> 16) & 0xff) >= slot) {
		base = IOAPIC2;
		pin = slot;
		/* QEMU (split irqchip) injects it as KVM GSI `pin` (kvm_set_irq), not 24 + pin */
		d->irq_line = (u8)pin;
	} else {
		base = IOAPIC1;
		pin = 16 + slot;
		if (((ioapic_read(IOAPIC1, 1) >> 16) & 0xff) < pin)
			return;	/* no pin for it: polling only */
		d->irq_line = (u8)pin;
	}
	d->apic_vec_config = (u8)(0x40 + 2 * d->idx);
	ioapic_route(base, pin, d->apic_vec_config);
	d->line_vec = d->apic_vec_config;
	d->ioapic_routed = 1;
}

/* scen: 1 = only the scenario's devices, 0 = only the extra ones */
static void discover_mmio(int scen)
{
	for (int i = 0; i < MMIO_SLOTS; i++) {
		u32 base = MMIO_WINDOW + (u32)i * MMIO_SLOT;
		if (mr32(base + M_MAGIC) != 0x74726976u || mr32(base + M_DEVID) == 0)
			continue;
		if ((!extra_type || mr32(base + M_DEVID) != extra_type) != scen)
			continue;
		if (ndevs >= MAX_DEVS)
			fatal("too_many_devices");
		struct vdev *d = &devs[ndevs];
		memset(d, 0, sizeof(*d));
		d->idx = ndevs;
		d->t = T_MMIO;
		d->irq = IRQ_INTX;
		d->mmio = base;
		d->mmio_version = mr32(base + M_VERSION);
		d->type = mr32(base + M_DEVID);
		d->extra = !scen;
		d->ring = rings[ndevs];
		d->msix_config_vec = d->msix_queue_vec = 0xffff;
		if (d->mmio_version != 2)
			fatal("virtio_mmio_version_1_use_force-legacy=false");
		d->irq_line = 0xff;
		route_mmio_irq(d, (u32)i);
		ndevs++;
	}
}

/* The scenario's devices first (in bus / window order), then the extra ones (of type
 * extra_type). */
void virtio_discover(enum transport t, enum irq_mode irq, int ecam, u32 extra)
{
	ndevs = nscen = 0;
	extra_type = extra;
	if (t != T_MMIO && ecam) {
		u32 base = 0;
		int by_guest = 0;
		if (!pci_use_ecam(&base, &by_guest))
			fatal("no_ecam_window");
		puts_("VRA pci");
		put_kv_str("cfg", "ecam");
		put_kv_hex("ecam_base", base);
		put_kv_str("enabled_by", by_guest ? "guest" : "firmware");
		line_end();
	}
	/* without extra devices, one scan (the configuration accesses are as they always were) */
	for (int scen = 1; scen >= (extra_type ? 0 : 1); scen--) {
		if (t == T_MMIO) {
			discover_mmio(scen);
		} else {
			if (scen)
				pci_route_intx();
			for (u32 dev = 0; dev < 32; dev++) {
				u32 bdf = PCI_BDF(0, dev, 0);
				u32 id = pci_read32(bdf, 0);
				if ((id & 0xffff) != 0x1af4)
					continue;
				u16 did = (u16)(id >> 16);
				if (did < 0x1000 || did > 0x107f)
					continue;
				u32 type = pci_virtio_type(bdf, did);
				if ((!extra_type || type != extra_type) != scen)
					continue;
				add_pci(bdf, did, t, irq);
			}
		}
		if (scen)
			nscen = ndevs;
	}
}

/* ---- register access ---- */

u8 vd_status(struct vdev *d)
{
	switch (d->t) {
	case T_MODERN: return mr8(d->common + C_STATUS);
	case T_LEGACY: return inb((u16)(d->io + L_STATUS));
	default: return (u8)mr32(d->mmio + M_STATUS);
	}
}

void vd_set_status(struct vdev *d, u8 v)
{
	switch (d->t) {
	case T_MODERN: mw8(d->common + C_STATUS, v); break;
	case T_LEGACY: outb((u16)(d->io + L_STATUS), v); break;
	default: mw32(d->mmio + M_STATUS, v); break;
	}
}

u8 vd_generation(struct vdev *d)
{
	switch (d->t) {
	case T_MODERN: return mr8(d->common + C_GEN);
	case T_LEGACY: return 0;	/* legacy has no generation counter */
	default: return (u8)mr32(d->mmio + M_GEN);
	}
}

u8 vd_config8(struct vdev *d, u32 off)
{
	switch (d->t) {
	case T_MODERN: return d->devcfg ? mr8(d->devcfg + off) : 0;
	case T_LEGACY: return inb((u16)(d->io + (d->msix ? 24 : 20) + off));
	default: return mr8(d->mmio + M_CONFIG + off);
	}
}

u8 vd_isr(struct vdev *d)
{
	switch (d->t) {
	case T_MODERN: return mr8(d->isr);
	case T_LEGACY: return inb((u16)(d->io + L_ISR));
	default: {
		u32 v = mr32(d->mmio + M_ISR);
		mw32(d->mmio + M_ACK, v);
		return (u8)v;
	}
	}
}

/* Status accesses with the TSC read adjacent to the access instruction: writes are stamped
 * right before the write, reads right after the value arrived. Nothing else sits in between,
 * because under some KVMs (kvm_pvm) each guest instruction here can cost microseconds. */

static inline u64 join(u32 lo, u32 hi) { return ((u64)hi << 32) | lo; }

u64 vd_set_status_stamped(struct vdev *d, u8 v)
{
	u32 lo, hi;
	switch (d->t) {
	case T_MODERN:
		__asm__ volatile("rdtsc\n\tmovb %%cl, (%%edi)"
				 : "=&a"(lo), "=&d"(hi) : "c"((u32)v), "D"(d->common + C_STATUS) : "memory");
		break;
	case T_LEGACY: {
		u32 a = v, dx = (u32)(d->io + L_STATUS);
		__asm__ volatile("rdtsc\n\txchgl %%eax, %%ecx\n\txchgl %%edx, %%ebx\n\toutb %%al, %%dx"
				 : "+c"(a), "+b"(dx) : : "eax", "edx", "memory");
		lo = a;
		hi = dx;
		break;
	}
	default:
		__asm__ volatile("rdtsc\n\tmovl %%ecx, (%%edi)"
				 : "=&a"(lo), "=&d"(hi) : "c"((u32)v), "D"(d->mmio + M_STATUS) : "memory");
		break;
	}
	return join(lo, hi);
}

/* `issue` is stamped just before the read, `tsc` just after the value arrived: the host's
 * completion of the access lies in between (a wide window means the vCPU was held up). */
u8 vd_status_stamped(struct vdev *d, u64 *issue, u64 *tsc)
{
	u32 lo, hi, ilo, ihi, v;
	switch (d->t) {
	case T_MODERN:
		__asm__ volatile("rdtsc\n\tmovl %%eax, %%esi\n\tmovl %%edx, %%ebx\n\t"
				 "movzbl (%%edi), %%ecx\n\trdtsc"
				 : "=a"(lo), "=d"(hi), "=&c"(v), "=&S"(ilo), "=&b"(ihi)
				 : "D"(d->common + C_STATUS) : "memory");
		break;
	case T_LEGACY: {
		u32 dx = (u32)(d->io + L_STATUS);
		__asm__ volatile("movl %%edx, %%edi\n\trdtsc\n\tmovl %%eax, %%esi\n\t"
				 "xchgl %%edx, %%edi\n\tinb %%dx, %%al\n\tmovzbl %%al, %%ecx\n\trdtsc"
				 : "=a"(lo), "+d"(dx), "=&c"(v), "=&S"(ilo), "=&D"(ihi) : : "memory");
		hi = dx;
		break;
	}
	default:
		__asm__ volatile("rdtsc\n\tmovl %%eax, %%esi\n\tmovl %%edx, %%ebx\n\t"
				 "movl (%%edi), %%ecx\n\trdtsc"
				 : "=a"(lo), "=d"(hi), "=&c"(v), "=&S"(ilo), "=&b"(ihi)
				 : "D"(d->mmio + M_STATUS) : "memory");
		break;
	}
	*issue = join(ilo, ihi);
	*tsc = join(lo, hi);
	return (u8)v;
}

u32 vd_status_addr(struct vdev *d)
{
	switch (d->t) {
	case T_MODERN: return d->common + C_STATUS;
	case T_LEGACY: return d->io + L_STATUS;
	default: return d->mmio + M_STATUS;
	}
}

const char *vd_space(struct vdev *d) { return d->t == T_LEGACY ? "pio" : "mmio"; }

u32 vd_devcfg_addr(struct vdev *d)
{
	switch (d->t) {
	case T_MODERN: return d->devcfg;
	case T_LEGACY: return d->io + (d->msix ? 24u : 20u);
	default: return d->mmio + M_CONFIG;
	}
}

void vd_negotiate(struct vdev *d)
{
	switch (d->t) {
	case T_MODERN:
		mw32(d->common + C_DFSEL, 1);
		if (!(mr32(d->common + C_DF) & VIRTIO_F_VERSION_1_HI))
			fatal("device_lacks_VERSION_1");
		mw32(d->common + C_GFSEL, 0);
		mw32(d->common + C_GF, 0);
		mw32(d->common + C_GFSEL, 1);
		mw32(d->common + C_GF, VIRTIO_F_VERSION_1_HI);
		d->features = 1ull << 32;
		break;
	case T_LEGACY:
		(void)inl((u16)(d->io + L_HF));
		outl((u16)(d->io + L_GF), 0);
		d->features = 0;
		break;
	default:
		mw32(d->mmio + M_DFSEL, 1);
		if (!(mr32(d->mmio + M_DF) & VIRTIO_F_VERSION_1_HI))
			fatal("device_lacks_VERSION_1");
		mw32(d->mmio + M_GFSEL, 0);
		mw32(d->mmio + M_GF, 0);
		mw32(d->mmio + M_GFSEL, 1);
		mw32(d->mmio + M_GF, VIRTIO_F_VERSION_1_HI);
		d->features = 1ull << 32;
		break;
	}
}

/* Zeroes only the avail and used rings (descriptors are never used): under some KVMs (kvm_pvm)
 * this paging-off guest pays microseconds per store, so each store counts. */
static void clear_rings(struct vdev *d)
{
	u32 *avail = (u32 *)(d->ring + 16u * d->qsize);
	u32 *used = (u32 *)(d->ring + 4096);
	for (u32 i = 0; i < (6u + 2u * d->qsize + 3) / 4; i++)
		avail[i] = 0;
	for (u32 i = 0; i < (6u + 8u * d->qsize + 3) / 4; i++)
		used[i] = 0;
}

/* Split ring in the legacy layout (works for every transport): descriptors at 0, avail right
 * after them, used at +4096. */
void vd_setup_queue(struct vdev *d)
{
	u32 desc = (u32)d->ring;
	d->avail_idx = 0;
	switch (d->t) {
	case T_MODERN: {
		u32 c = d->common;
		mw16(c + C_QSEL, 0);
		u16 n = mr16(c + C_QSIZE);
		if (!n)
			fatal("queue0_absent");
		if (n > MAX_QSIZE)
			n = MAX_QSIZE;
		d->qsize = n;
		clear_rings(d);
		mw16(c + C_QSIZE, n);
		mw32(c + C_QDESC, desc);
		mw32(c + C_QDESC + 4, 0);
		mw32(c + C_QAVAIL, desc + 16u * n);
		mw32(c + C_QAVAIL + 4, 0);
		mw32(c + C_QUSED, desc + 4096);
		mw32(c + C_QUSED + 4, 0);
		if (d->msix) {
			mw16(c + C_MSIX, 0);
			d->msix_config_vec = mr16(c + C_MSIX);
			mw16(c + C_QMSIX, 1);
			d->msix_queue_vec = mr16(c + C_QMSIX);
		}
		mw16(c + C_QENABLE, 1);
		break;
	}
	case T_LEGACY: {
		u16 io = d->io;
		outw((u16)(io + L_QSEL), 0);
		u16 n = inw((u16)(io + L_QNUM));
		if (!n || n > MAX_QSIZE)
			fatal("legacy_queue_size_unsupported");
		d->qsize = n;
		clear_rings(d);
		if (d->msix) {
			outw((u16)(io + L_MSIX_CONFIG), 0);
			d->msix_config_vec = inw((u16)(io + L_MSIX_CONFIG));
			outw((u16)(io + L_MSIX_QUEUE), 1);
			d->msix_queue_vec = inw((u16)(io + L_MSIX_QUEUE));
		}
		outl((u16)(io + L_PFN), desc >> 12);
		break;
	}
	default: {
		u32 m = d->mmio;
		mw32(m + M_QSEL, 0);
		u32 n = mr32(m + M_QNUMMAX);
		if (!n)
			fatal("queue0_absent");
		if (n > MAX_QSIZE)
			n = MAX_QSIZE;
		d->qsize = (u16)n;
		clear_rings(d);
		mw32(m + M_QNUM, n);
		mw32(m + M_QDESC, desc);
		mw32(m + M_QDESC + 4, 0);
		mw32(m + M_QAVAIL, desc + 16u * n);
		mw32(m + M_QAVAIL + 4, 0);
		mw32(m + M_QUSED, desc + 4096);
		mw32(m + M_QUSED + 4, 0);
		mw32(m + M_QREADY, 1);
		break;
	}
	}
}

void vd_kick(struct vdev *d)
{
	switch (d->t) {
	case T_MODERN: mw16(d->notify, 0); break;
	case T_LEGACY: outw((u16)(d->io + L_NOTIFY), 0); break;
	default: mw32(d->mmio + M_NOTIFY, 0); break;
	}
}

void vd_program_vectors(struct vdev *d)
{
	if (!d->msix)
		return;
	switch (d->t) {
	case T_MODERN: {
		u32 c = d->common;
		mw16(c + C_MSIX, 0);
		d->msix_config_vec = mr16(c + C_MSIX);
		u16 nq = mr16(c + C_NUMQ);
		for (u16 q = 0; q < nq && q < 64; q++) {
			mw16(c + C_QSEL, q);
			mw16(c + C_QMSIX, 1);
			if (!q)
				d->msix_queue_vec = mr16(c + C_QMSIX);
		}
		break;
	}
	case T_LEGACY: {
		u16 io = d->io;
		outw((u16)(io + L_MSIX_CONFIG), 0);
		d->msix_config_vec = inw((u16)(io + L_MSIX_CONFIG));
		for (u16 q = 0; q < 64; q++) {
			outw((u16)(io + L_QSEL), q);
			if (!inw((u16)(io + L_QNUM)))
				break;
			outw((u16)(io + L_MSIX_QUEUE), 1);
			if (!q)
				d->msix_queue_vec = inw((u16)(io + L_MSIX_QUEUE));
		}
		break;
	}
	default:
		break;
	}
}

static u8 qbufs[MAX_DEVS][16] __attribute__((aligned(16)));

/* Descriptor (avail_idx % qsize): 16 device-writable bytes; avail ring entry, index, kick. */
void vd_queue_request(struct vdev *d)
{
	u16 n = d->qsize;
	u16 slot = (u16)(d->avail_idx % n);
	volatile u32 *desc = (volatile u32 *)(d->ring + 16u * slot);
	volatile u16 *avail = (volatile u16 *)(d->ring + 16u * n);
	desc[0] = (u32)qbufs[d->idx];
	desc[1] = 0;
	desc[2] = sizeof(qbufs[0]);
	desc[3] = 2;			/* flags VRING_DESC_F_WRITE, next 0 */
	avail[2 + slot] = slot;
	barrier();
	d->avail_idx++;
	avail[1] = d->avail_idx;
	barrier();
	vd_kick(d);
}

u16 vd_used_idx(struct vdev *d)
{
	return *(volatile u16 *)(d->ring + 4096 + 2);
}

void vd_inject_fault(struct vdev *d)
{
	volatile u16 *avail_idx = (volatile u16 *)(d->ring + 16u * d->qsize + 2);
	d->avail_idx = (u16)(d->avail_idx + d->qsize + 1);
	*avail_idx = d->avail_idx;
	barrier();
	vd_kick(d);
}

static const char *tname(enum transport t)
{
	return t == T_MODERN ? "modern" : t == T_LEGACY ? "legacy" : "mmio";
}

void virtio_print_dev(struct vdev *d)
{
	puts_("VRA dev");
	put_kv_dec("idx", (u64)d->idx);
	put_kv_str("transport", tname(d->t));
	if (d->t == T_MMIO) {
		put_kv_hex("mmio_base", d->mmio);
		put_kv_dec("mmio_version", d->mmio_version);
	} else {
		puts_(" bdf=00:");
		outb(0x3f8, (u8)("0123456789abcdef"[(d->bdf >> 7) & 1]));
		outb(0x3f8, (u8)("0123456789abcdef"[(d->bdf >> 3) & 0xf]));
		puts_(".");
		put_dec(d->bdf & 7);
		put_kv_hex("pci_id", d->pci_devid);
	}
	put_kv_dec("type", d->type);
	put_kv_str("space", vd_space(d));
	put_kv_hex("status_addr", vd_status_addr(d));
	put_kv_dec("status_size", d->t == T_MMIO ? 4 : 1);
	switch (d->t) {
	case T_MODERN:
		put_kv_hex("gen_addr", d->common + C_GEN);
		put_kv_hex("msix_config_addr", d->common + C_MSIX);
		put_kv_hex("isr_addr", d->isr);
		put_kv_hex("notify_addr", d->notify);
		break;
	case T_LEGACY:
		if (d->msix)
			put_kv_hex("msix_config_addr", d->io + L_MSIX_CONFIG);
		put_kv_hex("isr_addr", d->io + L_ISR);
		put_kv_hex("notify_addr", d->io + L_NOTIFY);
		break;
	default:
		put_kv_hex("gen_addr", d->mmio + M_GEN);
		put_kv_hex("isr_addr", d->mmio + M_ISR);
		put_kv_hex("ack_addr", d->mmio + M_ACK);
		put_kv_hex("notify_addr", d->mmio + M_NOTIFY);
		break;
	}
	if (vd_devcfg_addr(d))
		put_kv_hex("devcfg_addr", vd_devcfg_addr(d));
	put_kv_str("irq", d->msix ? "msix" : "intx");
	if (d->msix) {
		put_kv_dec("msix_config", d->msix_config_vec);
		put_kv_dec("msix_queue", d->msix_queue_vec);
		put_kv_hex("msi_addr", 0xfee00000u);
		put_kv_hex("msi_data_config", d->apic_vec_config);
		put_kv_hex("msi_data_queue", d->apic_vec_queue);
	} else if (d->ioapic_routed) {
		/* virtio-mmio: the line goes through an IOAPIC entry the guest programmed */
		put_kv_hex("msi_addr", 0xfee00000u);
		put_kv_hex("msi_data_config", d->apic_vec_config);
	}
	if (!d->msix && d->irq_line != 0xff)
		put_kv_dec("irq_line", d->irq_line);
	if (!d->msix && d->line_vec)
		put_kv_hex("line_vector", d->line_vec);
	if (d->extra)
		put_kv_dec("extra", 1);
	put_kv_dec("qsize", d->qsize);
	put_kv_hex("features", d->features);
	line_end();
}
