/* The boot info page: how the VMM and the test guest talk about memory. The VMM (pagehint/kvm/
 * guest_program.py, class BootInfo, checked against this header by tests/kvm/test_guest.py)
 * fills the first part before the guest starts; the guest fills the second part. */
#ifndef PAGEHINT_BOOT_INFO_H
#define PAGEHINT_BOOT_INFO_H

#define BOOT_INFO_GPA 0xB000ULL
#define BOOT_MAGIC 0x3154534555474850ULL /* "PHGUEST1" */
#define MAX_REGIONS 4
#define AP_ENTRY_OFFSET 16        /* the second vCPU's entry, from the image's start */
#define AP_AREA_GPA 0x180000ULL   /* the pages the second vCPU writes, in the kernel's RAM */
#define AP_PAGES 64
#define AP_STACK_TOP 0x98000ULL

struct boot_info {
    u64 magic;
    u64 mmio_base;
    u64 block_bytes;
    u64 kernel_bytes;  /* RAM from gpa 0 the kernel keeps (code, stack, rings, state) */
    u64 state_base;    /* where the guest keeps its state (in the kernel bytes) */
    u32 nregions;
    u32 queue_size;
    u64 region_gpa[MAX_REGIONS];
    u64 region_size[MAX_REGIONS];
    /* written by the guest */
    u64 nblocks;
    u64 npages;
    u64 block_gpa_at;    /* u64[nblocks] */
    u64 block_state_at;  /* u8[nblocks]: FREE, USED, HINTED */
    u64 hinted_under_at; /* u32[nblocks]: the cmd id of the block's last hint */
    u64 page_version_at; /* u32[npages]: version of each page's content, 0 = never written */
    u64 desc_at;
    u64 avail_at;
    u64 used_at;
    u64 cmd_id_buf_at;   /* u32 active id, u32 STOP */
    u64 free_page_queue;
    u64 features;
    u32 driver_status;
    u32 cmd_id_active;
    u64 rounds;
    u64 blocks_hinted;
    u64 blocks_returned;
    u64 config_changes;
};

#endif
