#ifndef PCI_H
#define PCI_H
#include "lib.h"

#define PCI_BDF(b, d, f) (((u32)(b) << 8) | ((u32)(d) << 3) | (u32)(f))

u32 pci_read32(u32 bdf, u32 off);
u16 pci_read16(u32 bdf, u32 off);
u8 pci_read8(u32 bdf, u32 off);
void pci_write32(u32 bdf, u32 off, u32 v);
void pci_write16(u32 bdf, u32 off, u16 v);
void pci_write8(u32 bdf, u32 off, u8 v);

/* q35: switch every later configuration access to the ECAM window (MMCONFIG), enabling it at
 * 0xb0000000 first if the firmware did not. 0 if there is no usable window (then 0xCF8 stays). */
int pci_use_ecam(u32 *base, int *by_guest);

/* Assigns every BAR of the function that the firmware left at 0 (qboot leaves them), enables
 * I/O + memory decoding and bus mastering. Returns BAR n's address (0 if absent). */
void pci_assign_bars(u32 bdf, u64 bars[6], int is_io[6]);
/* First capability with this id at or after `start` (0 = list head); 0 if none. */
u32 pci_find_cap(u32 bdf, u8 id, u32 start);
/* Route PIIX3 PIRQA-D the firmware left unrouted to IRQ 10/10/11/11 so INTx reaches the
 * interrupt controllers. */
void pci_route_intx(void);
/* The GSI (KVM's kvm_set_irq number) the function's INTx pin raises: on i440fx the ISA IRQ
 * its PIRQ is routed to, on q35 16 + its PIRQ (E-H); 0xff if none. Written to the function's
 * interrupt line register. */
u8 pci_intx_irq(u32 bdf);

#endif
