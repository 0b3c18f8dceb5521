#include "irq.h"
#include "virtio.h"

struct gate {
	u16 off_lo, sel;
	u8 zero, type;
	u16 off_hi;
} __attribute__((packed));

static struct gate idt[256] __attribute__((aligned(8)));
extern char isr_stubs[];	/* boot.S: 256 stubs, 16 bytes apart */

volatile u32 irq_count[256];
volatile u64 irq_tsc[256];

void irq_init(void)
{
	for (u32 i = 0; i < 256; i++) {
		u32 a = (u32)isr_stubs + 16 * i;
		idt[i].off_lo = (u16)a;
		idt[i].sel = 0x08;
		idt[i].zero = 0;
		idt[i].type = 0x8e;	/* present, DPL 0, 32-bit interrupt gate (clears IF) */
		idt[i].off_hi = (u16)(a >> 16);
	}
	struct {
		u16 limit;
		u32 base;
	} __attribute__((packed)) d = { sizeof(idt) - 1, (u32)idt };
	__asm__ volatile("lidt %0" :: "m"(d));
	/* APIC mode: nothing comes through the 8259s (SeaBIOS leaves its timer unmasked). */
	outb(0x21, 0xff);
	outb(0xa1, 0xff);
}

u32 ioapic_read(u32 base, u32 reg)
{
	mw32(base, reg);
	return mr32(base + 0x10);
}

void ioapic_write(u32 base, u32 reg, u32 v)
{
	mw32(base, reg);
	mw32(base + 0x10, v);
}

u32 ioapic_pins(u32 base)
{
	u32 ver = ioapic_read(base, 1);
	if (ver == 0xffffffffu)
		return 0;
	return ((ver >> 16) & 0xff) + 1;
}

void ioapic_route(u32 base, u32 pin, u8 vector)
{
	ioapic_write(base, 0x11 + 2 * pin, 0);		/* destination APIC 0 */
	ioapic_write(base, 0x10 + 2 * pin, vector);	/* fixed, physical, high, edge, unmasked */
}

/* Called from boot.S's stubs with IF=0. A queue interrupt is what the scenario waits for:
 * MSI-X on the device's queue vector, or its line (INTx / virtio-mmio) with ISR bit 0 set. A
 * line's handler reads the ISR of every device on it (it deasserts the line; virtio-mmio also
 * needs the InterruptACK write), like a shared-line driver. */
void irq_dispatch(u32 vec)
{
	u64 t = rdtsc();
	if (vec < 32) {
		puts_("VRA error msg=cpu_exception");
		put_kv_dec("vector", vec);
		line_end();
		guest_exit(2);
	}
	if (vec == 0xff)
		return;		/* spurious: no EOI */
	irq_count[vec]++;
	irq_tsc[vec] = t;
	for (int i = 0; i < ndevs; i++) {
		struct vdev *d = &devs[i];
		if (d->msix) {
			if (vec == d->apic_vec_queue) {
				d->q_irq_tsc = t;
				d->q_irqs++;
			}
		} else if (d->line_vec && vec == d->line_vec) {
			u8 isr = vd_isr(d);
			d->isr_acc |= isr;
			if (isr & 1) {
				d->q_irq_tsc = t;
				d->q_irqs++;
			}
		}
	}
	mw32(LAPIC_BASE + 0xb0, 0);	/* EOI */
}
