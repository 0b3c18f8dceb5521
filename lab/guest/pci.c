#include "pci.h"

/* Configuration mechanism #1 (ports 0xCF8/0xCFC), or, after pci_use_ecam(), the ECAM window:
 * base + (bus << 20 | device << 15 | function << 12 | offset) = base + (bdf << 12 | offset). */
static u32 ecam;

static void addr(u32 bdf, u32 off) { outl(0xcf8, 0x80000000u | (bdf << 8) | (off & 0xfc)); }
static u32 ea(u32 bdf, u32 off) { return ecam + (bdf << 12) + (off & 0xfff); }

u32 pci_read32(u32 bdf, u32 off)
{
	if (ecam)
		return mr32(ea(bdf, off & ~3u));
	addr(bdf, off);
	return inl(0xcfc);
}

u16 pci_read16(u32 bdf, u32 off)
{
	if (ecam)
		return mr16(ea(bdf, off & ~1u));
	addr(bdf, off);
	return inw((u16)(0xcfc + (off & 2)));
}

u8 pci_read8(u32 bdf, u32 off)
{
	if (ecam)
		return mr8(ea(bdf, off));
	addr(bdf, off);
	return inb((u16)(0xcfc + (off & 3)));
}

void pci_write32(u32 bdf, u32 off, u32 v)
{
	if (ecam) {
		mw32(ea(bdf, off & ~3u), v);
		return;
	}
	addr(bdf, off);
	outl(0xcfc, v);
}

void pci_write16(u32 bdf, u32 off, u16 v)
{
	if (ecam) {
		mw16(ea(bdf, off & ~1u), v);
		return;
	}
	addr(bdf, off);
	outw((u16)(0xcfc + (off & 2)), v);
}

void pci_write8(u32 bdf, u32 off, u8 v)
{
	if (ecam) {
		mw8(ea(bdf, off), v);
		return;
	}
	addr(bdf, off);
	outb((u16)(0xcfc + (off & 3)), v);
}

/* q35's MCH (00:00.0, 8086:29c0) PCIEXBAR at 0x60: bit 0 enable, bits 2:1 length (0 = 256
 * buses, 256 MiB), base in bits 35:28. SeaBIOS and qboot enable it at 0xb0000000 (qboot does
 * not use it itself); if a firmware has not, the guest programs the same value (through
 * 0xCF8/0xCFC), as a firmware would. */
#define MCH PCI_BDF(0, 0, 0)
#define PCIEXBAR 0x60
#define ECAM_DEFAULT 0xb0000000u

int pci_use_ecam(u32 *base, int *by_guest)
{
	ecam = 0;
	if (pci_read32(MCH, 0) != 0x29c08086u)
		return 0;
	u32 bar = pci_read32(MCH, PCIEXBAR);
	*by_guest = !(bar & 1);
	if (!(bar & 1)) {
		pci_write32(MCH, PCIEXBAR + 4, 0);
		pci_write32(MCH, PCIEXBAR, ECAM_DEFAULT | 1);
		bar = pci_read32(MCH, PCIEXBAR);
		if (!(bar & 1))
			return 0;
	}
	if (pci_read32(MCH, PCIEXBAR + 4) || ((bar >> 1) & 3))
		return 0;	/* above 4 GiB, or not the 256-bus size: not for this guest */
	*base = bar & 0xf0000000u;
	ecam = *base;
	if (pci_read32(MCH, 0) != 0x29c08086u) {	/* the same register, through the window */
		ecam = 0;
		return 0;
	}
	return 1;
}

/* Free windows on the i440fx/q35 machines with little RAM, for the BARs the firmware left at 0
 * (qboot leaves them all; SeaBIOS assigns them, from 0xfebxxxxx down): memory from 3 GiB, above
 * q35's ECAM window (0xb0000000-0xbfffffff) and far below the IOAPIC/LAPIC at 0xfec00000, I/O
 * ports from 0xc000. */
static u32 next_mem = 0xc0000000u;
static u32 next_io = 0xc000u;

static u32 align_up(u32 v, u32 a) { return (v + a - 1) & ~(a - 1); }

void pci_assign_bars(u32 bdf, u64 bars[6], int is_io[6])
{
	u16 cmd = pci_read16(bdf, 0x04);
	pci_write16(bdf, 0x04, cmd & ~0x3);	/* decoding off while sizing */
	for (int i = 0; i < 6; i++) {
		bars[i] = 0;
		is_io[i] = 0;
	}
	for (int i = 0; i < 6; i++) {
		u32 off = 0x10 + 4 * i;
		u32 orig = pci_read32(bdf, off);
		pci_write32(bdf, off, 0xffffffffu);
		u32 mask = pci_read32(bdf, off);
		pci_write32(bdf, off, orig);
		if (!mask)
			continue;
		if (orig & 1) {
			u32 size = ~(mask & ~0x3u) + 1;
			size &= 0xffff;
			u32 a = orig & ~0x3u;
			if (!a) {
				a = align_up(next_io, size);
				next_io = a + size;
				pci_write32(bdf, off, a);
			}
			bars[i] = a;
			is_io[i] = 1;
			continue;
		}
		int is64 = ((orig >> 1) & 3) == 2;
		u32 size = ~(mask & ~0xfu) + 1;
		u64 a = orig & ~0xfu;
		if (is64)
			a |= (u64)pci_read32(bdf, off + 4) << 32;
		if (!a || (a >> 32)) {	/* unassigned, or above 4 GiB: out of reach without paging */
			a = align_up(next_mem, size);
			next_mem = (u32)a + size;
			pci_write32(bdf, off, (u32)a);
			if (is64)
				pci_write32(bdf, off + 4, 0);
		}
		bars[i] = a;
		if (is64)
			i++;
	}
	pci_write16(bdf, 0x04, cmd | 0x7);	/* I/O, memory, bus master */
}

u32 pci_find_cap(u32 bdf, u8 id, u32 start)
{
	if (!(pci_read16(bdf, 0x06) & 0x10))
		return 0;
	u32 p = start ? pci_read8(bdf, start + 1) : pci_read8(bdf, 0x34);
	for (int guard = 0; p && guard < 48; guard++) {
		p &= 0xfc;
		if (pci_read8(bdf, p) == id)
			return p;
		p = pci_read8(bdf, p + 1);
	}
	return 0;
}

#define PIIX3 PCI_BDF(0, 1, 0)
#define ICH9_LPC PCI_BDF(0, 0x1f, 0)

static int is_piix3(void) { return pci_read32(PIIX3, 0) == 0x70008086u; }
static int is_ich9(void) { return pci_read32(ICH9_LPC, 0) == 0x29188086u; }

void pci_route_intx(void)
{
	static const u8 irqs[4] = { 10, 10, 11, 11 };
	if (!is_piix3())
		return;
	for (u32 i = 0; i < 4; i++)
		if (pci_read8(PIIX3, 0x60 + i) & 0x80)	/* not routed by the firmware */
			pci_write8(PIIX3, 0x60 + i, irqs[i]);
}

u8 pci_intx_irq(u32 bdf)
{
	u8 pin = pci_read8(bdf, 0x3d);	/* 1 = INTA */
	u32 slot = (bdf >> 3) & 0x1f;
	u8 irq;
	if (!pin)
		return 0xff;
	if (is_piix3()) {
		/* QEMU's i440fx swizzle (pci_slot_get_pirq): PIRQ = (slot - 1 + pin - 1) & 3 */
		u32 pirq = (slot + pin - 2) & 3;
		irq = pci_read8(PIIX3, 0x60 + pirq);
		if (irq & 0x80)
			return 0xff;
	} else if (is_ich9() && slot < 25) {
		/* QEMU's q35 (ich9_cc_init): INT[A-D] of slot s -> PIRQ[E-H] (s + pin - 1) % 4 + 4,
		 * which the ICH9 always raises on IOAPIC GSI 16 + PIRQ (and on an ISA IRQ too only
		 * if the PIRQ is routed to one) */
		irq = (u8)(16 + (slot + pin - 1) % 4 + 4);
	} else {
		return 0xff;
	}
	pci_write8(bdf, 0x3c, irq);	/* interrupt line register, as a BIOS would */
	return irq;
}
