/* Entry for PVH (XEN_ELFNOTE_PHYS32_ENTRY: 32-bit protected mode, paging off, %ebx = start_info)
 * and multiboot v1 (header in multiboot.S, linked into guest-multiboot.elf only) (%eax = 0x2BADB002, %ebx = multiboot info). Interrupts stay disabled: the
 * guest polls, the host still sees every injection; only while it waits for a queue interrupt
 * (irq.c) does it enable them. Neither boot protocol promises a usable GDT, so the guest loads
 * its own (flat code 0x08, data 0x10) before an interrupt gate can reference a selector. */
#define XEN_ELFNOTE_PHYS32_ENTRY 18

	.section .note.Xen, "a"
	.align 4
	.long 4				/* namesz */
	.long 4				/* descsz */
	.long XEN_ELFNOTE_PHYS32_ENTRY
	.asciz "Xen"
	.align 4
	.long _start

	.text
	.globl _start
_start:
	cli
	cld
	movl $stack_top, %esp
	/* Firmware may leave caching off (CR0.CD/NW as after reset). */
	movl %eax, %esi
	movl %cr0, %eax
	andl $~0x60000000, %eax
	movl %eax, %cr0
	movl %esi, %eax
	lgdt gdt_desc
	ljmp $0x08, $1f
1:	movl $0x10, %ecx
	movw %cx, %ds
	movw %cx, %es
	movw %cx, %ss
	movw %cx, %fs
	movw %cx, %gs
	pushl %ebx
	pushl %eax
	call guest_main
2:	hlt
	jmp 2b

/* One 16-byte stub per vector: push the vector number, then the common path, which calls
 * irq_dispatch(vector) (irq.c) with every general register saved. Exceptions that push an error
 * code are fatal in irq_dispatch, so the unpopped error code never matters. */
	.align 16
	.globl isr_stubs
isr_stubs:
	.set vec, 0
	.rept 256
	.align 16
	pushl $vec
	jmp isr_common
	.set vec, vec + 1
	.endr
/* The return does not use iret: KVM's instruction emulator handles iret in real mode only, and
 * a KVM that emulates it here (kvm_pvm does) fails with an internal error. Interrupts reach the
 * guest only while IF=1 (exceptions are fatal), so the return is: restore the arithmetic flags,
 * sti (its one-instruction shadow covers the ret), ret to the interrupted EIP; CS is unchanged. */
isr_common:
	pushal
	cld
	movl 32(%esp), %eax
	pushl %eax
	call irq_dispatch
	addl $4, %esp
	/* frame: 32 bytes of registers, vector +32, EIP +36, CS +40, EFLAGS +44 */
	movl 36(%esp), %eax
	movl 44(%esp), %ecx
	andl $~0x200, %ecx
	movl %ecx, 40(%esp)		/* CS slot <- EFLAGS without IF */
	movl %eax, 44(%esp)		/* EFLAGS slot <- EIP */
	popal
	addl $8, %esp			/* vector, EIP */
	popfl
	sti
	ret

	.data
	.align 8
gdt:
	.quad 0
	.quad 0x00cf9b000000ffff	/* 0x08: code, base 0, 4 GiB, 32-bit (accessed bit preset) */
	.quad 0x00cf93000000ffff	/* 0x10: data */
gdt_end:
	.align 4
gdt_desc:
	.word gdt_end - gdt - 1
	.long gdt

	.bss
	.align 16
	.space 65536
stack_top:
	.section .note.GNU-stack,"",@progbits
