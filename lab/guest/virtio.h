#ifndef VIRTIO_H
#define VIRTIO_H
#include "lib.h"

enum transport { T_MODERN, T_LEGACY, T_MMIO };
enum irq_mode { IRQ_MSIX, IRQ_INTX };

#define S_ACK 0x01
#define S_DRIVER 0x02
#define S_DRIVER_OK 0x04
#define S_FEATURES_OK 0x08
#define S_NEEDS_RESET 0x40
#define S_FAILED 0x80

#define MAX_DEVS 8
#define MAX_QSIZE 16

struct vdev {
	int idx;
	enum transport t;
	enum irq_mode irq;
	u32 bdf;		/* PCI */
	u16 pci_devid;
	u32 type;		/* virtio device type (4 = entropy) */
	u32 common, isr, devcfg, notify;	/* modern: guest-physical addresses */
	u16 io;			/* legacy: I/O base */
	u32 mmio;		/* virtio-mmio base */
	u32 mmio_version;
	int msix;		/* MSI-X enabled */
	u16 msix_config_vec, msix_queue_vec;	/* virtio vectors (MSI-X table entries) read back */
	u8 apic_vec_config, apic_vec_queue;	/* MSI data we programmed */
	u8 irq_line;		/* INTx / mmio line: the GSI; 0xff if unknown */
	int ioapic_routed;	/* mmio: IOAPIC entry programmed with apic_vec_config */
	u8 line_vec;		/* INTx / mmio: the vector of its IOAPIC entry; 0 = not routed */
	int extra;		/* not the scenario's (extra_type): to DRIVER_OK, never faulted */
	volatile u32 q_irqs;	/* queue interrupts taken (irq.c) */
	volatile u64 q_irq_tsc;	/* ... the TSC at the last one */
	volatile u8 isr_acc;	/* ISR bits the line handler read */
	u16 qsize;
	u16 avail_idx;
	u8 *ring;
	u64 features;		/* negotiated */
};

extern struct vdev devs[MAX_DEVS];
extern int ndevs;	/* every virtio device found */
extern int nscen;	/* devs[0..nscen) are the scenario's devices, the extra ones follow */

/* Finds virtio devices of the requested transport (PCI or the microvm mmio window); ecam: PCI
 * configuration accesses through q35's ECAM window instead of 0xCF8/0xCFC; devices of virtio
 * type `extra` (0: none) are not the scenario's (GuestSpec.extra). */
void virtio_discover(enum transport t, enum irq_mode irq, int ecam, u32 extra);
void virtio_print_dev(struct vdev *d);

u8 vd_status(struct vdev *d);
void vd_set_status(struct vdev *d, u8 v);
/* the same, with the TSC taken adjacent to the access (before a write, after a read) */
u64 vd_set_status_stamped(struct vdev *d, u8 v);
u8 vd_status_stamped(struct vdev *d, u64 *issue, u64 *tsc);
u8 vd_generation(struct vdev *d);
u8 vd_config8(struct vdev *d, u32 off);
u8 vd_isr(struct vdev *d);	/* reads (and acks) the interrupt status */
void vd_negotiate(struct vdev *d);
void vd_setup_queue(struct vdev *d);
void vd_kick(struct vdev *d);
/* A device that is not the scenario's (extra=net|blk): after FEATURES_OK, points msix_config and
 * every queue's vector at MSI-X entries 0 and 1 (queues stay disabled). */
void vd_program_vectors(struct vdev *d);
/* Makes one buffer (16 bytes, device-writable) available on queue 0 and kicks. */
void vd_queue_request(struct vdev *d);
u16 vd_used_idx(struct vdev *d);
/* Makes the avail index jump past the queue size and kicks: QEMU's virtqueue_num_heads() calls
 * virtio_error("Guest moved used index ..."). */
void vd_inject_fault(struct vdev *d);

/* where the status register is, for the report */
u32 vd_status_addr(struct vdev *d);
u32 vd_devcfg_addr(struct vdev *d);	/* device-specific configuration (0: none) */
const char *vd_space(struct vdev *d);

#endif
