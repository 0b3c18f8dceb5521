/* Scripted virtio driver: scenario from the kernel command line, facts as "VRA ..." lines on
 * COM1, exit through isa-debug-exit. Timed sections only append to an in-memory log (serial
 * output costs a VM exit per byte); the log is printed between episodes. */
#include "lib.h"
#include "virtio.h"
#include "irq.h"

enum ev_type { EV_STATUS, EV_FAULT, EV_NEEDS_RESET, EV_RESET_DONE, EV_TIMEOUT, EV_ISR, EV_KICK,
	       EV_QUEUE };
enum { TIMEOUT_NEEDS_RESET, TIMEOUT_RESET_DONE, TIMEOUT_QUEUE };

/* EV_QUEUE flags */
#define QF_ISR 1	/* `value` is an ISR read */
#define QF_IRQ 2	/* delivered as an interrupt (else: the guest polled the used ring) */

struct ev {
	u8 type, dev, value;
	short ep;
	u32 count;
	u64 tsc;
	u64 issue;	/* reads: TSC just before the access (tsc: just after); queue: the kick */
	u8 vec, gen, cfg, flags;	/* queue */
};

#define LOG_CAP 4096
static struct ev evlog[LOG_CAP];
static u32 nlog, log_dropped;

static struct ev *log_ev(u8 type, struct vdev *d, short ep, u8 value, u32 count, u64 tsc)
{
	static struct ev scratch;
	if (nlog >= LOG_CAP) {
		log_dropped++;
		return &scratch;
	}
	struct ev *e = &evlog[nlog++];
	e->type = type;
	e->dev = (u8)d->idx;
	e->ep = ep;
	e->value = value;
	e->count = count;
	e->tsc = tsc;
	e->issue = 0;
	e->flags = 0;
	return e;
}

/* writestorm on another register than status (storm_reg=config|ipi) */
enum { STORM_STATUS, STORM_CONFIG, STORM_IPI };

static u32 storm_base(struct vdev *d, int kind)
{
	if (kind == STORM_IPI) {
		if (!d->apic_vec_config)
			fatal("storm_without_config_vector");
		return d->apic_vec_config;
	}
	if (d->t == T_MMIO)
		return 1;			/* InterruptACK: the queue interrupt bit */
	if (!d->msix)
		fatal("storm_config_without_msix");
	return d->msix_config_vec;		/* msix_config: the vector it has (0) */
}

static void storm_write(struct vdev *d, int kind, u32 v)
{
	if (kind == STORM_IPI) {
		/* LAPIC ICR: destination shorthand self, fixed delivery, vector v */
		mw32(0xfee00300u, (1u << 18) | (v & 0xffu));
		return;
	}
	switch (d->t) {
	case T_MODERN:
		mw16(d->common + 0x10, (u16)v);		/* common cfg msix_config */
		break;
	case T_LEGACY:
		outw((u16)(d->io + 20), (u16)v);	/* MSI-X config vector */
		break;
	default:
		mw32(d->mmio + 0x64, v);		/* InterruptACK */
		break;
	}
}

static const char *ev_names[] = { "status", "fault", "needs_reset", "reset_done", "timeout", "isr", "kick",
				  "queue" };
static const char *timeout_names[] = { "needs_reset", "reset_done", "queue" };

static void flush_log(void)
{
	for (u32 i = 0; i < nlog; i++) {
		struct ev *e = &evlog[i];
		puts_("VRA ");
		puts_(ev_names[e->type]);
		put_kv_dec("dev", e->dev);
		puts_(" ep=");
		put_sdec(e->ep);
		if (e->type == EV_TIMEOUT) {
			put_kv_str("what", timeout_names[e->value]);
		} else if (e->type == EV_QUEUE) {
			/* vector: the APIC vector that carried it (0: none, polled) */
			put_kv_str("via", e->flags & QF_IRQ ? (devs[e->dev].msix ? "msix" : "line")
							    : "poll");
			put_kv_hex("vector", e->vec);
			if (e->flags & QF_ISR)
				put_kv_hex("isr", e->value);
			put_kv_dec("used", e->count);
			put_kv_hex("gen", e->gen);
			put_kv_hex("cfg", e->cfg);
			put_kv_dec("tsc_kick", e->issue);
			put_kv_dec("tsc", e->tsc);
			line_end();
			continue;
		} else if (e->type != EV_FAULT && e->type != EV_KICK) {
			put_kv_hex("value", e->value);
		}
		if (e->type == EV_NEEDS_RESET || e->type == EV_RESET_DONE || e->type == EV_TIMEOUT)
			put_kv_dec("reads", e->count);
		put_kv_dec("tsc", e->tsc);
		if (e->issue)
			put_kv_dec("tsc_issue", e->issue);
		line_end();
	}
	nlog = 0;
	if (log_dropped) {
		puts_("VRA log_dropped");
		put_kv_dec("n", log_dropped);
		line_end();
		log_dropped = 0;
	}
}

/* writes: stamped just before the write instruction (the VM exit follows it) */
static void write_status(struct vdev *d, short ep, u8 v)
{
	u64 t = vd_set_status_stamped(d, v);
	log_ev(EV_STATUS, d, ep, v, 0, t);
}

static u32 detect_ms, reset_ms;

static int selected(int i, int fault_sel)
{
	return fault_sel < 0 || fault_sel == i;
}

/* Polls status until NEEDS_RESET; logs when first seen (tsc of the read that returned it). */
static int wait_needs_reset(struct vdev *d, short ep)
{
	u64 deadline = rdtsc() + ms_to_tsc(detect_ms);
	u32 reads = 0;
	for (;;) {
		u64 ti, t;
		u8 s = vd_status_stamped(d, &ti, &t);
		reads++;
		if (s & S_NEEDS_RESET) {
			log_ev(EV_NEEDS_RESET, d, ep, s, reads, t)->issue = ti;
			return 1;
		}
		if (t > deadline) {
			log_ev(EV_TIMEOUT, d, ep, TIMEOUT_NEEDS_RESET, reads, t);
			return 0;
		}
	}
}

static void reset_dev(struct vdev *d, short ep)
{
	write_status(d, ep, 0);
	u64 deadline = rdtsc() + ms_to_tsc(reset_ms);
	u32 reads = 0;
	for (;;) {
		u64 ti, t;
		u8 s = vd_status_stamped(d, &ti, &t);
		reads++;
		if (!s) {
			log_ev(EV_RESET_DONE, d, ep, s, reads, t)->issue = ti;
			return;
		}
		if (t > deadline) {
			log_ev(EV_TIMEOUT, d, ep, TIMEOUT_RESET_DONE, reads, t);
			return;
		}
	}
}

/* ACKNOWLEDGE, DRIVER, features, FEATURES_OK, queue, DRIVER_OK. `skip_ack` starts at DRIVER|ACK
 * directly (what NetKVM does). */
static void init_dev(struct vdev *d, short ep, int skip_ack)
{
	if (!skip_ack)
		write_status(d, ep, S_ACK);
	write_status(d, ep, S_ACK | S_DRIVER);
	vd_negotiate(d);
	write_status(d, ep, S_ACK | S_DRIVER | S_FEATURES_OK);
	vd_setup_queue(d);
	write_status(d, ep, S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
}

/* A device that is not the scenario's: to DRIVER_OK with only VERSION_1 (modern), its MSI-X
 * vectors programmed, no queue enabled. */
static void init_extra(struct vdev *d)
{
	write_status(d, -1, S_ACK);
	write_status(d, -1, S_ACK | S_DRIVER);
	vd_negotiate(d);
	write_status(d, -1, S_ACK | S_DRIVER | S_FEATURES_OK);
	vd_program_vectors(d);
	write_status(d, -1, S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
}

#define QUEUE_TIMEOUT_MS 2000	/* long: the host (QEMU) may be descheduled for a while on a busy host */

/* What a driver does in normal operation, before the fault: reads config_generation and the
 * device config (generation, field, generation again, as virtio_cread does), then has the device
 * complete one request on queue 0 and takes its interrupt: MSI-X on the queue's vector, or the
 * line (INTx / virtio-mmio) whose handler reads ISR bit 0. Interrupts are enabled only while
 * waiting for it; an interrupt left pending from the previous episode is taken (and EOIed) then
 * too. A line that is not routed to an IOAPIC entry is polled: used ring, then one ISR read. */
static void queue_io(struct vdev *d, short ep)
{
	u8 gen = vd_generation(d);
	u8 cfg = vd_config8(d, 0);
	(void)vd_generation(d);
	int by_irq = d->msix || d->line_vec;
	u32 irqs = d->q_irqs;
	u16 used = vd_used_idx(d);
	d->isr_acc = 0;
	u64 tk = rdtsc();
	vd_queue_request(d);
	u64 deadline = tk + ms_to_tsc(QUEUE_TIMEOUT_MS), t = 0;
	if (by_irq)
		irq_enable();
	for (;;) {
		u64 now = rdtsc();
		if (by_irq ? d->q_irqs != irqs : vd_used_idx(d) != used) {
			t = by_irq ? d->q_irq_tsc : now;
			break;
		}
		if (now > deadline)
			break;
		__asm__ volatile("pause");
	}
	irq_disable();
	if (!t) {
		log_ev(EV_TIMEOUT, d, ep, TIMEOUT_QUEUE, 0, rdtsc());
		return;
	}
	struct ev *e = log_ev(EV_QUEUE, d, ep, 0, vd_used_idx(d), t);
	e->issue = tk;
	e->gen = gen;
	e->cfg = cfg;
	e->vec = d->msix ? d->apic_vec_queue : d->line_vec;
	e->flags = by_irq ? QF_IRQ : 0;
	if (!d->msix) {
		e->value = by_irq ? d->isr_acc : vd_isr(d);
		e->flags |= QF_ISR;
	}
}

static u32 prefault, queue_gap_ms;

/* Before each fault (prefault=1): queue_io on every virtio-rng about to fault (the only type
 * whose requests the guest knows how to make; others, added with extra_args, fault as they
 * did), then queue_gap_ms, so each rng's last interrupt before its config interrupt is a queue
 * interrupt. */
static void before_fault(int fault_sel, short ep)
{
	if (!prefault)
		return;
	for (int i = 0; i < nscen; i++)
		if (selected(i, fault_sel) && devs[i].type == 4)
			queue_io(&devs[i], ep);
	if (queue_gap_ms)
		delay_ms(queue_gap_ms);
}

static void fault_dev(struct vdev *d, short ep)
{
	u64 t = rdtsc();
	vd_inject_fault(d);
	log_ev(EV_FAULT, d, ep, 0, 0, t);
}

static void read_isr(struct vdev *d, short ep)
{
	u64 t = rdtsc();
	u8 v = vd_isr(d);
	log_ev(EV_ISR, d, ep, v, 0, t);
}

static enum transport parse_transport(const char *s)
{
	if (streq(s, "modern"))
		return T_MODERN;
	if (streq(s, "legacy"))
		return T_LEGACY;
	if (streq(s, "mmio"))
		return T_MMIO;
	fatal("bad_transport");
}

void guest_main(u32 magic, u32 info)
{
	const char *boot = "unknown";
	serial_init();
	u64 t_entry = rdtsc();
	/* PVH: %ebx -> hvm_start_info (magic, ..., cmdline_paddr at +24); %eax is not defined
	 * (QEMU's PVH option ROM leaves 0x2badb002 in it), so the start_info magic decides. */
	if (info && mr32(info) == 0x336ec578u) {
		boot = "pvh";
		cmdline_set((const char *)mr32(info + 24));
	} else if (magic == 0x2badb002u) {
		boot = "multiboot";
		if (mr32(info) & 4)
			cmdline_set((const char *)mr32(info + 16));
	}
	tsc_calibrate();
	puts_("VRA boot");
	put_kv_str("via", boot);
	put_kv_dec("tsc_hz", tsc_hz);
	put_kv_str("tsc_src", tsc_src);
	put_kv_dec("tsc_hz_cpuid", tsc_hz_cpuid);
	put_kv_dec("tsc_hz_pit", tsc_hz_pit);
	put_kv_dec("tsc", t_entry);
	line_end();
	puts_("VRA cmdline ");
	puts_(cmdline_get());
	line_end();

	const char *scenario = param_str("scenario", "init");
	enum transport t = parse_transport(param_str("transport", "modern"));
	enum irq_mode irq = streq(param_str("irq", "msix"), "intx") ? IRQ_INTX : IRQ_MSIX;
	u32 repeat = param_u32("repeat", 1);
	u32 delay = param_u32("delay_ms", 0);
	u32 hold = param_u32("hold_ms", 0);
	u32 fault_delay = param_u32("fault_delay_ms", 0);
	const char *fsel = param_str("fault_dev", "all");
	int fault_sel = streq(fsel, "all") ? -1 : (int)param_u32("fault_dev", 0);
	detect_ms = param_u32("detect_ms", 2000);
	reset_ms = param_u32("reset_ms", 1000);
	prefault = param_u32("prefault", 0);
	queue_gap_ms = param_u32("queue_gap_ms", 2);

	/* Software-enable the local APIC (SVR bit 8, spurious vector 0xff) so KVM accepts the
	 * MSIs into the IRR (kvm_apic_accept_irq) while IF=0 (the guest takes interrupts only
	 * while it waits for a queue interrupt). */
	mw32(0xfee000f0u, mr32(0xfee000f0u) | 0x1ffu);
	irq_init();

	virtio_discover(t, irq, streq(param_str("pcicfg", "cf8"), "ecam"), param_u32("extra_type", 0));
	if (!nscen)
		fatal("no_virtio_device");	/* no scenario device */
	if (fault_sel >= nscen)
		fatal("fault_dev_out_of_range");
	/* Addresses are known (BARs assigned) before any status access: a host reading the serial
	 * port live can set its watches during start_delay_ms. */
	for (int i = 0; i < ndevs; i++) {
		puts_("VRA found");
		put_kv_dec("idx", (u64)i);
		put_kv_str("space", vd_space(&devs[i]));
		put_kv_hex("status_addr", vd_status_addr(&devs[i]));
		put_kv_dec("status_size", devs[i].t == T_MMIO ? 4 : 1);
		line_end();
	}
	u32 start_delay = param_u32("start_delay_ms", 0);
	if (start_delay) {
		delay_ms(start_delay);
		puts_("VRA started");
		put_kv_dec("tsc", rdtsc());
		line_end();
	}

	for (int i = 0; i < ndevs; i++) {
		reset_dev(&devs[i], -1);
		if (devs[i].extra)
			init_extra(&devs[i]);
		else
			init_dev(&devs[i], -1, 0);
	}
	flush_log();
	for (int i = 0; i < ndevs; i++)
		virtio_print_dev(&devs[i]);

	if (streq(scenario, "init")) {
		/* nothing more */
	} else if (streq(scenario, "fault") || streq(scenario, "stuck")) {
		if (fault_delay)
			delay_ms(fault_delay);
		before_fault(fault_sel, 0);
		for (int i = 0; i < nscen; i++)
			if (selected(i, fault_sel))
				fault_dev(&devs[i], 0);
		for (int i = 0; i < nscen; i++)
			if (selected(i, fault_sel) && wait_needs_reset(&devs[i], 0) && irq == IRQ_INTX)
				read_isr(&devs[i], 0);
		flush_log();
		if (hold)
			delay_ms(hold);
	} else if (streq(scenario, "recover") || streq(scenario, "fail")) {
		int fail = streq(scenario, "fail");
		for (u32 ep = 0; ep < repeat; ep++) {
			/* a running guest: time between bring-up (or recovery) and the next fault */
			if (fault_delay)
				delay_ms(fault_delay);
			before_fault(fault_sel, (short)ep);
			for (int i = 0; i < nscen; i++)
				if (selected(i, fault_sel))
					fault_dev(&devs[i], (short)ep);
			for (int i = 0; i < nscen; i++) {
				struct vdev *d = &devs[i];
				if (!selected(i, fault_sel))
					continue;
				int seen = wait_needs_reset(d, (short)ep);
				if (seen && irq == IRQ_INTX)
					read_isr(d, (short)ep);
				if (delay)
					delay_ms(delay);
				if (fail)
					write_status(d, (short)ep, (u8)(vd_status(d) | S_FAILED));
				reset_dev(d, (short)ep);
				init_dev(d, (short)ep, 0);
			}
			flush_log();
		}
	} else if (streq(scenario, "failreinit")) {
		if (delay)
			delay_ms(delay);
		for (int i = 0; i < nscen; i++) {
			struct vdev *d = &devs[i];
			if (!selected(i, fault_sel))
				continue;
			fault_dev(d, 0);
			wait_needs_reset(d, 0);
			write_status(d, 0, (u8)(vd_status(d) | S_FAILED));
			init_dev(d, 0, 0);	/* no reset: a spec violation */
		}
		flush_log();
	} else if (streq(scenario, "bitclear")) {
		if (delay)
			delay_ms(delay);
		for (int i = 0; i < nscen; i++)
			if (selected(i, fault_sel))
				write_status(&devs[i], 0, S_ACK | S_DRIVER | S_FEATURES_OK);
		flush_log();
	} else if (streq(scenario, "readstorm") || streq(scenario, "writestorm")) {
		int writes = streq(scenario, "writestorm");
		u32 n = param_u32(writes ? "writes" : "reads", 100000);
		/* writestorm: storm_reg=status (default), config (the device's config-vector /
		 * interrupt-ack register), or ipi (self-IPIs on its config vector); storm_values=N
		 * cycles through N values from the register's usual one; storm_final=V (not 0):
		 * then one write of V (as a config interrupt's ACK after many queue ACKs) */
		const char *reg = writes ? param_str("storm_reg", "status") : "status";
		int kind = streq(reg, "config") ? STORM_CONFIG : streq(reg, "ipi") ? STORM_IPI
			: STORM_STATUS;
		if (kind == STORM_STATUS && !streq(reg, "status"))
			fatal("unknown_storm_reg");
		u32 nvals = param_u32("storm_values", 1);
		if (!nvals)
			nvals = 1;
		u32 final = param_u32("storm_final", 0);	/* != 0: one more write of it */
		for (int i = 0; i < nscen; i++) {
			struct vdev *d = &devs[i];
			if (!selected(i, fault_sel))
				continue;
			u8 v = vd_status(d), last = v;
			u32 base = kind == STORM_STATUS ? v : storm_base(d, kind);
			u32 differing = 0;
			u64 t0 = rdtsc();
			for (u32 k = 0; k < n; k++) {
				if (kind != STORM_STATUS) {
					u32 w = base + k % nvals;
					storm_write(d, kind, w);
					differing += k && nvals > 1;	/* each differs from the previous */
				} else if (writes) {
					vd_set_status(d, v);
				} else {
					last = vd_status(d);
					differing += last != v;
				}
			}
			u64 t1 = rdtsc();
			if (kind != STORM_STATUS && final)
				storm_write(d, kind, final);
			if (kind == STORM_CONFIG && d->t != T_MMIO)
				storm_write(d, kind, d->msix_config_vec);	/* restore */
			puts_("VRA storm");
			put_kv_dec("dev", (u64)i);
			put_kv_str("op", writes ? "write" : "read");
			put_kv_str("reg", reg);
			put_kv_dec("n", n);
			put_kv_hex("value", base);
			put_kv_dec("differing", differing);
			put_kv_dec("tsc_start", t0);
			put_kv_dec("tsc_end", t1);
			line_end();
		}
	} else if (streq(scenario, "linux")) {
		/* What a Linux guest does: ignores the config interrupt's NEEDS_RESET, re-reads the
		 * generation and device config, keeps kicking; never reads status, never resets. On a
		 * line (INTx, virtio-mmio) its interrupt handler reads the ISR / InterruptStatus (and
		 * acknowledges it on virtio-mmio) first, as vp_interrupt / vm_interrupt do: polled here
		 * before each round, which clears it the same way. */
		u32 kick_ms = param_u32("kick_ms", 5);
		if (fault_delay)
			delay_ms(fault_delay);	/* a running guest: the fault comes later than init */
		u64 end = rdtsc() + ms_to_tsc(hold ? hold : 100);
		for (int i = 0; i < nscen; i++)
			if (selected(i, fault_sel))
				fault_dev(&devs[i], 0);
		u32 kicks = 0;
		while (rdtsc() < end) {
			delay_ms(kick_ms);
			for (int i = 0; i < nscen; i++) {
				if (!selected(i, fault_sel))
					continue;
				if (!devs[i].msix)
					(void)vd_isr(&devs[i]);
				(void)vd_generation(&devs[i]);
				(void)vd_config8(&devs[i], 0);
				vd_kick(&devs[i]);
				kicks++;
			}
		}
		flush_log();
		puts_("VRA linux");
		put_kv_dec("kicks", kicks);
		put_kv_dec("tsc", rdtsc());
		line_end();
	} else if (streq(scenario, "netkvm")) {
		/* Windows NetKVM: checks status every period_ms; on NEEDS_RESET writes 0 then
		 * 3, 11, 15 without waiting for the reset to read back 0. */
		u32 period = param_u32("period_ms", 10);
		for (u32 ep = 0; ep < repeat; ep++) {
			for (int i = 0; i < nscen; i++)
				if (selected(i, fault_sel))
					fault_dev(&devs[i], (short)ep);
			for (int i = 0; i < nscen; i++) {
				struct vdev *d = &devs[i];
				if (!selected(i, fault_sel))
					continue;
				u64 deadline = rdtsc() + ms_to_tsc(detect_ms);
				u32 reads = 0;
				for (;;) {
					u64 ti, tr;
					u8 s = vd_status_stamped(d, &ti, &tr);
					reads++;
					if (s & S_NEEDS_RESET) {
						log_ev(EV_NEEDS_RESET, d, (short)ep, s, reads, tr)->issue = ti;
						break;
					}
					if (tr > deadline) {
						log_ev(EV_TIMEOUT, d, (short)ep, 0, reads, tr);
						break;
					}
					delay_ms(period);
				}
				write_status(d, (short)ep, 0);
				init_dev(d, (short)ep, 1);
			}
			flush_log();
		}
	} else {
		fatal("unknown_scenario");
	}

	puts_("VRA done");
	put_kv_str("scenario", scenario);
	/* "linux" never reads status (that is the point of it) */
	for (int i = 0; i < ndevs && !streq(scenario, "linux"); i++) {
		puts_(" status");
		put_dec((u64)i);
		puts_("=");
		put_hex(vd_status(&devs[i]));
	}
	put_kv_dec("tsc", rdtsc());
	line_end();
	guest_exit(0);
}
