/* Multiboot v1 header. QEMU's -kernel tries multiboot before the PVH note, so it is linked only
 * into build/guest-multiboot.elf; build/guest.elf boots through PVH. */
#define MB_MAGIC 0x1BADB002
	.section .multiboot, "a"
	.align 4
	.long MB_MAGIC
	.long 0
	.long -MB_MAGIC
	.section .note.GNU-stack,"",@progbits
