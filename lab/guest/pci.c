#include "pci.h"

static void addr(u32 bdf, u32 off) { outl(0xcf8, 0x80000000u | (bdf << 8) | (off & 0xfc)); }

u32 pci_read32(u32 bdf, u32 off) { addr(bdf, off); return inl(0xcfc); }
u16 pci_read16(u32 bdf, u32 off) { addr(bdf, off); return inw((u16)(0xcfc + (off & 2))); }
u8 pci_read8(u32 bdf, u32 off) { addr(bdf, off); return inb((u16)(0xcfc + (off & 3))); }
void pci_write32(u32 bdf, u32 off, u32 v) { addr(bdf, off); outl(0xcfc, v); }
void pci_write16(u32 bdf, u32 off, u16 v) { addr(bdf, off); outw((u16)(0xcfc + (off & 2)), v); }
void pci_write8(u32 bdf, u32 off, u8 v) { addr(bdf, off); outb((u16)(0xcfc + (off & 3)), v); }

/* Free windows on the i440fx/q35 machines with little RAM: memory above 3 GiB and below the
 * q35 MMCONFIG/IOAPIC area, I/O ports from 0xc000. */
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
		if (!a) {
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

void pci_route_intx(void)
{
	static const u8 irqs[4] = { 10, 10, 11, 11 };
	if (pci_read32(PIIX3, 0) != 0x70008086u)
		return;
	for (u32 i = 0; i < 4; i++)
		if (pci_read8(PIIX3, 0x60 + i) & 0x80)	/* not routed by the firmware */
			pci_write8(PIIX3, 0x60 + i, irqs[i]);
}

u8 pci_intx_irq(u32 bdf)
{
	u8 pin = pci_read8(bdf, 0x3d);	/* 1 = INTA */
	if (!pin || pci_read32(PIIX3, 0) != 0x70008086u)
		return 0xff;
	/* QEMU's i440fx swizzle (pci_slot_get_pirq): PIRQ = (slot - 1 + pin - 1) & 3 */
	u32 pirq = (((bdf >> 3) & 0x1f) + pin - 2) & 3;
	u8 irq = pci_read8(PIIX3, 0x60 + pirq);
	if (irq & 0x80)
		return 0xff;
	pci_write8(bdf, 0x3c, irq);	/* interrupt line register, as a BIOS would */
	return irq;
}
