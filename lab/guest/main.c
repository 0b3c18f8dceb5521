/* Scripted virtio driver: scenario from the kernel command line, facts as "VRA ..." lines on
 * COM1, exit through isa-debug-exit. Timed sections only append to an in-memory log (serial
 * output costs a VM exit per byte); the log is printed between episodes. */
#include "lib.h"
#include "virtio.h"

enum ev_type { EV_STATUS, EV_FAULT, EV_NEEDS_RESET, EV_RESET_DONE, EV_TIMEOUT, EV_ISR, EV_KICK };

struct ev {
	u8 type, dev, value;
	short ep;
	u32 count;
	u64 tsc;
	u64 issue;	/* reads: TSC just before the access (tsc: just after) */
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

static const char *ev_names[] = { "status", "fault", "needs_reset", "reset_done", "timeout", "isr", "kick" };

static void flush_log(void)
{
	for (u32 i = 0; i < nlog; i++) {
		struct ev *e = &evlog[i];
		puts_("VRA ");
		puts_(ev_names[e->type]);
		put_kv_dec("dev", e->dev);
		puts_(" ep=");
		put_sdec(e->ep);
		if (e->type == EV_TIMEOUT)
			put_kv_str("what", e->value ? "reset_done" : "needs_reset");
		else if (e->type != EV_FAULT && e->type != EV_KICK)
			put_kv_hex("value", e->value);
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
			log_ev(EV_TIMEOUT, d, ep, 0, reads, t);
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
			log_ev(EV_TIMEOUT, d, ep, 1, reads, t);
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

static int selected(int i, int fault_sel)
{
	return fault_sel < 0 || fault_sel == i;
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
	detect_ms = param_u32("detect_ms", 200);
	reset_ms = param_u32("reset_ms", 1000);

	/* Software-enable the local APIC (SVR bit 8, spurious vector 0xff) so KVM accepts the
	 * MSIs into the IRR (kvm_apic_accept_irq) even though the guest never takes them. */
	mw32(0xfee000f0u, mr32(0xfee000f0u) | 0x1ffu);

	virtio_discover(t, irq);
	if (!ndevs)
		fatal("no_virtio_device");
	if (fault_sel >= ndevs)
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
		for (int i = 0; i < ndevs; i++)
			if (selected(i, fault_sel))
				fault_dev(&devs[i], 0);
		for (int i = 0; i < ndevs; i++)
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
			for (int i = 0; i < ndevs; i++)
				if (selected(i, fault_sel))
					fault_dev(&devs[i], (short)ep);
			for (int i = 0; i < ndevs; i++) {
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
		for (int i = 0; i < ndevs; i++) {
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
		for (int i = 0; i < ndevs; i++)
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
		for (int i = 0; i < ndevs; i++) {
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
		 * generation and device config, keeps kicking; never reads status, never resets. */
		u32 kick_ms = param_u32("kick_ms", 5);
		u64 end = rdtsc() + ms_to_tsc(hold ? hold : 100);
		for (int i = 0; i < ndevs; i++)
			if (selected(i, fault_sel))
				fault_dev(&devs[i], 0);
		u32 kicks = 0;
		while (rdtsc() < end) {
			delay_ms(kick_ms);
			for (int i = 0; i < ndevs; i++) {
				if (!selected(i, fault_sel))
					continue;
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
			for (int i = 0; i < ndevs; i++)
				if (selected(i, fault_sel))
					fault_dev(&devs[i], (short)ep);
			for (int i = 0; i < ndevs; i++) {
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
