/*
 * The platform layer: every memory system call of the kernel goes through
 * these functions, and nothing else in _mman/ makes one. A port to another
 * system implements this header in a file of its own (os_linux.c and
 * os_linux_files.c are Linux's); docs/architecture.md, "Porting", says what
 * each function must do there and what a capability degrades to.
 *
 * Rules for every function here:
 *   - it returns 0 or an errno value (never -1 with errno set), so that a
 *     caller can hold the value across other calls;
 *   - it never touches Python: these run without the GIL, in the child's
 *     fork handler and, for file regions, inside a signal handler; the ones
 *     a signal handler uses are marked async-signal-safe;
 *   - flags are Linux's values (PROT_*, MAP_*, MADV_*): the library's policy
 *     speaks them, and another port translates them.
 */
#ifndef MMAP_ALLOC_PLATFORM_H
#define MMAP_ALLOC_PLATFORM_H

#include <stddef.h>
#include <stdint.h>
#include <sys/mman.h>
#include <sys/types.h>

/* Linux ABI values the C library's headers may predate (manylinux). */
#ifndef MAP_FIXED_NOREPLACE
#define MAP_FIXED_NOREPLACE 0x100000
#endif
#ifndef MAP_HUGE_SHIFT
#define MAP_HUGE_SHIFT 26
#endif
#ifndef MADV_FREE
#define MADV_FREE 8
#endif
#ifndef MADV_WIPEONFORK
#define MADV_WIPEONFORK 18
#define MADV_KEEPONFORK 19
#endif
#ifndef MADV_COLD
#define MADV_COLD 20
#define MADV_PAGEOUT 21
#endif
#ifndef MADV_POPULATE_READ
#define MADV_POPULATE_READ 22
#define MADV_POPULATE_WRITE 23
#endif
#ifndef MADV_COLLAPSE
#define MADV_COLLAPSE 25
#endif
#ifndef MADV_GUARD_INSTALL
#define MADV_GUARD_INSTALL 102
#define MADV_GUARD_REMOVE 103
#endif
#ifndef MFD_CLOEXEC
#define MFD_CLOEXEC 0x1U
#define MFD_ALLOW_SEALING 0x2U
#endif
#ifndef MFD_HUGETLB
#define MFD_HUGETLB 0x4U
#endif
#ifndef MFD_EXEC
#define MFD_NOEXEC_SEAL 0x8U
#define MFD_EXEC 0x10U
#endif
#ifndef F_ADD_SEALS
#define F_ADD_SEALS 1033
#define F_GET_SEALS 1034
#define F_SEAL_SEAL 0x0001
#define F_SEAL_SHRINK 0x0002
#define F_SEAL_GROW 0x0004
#define F_SEAL_WRITE 0x0008
#endif
#ifndef F_SEAL_FUTURE_WRITE
#define F_SEAL_FUTURE_WRITE 0x0010
#endif

#define PROT_RW (PROT_READ | PROT_WRITE)
#define PROT_ALL (PROT_READ | PROT_WRITE | PROT_EXEC)

/* ------------------------------------------------------------------ */
/* memory (os_linux.c)                                                 */

/* The base page size of the system. */
size_t os_page_size(void);

/* Map length bytes with prot and mflags (MAP_SHARED or MAP_PRIVATE of fd at
 * offset; fd < 0: anonymous private memory, whatever mflags says about
 * sharing). hint: NULL, or where to map: with MAP_FIXED_NOREPLACE exactly
 * there or EEXIST (EADDRNOTAVAIL when the kernel took the flag for a hint);
 * with MAP_FIXED over whatever the caller owns there. async-signal-safe. */
int os_map(void **out, void *hint, size_t length, int prot, int mflags, int fd, off_t offset);
/* os_map at a multiple of align (a power of two), over-mapping and trimming
 * the excess; natural: the alignment such a mapping gets anyway (the page;
 * the huge page for hugetlb). Nothing is left mapped on failure. */
int os_map_aligned(void **out, size_t length, size_t align, size_t natural, int prot,
                   int mflags, int fd, off_t offset);
int os_unmap(void *p, size_t length);   /* async-signal-safe */
int os_protect(void *p, size_t length, int prot);
int os_advise(void *p, size_t length, int advice);
/* MADV_GUARD_INSTALL on two ranges at once where the kernel takes advice for
 * the calling process in one call (process_madvise), else one by one. */
int os_install_guards(void *a, size_t alength, void *b, size_t blength);
/* Grow [p, p + oldlen) to newlen where it is; ENOMEM when the pages after it
 * are taken. */
int os_grow_in_place(void *p, size_t oldlen, size_t newlen);
/* Move [p, p + oldlen) to a new place of newlen bytes (at target, which the
 * caller reserved, when not NULL); the pages move, nothing is copied.
 * EFAULT or EINVAL: this mapping cannot be moved that way (copy instead). */
int os_move(void **out, void *p, size_t oldlen, size_t newlen, void *target);
int os_lock(void *p, size_t length, int on_fault);
int os_unlock(void *p, size_t length);
/* One byte per page of [p, p + length), bit 0: resident. */
int os_residency(void *p, size_t length, unsigned char *vec);
int os_sync(void *p, size_t length, int invalidate);   /* msync */
/* Make code written at [p, p + length) visible to instruction fetch on this
 * thread (cache maintenance; nothing on x86). p must be readable. Not a
 * system call: inline, as the compiler's builtin is. */
static inline void
os_flush_icache(void *p, size_t length)
{
    __builtin___clear_cache((char *)p, (char *)p + length);
}
/* Serialise instruction fetch on every thread of the process (membarrier
 * SYNC_CORE where the architecture needs it; registered at the first call).
 * ENOSYS/EINVAL where the kernel lacks it. */
int os_sync_core(void);
/* Whether os_sync_core is needed and registered (1), not needed (1 too, on
 * x86), or unavailable (0). */
int os_sync_core_ready(void);

/* ------------------------------------------------------------------ */
/* files and descriptors (os_linux_files.c)                            */

int os_memfd(int *fd, const char *name, unsigned int flags);
int os_memfd_secret(int *fd, unsigned int flags);
int os_close(int fd);
int os_dup(int fd, int *out);                    /* close-on-exec */
int os_reopen_readonly(int fd, int *out);        /* a new O_RDONLY open of fd's file */
int os_set_cloexec(int fd);
/* fd's size, preferred block size (the huge page for hugetlbfs), link count,
 * whether it is a regular file, its device and inode, and when it last
 * changed (ctime, ns: a truncation changes it). async-signal-safe. */
typedef struct {
    int64_t size;
    int64_t blksize;
    int64_t nlink;
    int regular;
    uint64_t dev, ino;
    int64_t changed;
} OsFileInfo;
int os_file_info(int fd, OsFileInfo *info);
/* The page a mapping of fd's file is made of: the huge page on hugetlbfs,
 * else the base page. */
int os_file_page(int fd, size_t *page);
/* Whether fd was opened for writing (*writable), from its access mode. */
int os_file_writable(int fd, int *writable);
int os_file_truncate(int fd, int64_t size);
/* Back [offset, offset + length) of the file with storage now (fallocate):
 * running out is an error here, never a fault at a later touch. */
int os_file_allocate(int fd, int64_t offset, int64_t length);
/* Give [offset, offset + length) of the file back (a hole reads as zero). */
int os_file_punch(int fd, int64_t offset, int64_t length);
int os_file_seals(int fd, int *seals);
int os_file_add_seals(int fd, int seals);
/* Which pages of [p, p + length) hold data (present or swapped): out[i] = 1.
 * Without the information every page counts. */
void os_pages_with_data(void *p, size_t length, unsigned char *out);
/* The protection the kernel has for each mapping in [p, p + length), one
 * call of fn per mapping (offsets from p); 0 or the errno of reading it. */
int os_query_protection(void *p, size_t length,
                        void (*fn)(void *arg, size_t start, size_t end, int prot), void *arg);
/* How many mappings the process holds (the kernel counts them against
 * vm.max_map_count): 0 or an errno. Asks nothing of the heap, so it works
 * at that limit, where a heap that cannot grow has no room for a buffer. */
int os_mapping_count(long *count);
/* The user address space of this architecture (4-level page tables) and the
 * bytes the process maps now (VmSize; 0 where it cannot be read): the room a
 * request for more address space can hope for is the difference. */
void os_address_space(unsigned long long *total, unsigned long long *used);

/* What the SIGBUS repair needs of the system inside its handler, each
 * async-signal-safe: let another thread run, this thread's id, a signal
 * sent again to this thread alone, and a monotonic clock in ns. */
void os_yield(void);
long os_thread_id(void);
void os_resend_signal(int sig);
long long os_monotonic_ns(void);

#endif
