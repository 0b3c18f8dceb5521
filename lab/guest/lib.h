#ifndef LIB_H
#define LIB_H

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;
typedef int i32;

static inline void outb(u16 p, u8 v) { __asm__ volatile("outb %0, %1" :: "a"(v), "Nd"(p)); }
static inline void outw(u16 p, u16 v) { __asm__ volatile("outw %0, %1" :: "a"(v), "Nd"(p)); }
static inline void outl(u16 p, u32 v) { __asm__ volatile("outl %0, %1" :: "a"(v), "Nd"(p)); }
static inline u8 inb(u16 p) { u8 v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(p)); return v; }
static inline u16 inw(u16 p) { u16 v; __asm__ volatile("inw %1, %0" : "=a"(v) : "Nd"(p)); return v; }
static inline u32 inl(u16 p) { u32 v; __asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(p)); return v; }

static inline u8 mr8(u32 a) { return *(volatile u8 *)a; }
static inline u16 mr16(u32 a) { return *(volatile u16 *)a; }
static inline u32 mr32(u32 a) { return *(volatile u32 *)a; }
static inline void mw8(u32 a, u8 v) { *(volatile u8 *)a = v; }
static inline void mw16(u32 a, u16 v) { *(volatile u16 *)a = v; }
static inline void mw32(u32 a, u32 v) { *(volatile u32 *)a = v; }

static inline u64 rdtsc(void)
{
	u32 lo, hi;
	__asm__ volatile("lfence; rdtsc" : "=a"(lo), "=d"(hi) :: "memory");
	return ((u64)hi << 32) | lo;
}

static inline void cpuid(u32 leaf, u32 sub, u32 r[4])
{
	__asm__ volatile("cpuid" : "=a"(r[0]), "=b"(r[1]), "=c"(r[2]), "=d"(r[3]) : "a"(leaf), "c"(sub));
}

static inline void barrier(void) { __asm__ volatile("" ::: "memory"); }

void *memset(void *d, int c, u32 n);
void *memcpy(void *d, const void *s, u32 n);
int streq(const char *a, const char *b);

/* serial output (COM1) */
void serial_init(void);
void puts_(const char *s);
void put_dec(u64 v);
void put_sdec(long long v);
void put_hex(u64 v);
void put_kv_dec(const char *k, u64 v);   /* " k=v" */
void put_kv_hex(const char *k, u64 v);   /* " k=0xv" */
void put_kv_str(const char *k, const char *v);
void line_end(void);

/* time */
extern u64 tsc_hz;
void tsc_calibrate(void);
extern u64 tsc_hz_cpuid, tsc_hz_pit;
extern const char *tsc_src;
void delay_ms(u32 ms);
u64 ms_to_tsc(u32 ms);

/* kernel command line: "key=value" tokens and bare words */
void cmdline_set(const char *s);
const char *cmdline_get(void);
u32 param_u32(const char *key, u32 dflt);
const char *param_str(const char *key, const char *dflt); /* returns a static copy */

void guest_exit(u32 code) __attribute__((noreturn));
void fatal(const char *msg) __attribute__((noreturn));

#endif
