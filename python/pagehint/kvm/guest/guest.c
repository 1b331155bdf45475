/* pagehint's test guest: a freestanding x86_64 program the VMM starts in long mode.
 *
 * It owns its RAM the way a small kernel does: a 4 MiB block allocator over the RAM regions
 * the VMM describes in the boot info, pages whose content it can verify (two words derived
 * from the page's index and a version it keeps per page), and a virtio-mmio driver for the
 * balloon's free page hinting that behaves as Linux's drivers/virtio/virtio_balloon.c: it
 * reads the cmd id only after a config change, posts the id as an out-buffer, then one 4 MiB
 * in-buffer per free block (which it keeps allocated), ends the round with STOP, frees the
 * hinted blocks on DONE, and its shrinker can take hinted blocks back early.
 *
 * The VMM drives it through port I/O: the guest reads a command (port 0x510) and its
 * arguments (0x511), runs it, and writes the result (0x512). Interrupts are polled: the guest
 * reads the transport's InterruptStatus (no irqchip, no IDT), as a guest with interrupts
 * masked would.
 *
 * Build (pagehint/kvm/build.py): gcc -m64 -ffreestanding -nostdlib -mgeneral-regs-only (SSE
 * stops this KVM's guests), linked at 1 MiB by guest.ld, objcopy -O binary.
 */

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

#define PAGE 4096ULL

#include "boot_info.h"

enum { FREE = 0, USED = 1, HINTED = 2 };

/* Port I/O with the VMM. */
enum { PORT_CMD = 0x510, PORT_ARG = 0x511, PORT_RESULT = 0x512, PORT_PANIC = 0x513 };
enum { PORT_AP = 0x514, PORT_AP_DONE = 0x515, PORT_RUN = 0x516 };
#define AP_NOTHING 0xFFFFFFFFU
enum {
    CMD_NOP = 0,
    CMD_ALLOC_WRITE = 1, /* n: allocate n blocks and write every page; -> blocks allocated */
    CMD_FREE = 2,        /* n: free the n most recently allocated blocks; -> blocks freed */
    CMD_WRITE_PAGES = 3, /* n, seed: rewrite n pages of used blocks; -> pages written */
    CMD_POLL = 4,        /* handle a pending config change (a hinting round); -> blocks hinted */
    CMD_SHRINK = 5,      /* n: take n hinted blocks back and write them; -> blocks taken */
    CMD_SELFCHECK = 6,   /* -> bad pages (then a second result: bad allocator/ring facts) */
    CMD_PROBE = 7,       /* probe the virtio-mmio device; -> status register */
    CMD_HALT = 8,
    CMD_PING = 9,        /* n: -> n + 1 */
    CMD_WRITE_AT = 10,   /* gpa >> 12, n: write n pages from there (one region); -> n */
    CMD_RUN = 11,        /* n, seed: run by itself: rewrite n pages, poll the balloon, ask the
                            VMM (port 0x516) whether to go on; -> the steps run */
};

/* virtio-mmio registers (virtio 1.2 §4.2.2). */
enum {
    MMIO_MAGIC = 0x000, MMIO_VERSION = 0x004, MMIO_DEVICE_ID = 0x008,
    MMIO_DEVICE_FEATURES = 0x010, MMIO_DEVICE_FEATURES_SEL = 0x014,
    MMIO_DRIVER_FEATURES = 0x020, MMIO_DRIVER_FEATURES_SEL = 0x024,
    MMIO_QUEUE_SEL = 0x030, MMIO_QUEUE_NUM_MAX = 0x034, MMIO_QUEUE_NUM = 0x038,
    MMIO_QUEUE_READY = 0x044, MMIO_QUEUE_NOTIFY = 0x050,
    MMIO_INTERRUPT_STATUS = 0x060, MMIO_INTERRUPT_ACK = 0x064, MMIO_STATUS = 0x070,
    MMIO_QUEUE_DESC_LOW = 0x080, MMIO_QUEUE_DESC_HIGH = 0x084,
    MMIO_QUEUE_DRIVER_LOW = 0x090, MMIO_QUEUE_DRIVER_HIGH = 0x094,
    MMIO_QUEUE_DEVICE_LOW = 0x0a0, MMIO_QUEUE_DEVICE_HIGH = 0x0a4,
    MMIO_CONFIG = 0x100,
};
enum { S_ACKNOWLEDGE = 1, S_DRIVER = 2, S_DRIVER_OK = 4, S_FEATURES_OK = 8, S_FAILED = 128 };
#define F_STATS_VQ (1ULL << 1)
#define F_FREE_PAGE_HINT (1ULL << 3)
#define F_VERSION_1 (1ULL << 32)
#define CONFIG_CMD_ID 8
#define CMD_ID_STOP 0
#define CMD_ID_DONE 1
#define VIRTQ_DESC_F_NEXT 1
#define VIRTQ_DESC_F_WRITE 2

struct virtq_desc { u64 addr; u32 len; u16 flags; u16 next; };

static struct boot_info *const boot = (struct boot_info *)BOOT_INFO_GPA;

/* gcc emits calls to these for struct copies and large zeroing. */
void *memset(void *dst, int c, unsigned long n) {
    u8 *d = dst;
    /* Word stores where aligned: at ~1.5 M instructions/s the boot zeroes its state in
     * milliseconds instead of a second. */
    u64 word = 0x0101010101010101ULL * (u8)c;
    while (n && ((u64)d & 7)) { *d++ = (u8)c; n--; }
    for (; n >= 8; n -= 8, d += 8) *(volatile u64 *)d = word;
    while (n--) *d++ = (u8)c;
    return dst;
}
void *memcpy(void *dst, const void *src, unsigned long n) {
    u8 *d = dst;
    const u8 *s = src;
    while (n--) *d++ = *s++;
    return dst;
}

static inline void outl(u16 port, u32 v) { __asm__ volatile("outl %0, %1" : : "a"(v), "Nd"(port)); }
static inline u32 inl(u16 port) {
    u32 v;
    __asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(port));
    return v;
}
static inline void barrier(void) { __asm__ volatile("" ::: "memory"); }

static void panic(u32 code) {
    outl(PORT_PANIC, code);
    for (;;) __asm__ volatile("hlt");
}

static inline u32 mmio_read(u32 off) { return *(volatile u32 *)(boot->mmio_base + off); }
static inline void mmio_write(u32 off, u32 v) { *(volatile u32 *)(boot->mmio_base + off) = v; }

/* -- guest state -------------------------------------------------------------------------- */

static u64 *block_gpa;
static u8 *block_state;
static u32 *hinted_under;
static u32 *page_version;
static u64 *region_first_page; /* page index of each region's first page */
static u32 version_seq;

/* The free list and the driver's hinted list: stacks, newest on top (the buddy's LIFO). */
static u32 *free_stack;
static u64 nfree;
static u32 *hinted_stack;
static u64 nhinted;
static u32 *used_stack;
static u64 nused;
static u64 nkernel; /* the kernel's blocks: the bottom of the used stack, never freed */

static u64 page_index(u64 gpa) {
    for (u32 r = 0; r < boot->nregions; r++) {
        if (gpa >= boot->region_gpa[r] && gpa < boot->region_gpa[r] + boot->region_size[r])
            return region_first_page[r] + (gpa - boot->region_gpa[r]) / PAGE;
    }
    panic(0xbad0);
    return 0;
}

/* A page's content: its index and version in the first word, their complement in the last. */
static inline u64 content(u64 index, u32 version) { return index << 32 | version; }

static void write_page(u64 gpa, u64 index, u32 version) {
    volatile u64 *p = (volatile u64 *)gpa;
    p[0] = content(index, version);
    p[PAGE / 8 - 1] = ~content(index, version);
    page_version[index] = version;
}

static void write_block(u32 b) {
    u32 version = ++version_seq;
    u64 gpa = block_gpa[b];
    u64 first = page_index(gpa);
    for (u64 i = 0; i < boot->block_bytes / PAGE; i++) write_page(gpa + i * PAGE, first + i, version);
}

static u64 alloc_state(u64 *cursor, u64 bytes) {
    u64 at = *cursor;
    *cursor = (at + bytes + 63) & ~63ULL;
    if (*cursor > boot->kernel_bytes) panic(0xbad1);
    memset((void *)at, 0, bytes);
    return at;
}

/* -- the virtio ring (split, virtio 1.2 §2.7) ---------------------------------------------- */

static struct virtq_desc *desc;
static volatile u16 *avail; /* flags, idx, ring[size], used_event */
static volatile u16 *used;  /* flags, idx, then {u32 id, u32 len}[size] */
static u16 qsize;
static u16 free_head;
static u16 num_free;
static u16 avail_idx;
static u16 last_used;
static u32 *cmd_buf;

static void ring_reclaim(void) {
    barrier();
    u16 used_idx = used[1];
    barrier();
    while (last_used != used_idx) {
        volatile u32 *elem = (volatile u32 *)(used + 2) + 2 * (last_used % qsize);
        u16 head = (u16)elem[0];
        /* Every element here is one descriptor: free it. */
        desc[head].next = free_head;
        free_head = head;
        num_free++;
        last_used++;
    }
}

static void ring_add(u64 addr, u32 len, u16 flags) {
    if (num_free == 0) panic(0xbad2);
    u16 head = free_head;
    free_head = desc[head].next;
    num_free--;
    desc[head].addr = addr;
    desc[head].len = len;
    desc[head].flags = flags;
    avail[2 + avail_idx % qsize] = head;
    barrier();
    avail_idx++;
    avail[1] = avail_idx;
}

static void kick(void) {
    barrier();
    mmio_write(MMIO_QUEUE_NOTIFY, (u32)boot->free_page_queue);
}

/* Room for at least `want` more descriptors: kick, then wait for the device to use buffers
 * (it may run on a thread of its own). Bounded: a device that never answers ends the round. */
static int wait_for_room(u16 want) {
    ring_reclaim();
    if (num_free >= want) return 1;
    kick();
    for (u32 spin = 0; spin < 2000000; spin++) {
        ring_reclaim();
        if (num_free >= want) return 1;
        __asm__ volatile("pause");
    }
    return 0;
}

/* -- the driver ----------------------------------------------------------------------------- */

static u32 probe(void) {
    if (mmio_read(MMIO_MAGIC) != 0x74726976 || mmio_read(MMIO_VERSION) != 2 ||
        mmio_read(MMIO_DEVICE_ID) != 5)
        return 0;
    mmio_write(MMIO_STATUS, 0);
    mmio_write(MMIO_STATUS, S_ACKNOWLEDGE);
    mmio_write(MMIO_STATUS, S_ACKNOWLEDGE | S_DRIVER);
    mmio_write(MMIO_DEVICE_FEATURES_SEL, 0);
    u64 offered = mmio_read(MMIO_DEVICE_FEATURES);
    mmio_write(MMIO_DEVICE_FEATURES_SEL, 1);
    offered |= (u64)mmio_read(MMIO_DEVICE_FEATURES) << 32;
    /* As Linux: the stats queue and free page hinting; VERSION_1 for a modern device. */
    u64 wanted = (F_STATS_VQ | F_FREE_PAGE_HINT | F_VERSION_1) & offered;
    mmio_write(MMIO_DRIVER_FEATURES_SEL, 0);
    mmio_write(MMIO_DRIVER_FEATURES, (u32)wanted);
    mmio_write(MMIO_DRIVER_FEATURES_SEL, 1);
    mmio_write(MMIO_DRIVER_FEATURES, (u32)(wanted >> 32));
    mmio_write(MMIO_STATUS, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK);
    if (!(mmio_read(MMIO_STATUS) & S_FEATURES_OK) || !(wanted & F_FREE_PAGE_HINT)) {
        mmio_write(MMIO_STATUS, S_FAILED);
        return mmio_read(MMIO_STATUS);
    }
    boot->features = wanted;
    /* Queues are numbered densely: inflate, deflate, stats if negotiated, free page. */
    u32 q = (wanted & F_STATS_VQ) ? 3 : 2;
    boot->free_page_queue = q;
    mmio_write(MMIO_QUEUE_SEL, q);
    u32 max = mmio_read(MMIO_QUEUE_NUM_MAX);
    qsize = (u16)(boot->queue_size < max ? boot->queue_size : max);
    if (qsize == 0) panic(0xbad3);
    for (u16 i = 0; i < qsize; i++) desc[i].next = (u16)(i + 1);
    free_head = 0;
    num_free = qsize;
    avail_idx = 0;
    last_used = 0;
    mmio_write(MMIO_QUEUE_NUM, qsize);
    mmio_write(MMIO_QUEUE_DESC_LOW, (u32)boot->desc_at);
    mmio_write(MMIO_QUEUE_DESC_HIGH, (u32)(boot->desc_at >> 32));
    mmio_write(MMIO_QUEUE_DRIVER_LOW, (u32)boot->avail_at);
    mmio_write(MMIO_QUEUE_DRIVER_HIGH, (u32)(boot->avail_at >> 32));
    mmio_write(MMIO_QUEUE_DEVICE_LOW, (u32)boot->used_at);
    mmio_write(MMIO_QUEUE_DEVICE_HIGH, (u32)(boot->used_at >> 32));
    mmio_write(MMIO_QUEUE_READY, 1);
    mmio_write(MMIO_STATUS, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
    boot->driver_status = mmio_read(MMIO_STATUS);
    return boot->driver_status;
}

static u32 cmd_id_received = CMD_ID_STOP;
static int read_cmd_id; /* VIRTIO_BALLOON_CONFIG_READ_CMD_ID: set by a config change */

/* Polls the interrupt status as an interrupt handler would run: a config change makes the
 * next cmd id check read the config (virtballoon_changed). */
static void poll_interrupts(void) {
    u32 isr = mmio_read(MMIO_INTERRUPT_STATUS);
    if (isr) mmio_write(MMIO_INTERRUPT_ACK, isr);
    if (isr & 2) {
        read_cmd_id = 1;
        boot->config_changes++;
    }
}

static u32 cmd_id(void) {
    if (read_cmd_id) {
        read_cmd_id = 0;
        cmd_id_received = mmio_read(MMIO_CONFIG + CONFIG_CMD_ID);
    }
    return cmd_id_received;
}

static void return_hinted(void) {
    while (nhinted) {
        u32 b = hinted_stack[--nhinted];
        block_state[b] = FREE;
        free_stack[nfree++] = b;
        boot->blocks_returned++;
    }
}

/* One hinting round (report_free_page_func): returns the blocks hinted. */
static u32 hint_round(u32 id) {
    u32 hinted = 0;
    boot->cmd_id_active = id;
    boot->rounds++;
    cmd_buf[0] = id;
    if (!wait_for_room(1)) return 0;
    ring_add((u64)&cmd_buf[0], 4, 0);
    kick();
    for (;;) {
        poll_interrupts();
        if (cmd_id() != boot->cmd_id_active) break; /* the device stopped the round */
        /* One entry stays free for the STOP that ends the round. */
        if (!wait_for_room(2)) break;
        if (nfree == 0) break; /* every free block is hinted */
        u32 b = free_stack[--nfree];
        block_state[b] = HINTED;
        hinted_under[b] = id;
        hinted_stack[nhinted++] = b;
        ring_add(block_gpa[b], (u32)boot->block_bytes, VIRTQ_DESC_F_WRITE);
        hinted++;
        boot->blocks_hinted++;
        if (hinted % 16 == 0) kick();
    }
    cmd_buf[1] = CMD_ID_STOP;
    if (wait_for_room(1)) ring_add((u64)&cmd_buf[1], 4, 0);
    kick();
    ring_reclaim();
    return hinted;
}

static u32 poll_device(void) {
    if (!boot->free_page_queue) return 0;
    poll_interrupts();
    u32 id = cmd_id();
    ring_reclaim();
    if (id == CMD_ID_DONE) {
        return_hinted();
        return 0;
    }
    if (id == CMD_ID_STOP || id == boot->cmd_id_active) return 0;
    return hint_round(id);
}

/* -- the allocator and workloads ------------------------------------------------------------ */

static u32 alloc_block(void) {
    if (nfree == 0) {
        /* The shrinker: memory pressure takes hinted blocks back first, newest first. */
        if (nhinted == 0) return ~0U;
        u32 b = hinted_stack[--nhinted];
        block_state[b] = USED;
        used_stack[nused++] = b;
        return b;
    }
    u32 b = free_stack[--nfree];
    block_state[b] = USED;
    used_stack[nused++] = b;
    return b;
}

static u32 alloc_write(u32 n) {
    u32 done = 0;
    for (; done < n; done++) {
        u32 b = alloc_block();
        if (b == ~0U) break;
        write_block(b);
    }
    return done;
}

static u32 free_blocks(u32 n) {
    u32 done = 0;
    for (; done < n && nused > nkernel; done++) { /* the kernel's blocks stay */
        u32 b = used_stack[--nused];
        block_state[b] = FREE;
        free_stack[nfree++] = b;
    }
    return done;
}

static u32 shrink(u32 n) {
    u32 done = 0;
    for (; done < n && nhinted; done++) {
        u32 b = hinted_stack[--nhinted];
        block_state[b] = USED;
        used_stack[nused++] = b;
        write_block(b);
    }
    return done;
}

static u64 rng_state;
static u64 rng(void) {
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return rng_state;
}

static u32 write_pages(u32 n, u32 seed) {
    if (nused <= nkernel) return 0;
    rng_state = 0x9E3779B97F4A7C15ULL ^ seed;
    u64 per_block = boot->block_bytes / PAGE;
    for (u32 i = 0; i < n; i++) {
        u32 b = used_stack[nkernel + rng() % (nused - nkernel)];
        u64 gpa = block_gpa[b] + (rng() % per_block) * PAGE;
        write_page(gpa, page_index(gpa), ++version_seq);
    }
    return n;
}

/* The VMM names the pages (dirty-log tests): each must be RAM, outside the kernel. */
static u32 write_at(u64 gpa, u32 n) {
    for (u32 i = 0; i < n; i++, gpa += PAGE) {
        if (gpa < boot->kernel_bytes) panic(0xbad6);
        write_page(gpa, page_index(gpa), ++version_seq);
    }
    return n;
}

/* The guest's life while it migrates: work, the balloon's rounds, and a question (an IN the
 * VMM answers) between steps: go on? The VMM may stop the vCPU anywhere; a copy resumed on a
 * destination finishes its step and is told to stop there. */
static u32 run(u32 pages_per_step, u32 seed) {
    u32 steps = 0;
    while (inl(PORT_RUN)) {
        write_pages(pages_per_step, seed + steps);
        poll_device();
        steps++;
    }
    return steps;
}

/* Every page of every used block holds what was last written there. */
static u32 selfcheck_pages(void) {
    u32 bad = 0;
    u64 per_block = boot->block_bytes / PAGE;
    for (u64 b = 0; b < boot->nblocks; b++) {
        if (block_state[b] != USED) continue;
        u64 gpa = block_gpa[b];
        u64 first = page_index(gpa);
        for (u64 i = 0; i < per_block; i++) {
            if (gpa + i * PAGE < boot->kernel_bytes) continue; /* the kernel itself */
            volatile u64 *p = (volatile u64 *)(gpa + i * PAGE);
            u32 v = page_version[first + i];
            if (p[0] != content(first + i, v) || p[PAGE / 8 - 1] != ~content(first + i, v)) bad++;
        }
    }
    return bad;
}

/* The allocator's lists agree with the block states, and the ring's counts add up. */
static u32 selfcheck_state(void) {
    u32 bad = 0;
    u64 counts[3] = {0, 0, 0};
    for (u64 b = 0; b < boot->nblocks; b++) {
        if (block_state[b] > HINTED) bad++;
        else counts[block_state[b]]++;
    }
    if (counts[FREE] != nfree || counts[USED] != nused || counts[HINTED] != nhinted) bad++;
    for (u64 i = 0; i < nfree; i++) if (block_state[free_stack[i]] != FREE) bad++;
    for (u64 i = 0; i < nused; i++) if (block_state[used_stack[i]] != USED) bad++;
    for (u64 i = 0; i < nhinted; i++) if (block_state[hinted_stack[i]] != HINTED) bad++;
    if (qsize) {
        u16 in_flight = (u16)(avail_idx - last_used);
        if ((u16)(in_flight + num_free) != qsize) bad++;
        if ((u16)(used[1] - last_used) > qsize) bad++;
    }
    return bad;
}

/* -- boot ------------------------------------------------------------------------------------ */

static void init(void) {
    if (boot->magic != BOOT_MAGIC || boot->nregions == 0 || boot->nregions > MAX_REGIONS) panic(0xbad4);
    u64 cursor = boot->state_base;
    u64 nblocks = 0, npages = 0;
    for (u32 r = 0; r < boot->nregions; r++) {
        u64 lo = (boot->region_gpa[r] + boot->block_bytes - 1) / boot->block_bytes * boot->block_bytes;
        u64 hi = (boot->region_gpa[r] + boot->region_size[r]) / boot->block_bytes * boot->block_bytes;
        if (hi > lo) nblocks += (hi - lo) / boot->block_bytes;
        npages += boot->region_size[r] / PAGE;
    }
    boot->nblocks = nblocks;
    boot->npages = npages;
    region_first_page = (u64 *)alloc_state(&cursor, 8 * MAX_REGIONS);
    u64 first = 0;
    for (u32 r = 0; r < boot->nregions; r++) {
        region_first_page[r] = first;
        first += boot->region_size[r] / PAGE;
    }
    block_gpa = (u64 *)(boot->block_gpa_at = alloc_state(&cursor, 8 * nblocks));
    block_state = (u8 *)(boot->block_state_at = alloc_state(&cursor, nblocks));
    hinted_under = (u32 *)(boot->hinted_under_at = alloc_state(&cursor, 4 * nblocks));
    page_version = (u32 *)(boot->page_version_at = alloc_state(&cursor, 4 * npages));
    free_stack = (u32 *)alloc_state(&cursor, 4 * nblocks);
    hinted_stack = (u32 *)alloc_state(&cursor, 4 * nblocks);
    used_stack = (u32 *)alloc_state(&cursor, 4 * nblocks);
    u64 q = boot->queue_size;
    cursor = (cursor + 4095) & ~4095ULL;
    desc = (struct virtq_desc *)(boot->desc_at = alloc_state(&cursor, 16 * q));
    avail = (volatile u16 *)(boot->avail_at = alloc_state(&cursor, 6 + 2 * q));
    cursor = (cursor + 4095) & ~4095ULL;
    used = (volatile u16 *)(boot->used_at = alloc_state(&cursor, 6 + 8 * q));
    /* The used ring has its pages to itself: only the device writes them. */
    cursor = (cursor + 4095) & ~4095ULL;
    cmd_buf = (u32 *)(boot->cmd_id_buf_at = alloc_state(&cursor, 8));
    u64 b = 0;
    for (u32 r = 0; r < boot->nregions; r++) {
        u64 lo = (boot->region_gpa[r] + boot->block_bytes - 1) / boot->block_bytes * boot->block_bytes;
        u64 hi = (boot->region_gpa[r] + boot->region_size[r]) / boot->block_bytes * boot->block_bytes;
        for (u64 g = lo; g < hi; g += boot->block_bytes) block_gpa[b++] = g;
    }
    /* Blocks holding the kernel are used from boot; the rest are free, the lowest on top. */
    for (u64 i = nblocks; i-- > 0;) {
        if (block_gpa[i] < boot->kernel_bytes) {
            block_state[i] = USED;
            used_stack[nused++] = (u32)i;
            nkernel++;
        } else {
            free_stack[nfree++] = (u32)i;
        }
    }
}

void main(void) {
    init();
    for (;;) {
        u32 cmd = inl(PORT_CMD);
        u32 r = 0;
        switch (cmd) {
        case CMD_NOP: continue; /* nothing to do yet: ask again */
        case CMD_ALLOC_WRITE: r = alloc_write(inl(PORT_ARG)); break;
        case CMD_FREE: r = free_blocks(inl(PORT_ARG)); break;
        case CMD_WRITE_PAGES: { u32 n = inl(PORT_ARG); r = write_pages(n, inl(PORT_ARG)); break; }
        case CMD_POLL: r = poll_device(); break;
        case CMD_SHRINK: r = shrink(inl(PORT_ARG)); break;
        case CMD_SELFCHECK: outl(PORT_RESULT, selfcheck_pages()); r = selfcheck_state(); break;
        case CMD_PROBE: r = probe(); break;
        case CMD_HALT: for (;;) __asm__ volatile("hlt");
        case CMD_PING: r = inl(PORT_ARG) + 1; break;
        case CMD_RUN: { u32 n = inl(PORT_ARG); r = run(n, inl(PORT_ARG)); break; }
        case CMD_WRITE_AT: { u64 gpa = (u64)inl(PORT_ARG) << 12; r = write_at(gpa, inl(PORT_ARG)); break; }
        default: panic(0xbad5);
        }
        outl(PORT_RESULT, r);
    }
}

/* -- the second vCPU ------------------------------------------------------------------------ */

/* It writes pages of its own area on request: n pages, each stamped with a round number, so
 * two vCPUs dirty memory at once (and each fills its own dirty ring). */
void ap_main(void) {
    for (;;) {
        u32 n = inl(PORT_AP);
        if (n == AP_NOTHING) continue;
        if (n == 0) for (;;) __asm__ volatile("hlt");
        u32 round = inl(PORT_AP);
        for (u32 i = 0; i < n; i++) {
            volatile u64 *p = (volatile u64 *)(AP_AREA_GPA + (i % AP_PAGES) * PAGE);
            p[0] = round;
        }
        outl(PORT_AP_DONE, n);
    }
}

/* Entry points: the first vCPU at the image's start, the second 16 bytes in. */
__attribute__((section(".text.entry"), naked, noreturn)) void _start(void) {
    __asm__ volatile(
        "call main\n1: hlt\njmp 1b\n"
        ".balign 16\n"
        "call ap_main\n2: hlt\njmp 2b\n");
}
