#include "lib.h"

#define COM1 0x3f8
#define DEBUG_EXIT_PORT 0xf4

void *memset(void *d, int c, u32 n)
{
	u8 *p = d;
	while (n--)
		*p++ = (u8)c;
	return d;
}

void *memcpy(void *d, const void *s, u32 n)
{
	u8 *p = d;
	const u8 *q = s;
	while (n--)
		*p++ = *q++;
	return d;
}

int streq(const char *a, const char *b)
{
	while (*a && *a == *b) {
		a++;
		b++;
	}
	return *a == *b;
}

void serial_init(void)
{
	outb(COM1 + 1, 0x00);	/* no interrupts */
	outb(COM1 + 3, 0x80);	/* DLAB */
	outb(COM1 + 0, 0x01);	/* 115200 */
	outb(COM1 + 1, 0x00);
	outb(COM1 + 3, 0x03);	/* 8N1 */
	outb(COM1 + 2, 0x07);	/* FIFO */
}

static void putc_(char c)
{
	/* QEMU's UART is always ready; no line-status polling (it would double the exits). */
	outb(COM1, (u8)c);
}

void puts_(const char *s)
{
	while (*s)
		putc_(*s++);
}

void put_dec(u64 v)
{
	char b[24];
	int i = 0;
	do {
		b[i++] = (char)('0' + v % 10);
		v /= 10;
	} while (v);
	while (i)
		putc_(b[--i]);
}

void put_sdec(long long v)
{
	if (v < 0) {
		putc_('-');
		v = -v;
	}
	put_dec((u64)v);
}

void put_hex(u64 v)
{
	int shift = 60;
	puts_("0x");
	while (shift > 0 && !((v >> shift) & 0xf))
		shift -= 4;
	for (; shift >= 0; shift -= 4)
		putc_("0123456789abcdef"[(v >> shift) & 0xf]);
}

void put_kv_dec(const char *k, u64 v)
{
	putc_(' ');
	puts_(k);
	putc_('=');
	put_dec(v);
}

void put_kv_hex(const char *k, u64 v)
{
	putc_(' ');
	puts_(k);
	putc_('=');
	put_hex(v);
}

void put_kv_str(const char *k, const char *v)
{
	putc_(' ');
	puts_(k);
	putc_('=');
	puts_(v);
}

void line_end(void) { putc_('\n'); }

void guest_exit(u32 code)
{
	/* isa-debug-exit: QEMU exits with status (code << 1) | 1 */
	outl(DEBUG_EXIT_PORT, code);
	for (;;)
		__asm__ volatile("cli; hlt");
}

void fatal(const char *msg)
{
	puts_("VRA error msg=");
	puts_(msg);
	line_end();
	guest_exit(2);
}

/* ---- time ---- */

u64 tsc_hz;

u64 ms_to_tsc(u32 ms) { return tsc_hz / 1000 * ms; }

void delay_ms(u32 ms)
{
	u64 end = rdtsc() + ms_to_tsc(ms);
	while (rdtsc() < end)
		__asm__ volatile("pause");
}

/* ---- command line ---- */

static char cmdline[512];

void cmdline_set(const char *s)
{
	u32 i = 0;
	if (s)
		for (; s[i] && i < sizeof(cmdline) - 1; i++)
			cmdline[i] = s[i];
	cmdline[i] = 0;
}

const char *cmdline_get(void) { return cmdline; }

/* Finds "key=" at a token start; returns a pointer to the value (ends at space/NUL). */
static const char *find_value(const char *key)
{
	const char *p = cmdline;
	while (*p) {
		while (*p == ' ')
			p++;
		const char *k = key, *q = p;
		while (*k && *q == *k) {
			k++;
			q++;
		}
		if (!*k && *q == '=')
			return q + 1;
		while (*p && *p != ' ')
			p++;
	}
	return 0;
}

u32 param_u32(const char *key, u32 dflt)
{
	const char *v = find_value(key);
	u32 n = 0;
	if (!v || *v < '0' || *v > '9')
		return dflt;
	while (*v >= '0' && *v <= '9')
		n = n * 10 + (u32)(*v++ - '0');
	if (*v && *v != ' ') {
		puts_("VRA error msg=bad_number key=");
		puts_(key);
		line_end();
		guest_exit(2);
	}
	return n;
}

const char *param_str(const char *key, const char *dflt)
{
	static char bufs[8][32];
	static int next;
	const char *v = find_value(key);
	if (!v)
		return dflt;
	char *b = bufs[next++ & 7];
	int i = 0;
	while (v[i] && v[i] != ' ' && i < 31) {
		b[i] = v[i];
		i++;
	}
	b[i] = 0;
	return b;
}

/* ---- TSC frequency ----
 * Preferred: the hypervisor timing leaf 0x40000010 (QEMU fills it with KVM's tsc_khz when
 * invtsc is exposed, e.g. -cpu host,migratable=no,+invtsc); then CPUID 0x15; else the PIT.
 * pit_ms=N measures against the PIT as well (reported as a cross-check). */

u64 tsc_hz_cpuid, tsc_hz_pit;
const char *tsc_src = "none";

static u64 pit_calibrate(u32 ms)
{
	u32 latch = 1193182u * ms / 1000u;
	if (!latch || latch > 0xffff)
		return 0;
	u8 v = inb(0x61);
	if (v == 0xff)
		return 0;	/* no PIT/port 0x61 (microvm without pit) */
	outb(0x61, (u8)((v & ~0x02) | 0x01));	/* gate 2 on, speaker off */
	outb(0x43, 0xb0);			/* channel 2, lo/hi, mode 0, binary */
	outb(0x42, (u8)(latch & 0xff));
	outb(0x42, (u8)(latch >> 8));		/* counting starts here */
	u64 t0 = rdtsc();
	u32 spins = 0;
	while (!(inb(0x61) & 0x20)) {
		if (++spins > 100000000u)
			return 0;
	}
	u64 t1 = rdtsc();
	outb(0x61, v);
	return (t1 - t0) * 1193182u / latch;
}

void tsc_calibrate(void)
{
	u32 r[4];
	cpuid(0x40000000, 0, r);
	if (r[0] >= 0x40000010 && r[0] < 0x40000100) {
		cpuid(0x40000010, 0, r);
		tsc_hz_cpuid = (u64)r[0] * 1000;
		if (tsc_hz_cpuid)
			tsc_src = "cpuid_40000010";
	}
	if (!tsc_hz_cpuid) {
		cpuid(0, 0, r);
		if (r[0] >= 0x15) {
			cpuid(0x15, 0, r);
			if (r[0] && r[1] && r[2]) {
				tsc_hz_cpuid = (u64)r[2] * r[1] / r[0];
				tsc_src = "cpuid_15";
			}
		}
	}
	u32 pit_ms = param_u32("pit_ms", tsc_hz_cpuid ? 0 : 20);
	if (pit_ms)
		tsc_hz_pit = pit_calibrate(pit_ms);
	u32 khz = param_u32("tsc_khz", 0);
	if (khz) {
		tsc_hz = (u64)khz * 1000;
		tsc_src = "cmdline";
	} else if (tsc_hz_cpuid) {
		tsc_hz = tsc_hz_cpuid;
	} else if (tsc_hz_pit) {
		tsc_hz = tsc_hz_pit;
		tsc_src = "pit";
	} else {
		fatal("no_tsc_frequency");
	}
}
