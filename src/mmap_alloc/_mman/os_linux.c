/*
 * The platform layer on Linux, memory: mmap, munmap, mprotect, madvise,
 * mremap, mlock, mincore, msync, membarrier and cache maintenance (see
 * platform.h for the rules every function keeps). No Python here.
 */
#define _GNU_SOURCE 1
#include "platform.h"

#include <errno.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#ifndef MLOCK_ONFAULT
#define MLOCK_ONFAULT 1
#endif
#ifndef MREMAP_MAYMOVE
#define MREMAP_MAYMOVE 1
#endif
#ifndef MREMAP_FIXED
#define MREMAP_FIXED 2
#endif
#ifndef SYS_process_madvise
#define SYS_process_madvise 440
#endif
#ifndef PIDFD_SELF_THREAD
#define PIDFD_SELF_THREAD -10000
#endif

#if defined(__aarch64__) || defined(__arm__) || defined(__riscv)
#define NEEDS_SYNC_CORE 1
#else
#define NEEDS_SYNC_CORE 0
#endif
/* MEMBARRIER_CMD_PRIVATE_EXPEDITED_SYNC_CORE and its registration */
#define MEMBARRIER_SYNC_CORE 32
#define MEMBARRIER_REGISTER_SYNC_CORE 64

/* What this kernel was found to lack, learned at the first refusal: kept
 * here, since it is the platform's knowledge, not the library's state. */
static struct {
    int no_process_madvise;   /* process_madvise(PIDFD_SELF) refused */
    int sync_core;            /* 0 unknown, 1 registered, -errno refused */
} os_linux;

size_t
os_page_size(void)
{
    long page = sysconf(_SC_PAGESIZE);

    return page > 0 ? (size_t)page : 4096;
}

int
os_map(void **out, void *hint, size_t length, int prot, int mflags, int fd, off_t offset)
{
    int flags = mflags | (fd < 0 ? MAP_PRIVATE | MAP_ANONYMOUS : 0);
    void *p;

    p = mmap(hint, length, prot, flags, fd, offset);
    if (p == MAP_FAILED)
        return errno;
    if ((mflags & MAP_FIXED_NOREPLACE) && p != hint) {
        /* a kernel before 4.17 took MAP_FIXED_NOREPLACE for a hint */
        munmap(p, length);
        return EADDRNOTAVAIL;
    }
    *out = p;
    return 0;
}

int
os_map_aligned(void **out, size_t length, size_t align, size_t natural, int prot, int mflags,
               int fd, off_t offset)
{
    char *span_start, *at;
    size_t span, front, back;
    void *p;
    int err;

    if (align <= natural || length % align == 0) {
        /* the kernel aligns to `natural` (the page, or the huge page); recent
         * kernels also align mappings of whole huge pages: try that first */
        err = os_map(&p, NULL, length, prot, mflags, fd, offset);
        if (err || align <= natural || ((uintptr_t)p & (uintptr_t)(align - 1)) == 0) {
            if (!err)
                *out = p;
            return err;
        }
        munmap(p, length);
    }
    if (length > SIZE_MAX - align)
        return ENOMEM;
    /* Reserve a span with room to align in, then map over its aligned part. */
    span = length + align;
    p = mmap(NULL, span, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED)
        return errno;
    span_start = p;
    front = (size_t)(-(uintptr_t)span_start & (uintptr_t)(align - 1));
    back = span - front - length;
    err = os_map(&p, span_start + front, length, prot, mflags | MAP_FIXED, fd, offset);
    if (err) {
        munmap(span_start, span);
        return err;
    }
    at = p;
    /* Trimming the excess removes whole mappings at the span's ends: it needs
     * no new kernel mapping, so vm.max_map_count cannot refuse it. */
    if (front)
        munmap(span_start, front);
    if (back)
        munmap(at + length, back);
    *out = at;
    return 0;
}

int
os_unmap(void *p, size_t length)
{
    return munmap(p, length) == 0 ? 0 : errno;
}

int
os_protect(void *p, size_t length, int prot)
{
    return mprotect(p, length, prot) == 0 ? 0 : errno;
}

int
os_advise(void *p, size_t length, int advice)
{
    return madvise(p, length, advice) == 0 ? 0 : errno;
}

int
os_install_guards(void *a, size_t alength, void *b, size_t blength)
{
    if (!os_linux.no_process_madvise) {
        struct iovec iov[2] = {{a, alength}, {b, blength}};
        long done = syscall(SYS_process_madvise, PIDFD_SELF_THREAD, iov, 2,
                            MADV_GUARD_INSTALL, 0);
        if (done == (long)(alength + blength))
            return 0;
        os_linux.no_process_madvise = 1;   /* before 6.13, or without PIDFD_SELF (6.15) */
    }
    if (madvise(a, alength, MADV_GUARD_INSTALL) != 0 || madvise(b, blength, MADV_GUARD_INSTALL) != 0)
        return errno;
    return 0;
}

int
os_grow_in_place(void *p, size_t oldlen, size_t newlen)
{
    return mremap(p, oldlen, newlen, 0) == MAP_FAILED ? errno : 0;
}

int
os_move(void **out, void *p, size_t oldlen, size_t newlen, void *target)
{
    void *q = target == NULL ? mremap(p, oldlen, newlen, MREMAP_MAYMOVE)
                             : mremap(p, oldlen, newlen, MREMAP_MAYMOVE | MREMAP_FIXED, target);

    if (q == MAP_FAILED)
        return errno;
    *out = q;
    return 0;
}

int
os_lock(void *p, size_t length, int on_fault)
{
    int rc = on_fault ? mlock2(p, length, MLOCK_ONFAULT) : mlock(p, length);

    return rc == 0 ? 0 : errno;
}

int
os_unlock(void *p, size_t length)
{
    return munlock(p, length) == 0 ? 0 : errno;
}

int
os_residency(void *p, size_t length, unsigned char *vec)
{
    return mincore(p, length, vec) == 0 ? 0 : errno;
}

int
os_sync(void *p, size_t length, int invalidate)
{
    return msync(p, length, MS_SYNC | (invalidate ? MS_INVALIDATE : 0)) == 0 ? 0 : errno;
}

int
os_sync_core_ready(void)
{
#if NEEDS_SYNC_CORE
    if (os_linux.sync_core == 0)
        os_linux.sync_core = syscall(SYS_membarrier, MEMBARRIER_REGISTER_SYNC_CORE, 0, 0) == 0
                                 ? 1 : -errno;
    return os_linux.sync_core > 0;
#else
    return 1;   /* x86: instruction fetch is coherent with stores */
#endif
}

int
os_sync_core(void)
{
#if NEEDS_SYNC_CORE
    if (!os_sync_core_ready())
        return -os_linux.sync_core;
    return syscall(SYS_membarrier, MEMBARRIER_SYNC_CORE, 0, 0) == 0 ? 0 : errno;
#else
    return 0;
#endif
}

void
os_yield(void)
{
    syscall(SYS_sched_yield);
}

long
os_thread_id(void)
{
    return syscall(SYS_gettid);
}

long long
os_monotonic_ns(void)
{
    struct timespec t;

    clock_gettime(CLOCK_MONOTONIC, &t);
    return (long long)t.tv_sec * 1000000000LL + t.tv_nsec;
}

void
os_resend_signal(int sig)
{
    syscall(SYS_tgkill, getpid(), (pid_t)syscall(SYS_gettid), sig);
}
