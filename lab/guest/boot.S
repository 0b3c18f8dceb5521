/* Entry for PVH (XEN_ELFNOTE_PHYS32_ENTRY: 32-bit protected mode, paging off, %ebx = start_info)
 * and multiboot v1 (header in multiboot.S, linked into guest-multiboot.elf only) (%eax = 0x2BADB002, %ebx = multiboot info). Interrupts stay disabled: the
 * guest polls, the host still sees every injection. */
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
	pushl %ebx
	pushl %eax
	call guest_main
1:	hlt
	jmp 1b

	.bss
	.align 16
	.space 65536
stack_top:
	.section .note.GNU-stack,"",@progbits
