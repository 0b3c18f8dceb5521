#ifndef IRQ_H
#define IRQ_H
#include "lib.h"

/* Interrupts. The guest runs with IF=0 and polls; it takes interrupts only inside
 * irq_enable()/irq_disable() windows (while it waits for a queue interrupt), like a driver's
 * handler would, so the device's interrupt is really delivered and EOIed. */

#define LAPIC_BASE 0xfee00000u
#define IOAPIC1 0xfec00000u
#define IOAPIC2 0xfec10000u

/* Installs the IDT (every vector: irq_dispatch), masks both 8259 PICs (APIC mode). */
void irq_init(void);
static inline void irq_enable(void) { __asm__ volatile("sti" ::: "memory"); }
static inline void irq_disable(void) { __asm__ volatile("cli" ::: "memory"); }

u32 ioapic_read(u32 base, u32 reg);
void ioapic_write(u32 base, u32 reg, u32 v);
/* Pins of the IOAPIC at `base` (0 if there is none). */
u32 ioapic_pins(u32 base);
/* Edge-triggered, active high, fixed, physical destination APIC 0, unmasked. */
void ioapic_route(u32 base, u32 pin, u8 vector);

/* Interrupts taken per vector, and the TSC when the last one arrived. */
extern volatile u32 irq_count[256];
extern volatile u64 irq_tsc[256];

#endif
