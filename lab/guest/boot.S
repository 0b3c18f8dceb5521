/* Entry for PVH (XEN_ELFNOTE_PHYS32_ENTRY: 32-bit protected mode, paging off, %ebx = start_info)
 * and multiboot v1 (%eax = 0x2BADB002, %ebx = multiboot info). Interrupts stay disabled: the
 * guest polls, the host still sees every injection. */
#define XEN_ELFNOTE_PHYS32_ENTRY 18
#define MB_MAGIC 0x1BADB002

	.section .multiboot, "a"
	.align 4
	.long MB_MAGIC
	.long 0
	.long -MB_MAGIC

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
	/* Firmware may leave caching off (CR0.CD/NW from reset, MTRRs disabled): every
	 * memory access would then be uncached, which makes a memset take milliseconds. */
	movl %eax, %esi
	movl %cr0, %eax
	andl $~0x60000000, %eax
	movl %eax, %cr0
	movl $0x2ff, %ecx		/* IA32_MTRR_DEF_TYPE: MTRRs on, default write-back */
	rdmsr
	movl $0xc06, %eax
	wrmsr
	/* Identity-map 4 GiB with 4 MiB pages and turn paging on. Under a shadow-paging or
	 * software hypervisor (e.g. kvm_pvm) a guest without paging may run emulated, where each
	 * memory access costs microseconds. Device windows (>= 3 GiB) are uncached (PCD|PWT). */
	xorl %ecx, %ecx
2:	movl %ecx, %eax
	shll $22, %eax
	orl $0x83, %eax			/* present, writable, 4 MiB */
	cmpl $768, %ecx
	jb 3f
	orl $0x18, %eax			/* PCD|PWT */
3:	movl %eax, page_dir(,%ecx,4)
	incl %ecx
	cmpl $1024, %ecx
	jb 2b
	movl $page_dir, %eax
	movl %eax, %cr3
	movl %cr4, %eax
	orl $0x10, %eax			/* PSE */
	movl %eax, %cr4
	movl %cr0, %eax
	orl $0x80000000, %eax
	movl %eax, %cr0
	jmp 4f
4:	movl %esi, %eax
	pushl %ebx
	pushl %eax
	call guest_main
1:	hlt
	jmp 1b

	.bss
	.align 4096
page_dir:
	.space 4096
	.align 16
	.space 65536
stack_top:
	.section .note.GNU-stack,"",@progbits
