/*
 * The platform layer on Linux, files and descriptors: memfd_create,
 * memfd_secret, seals, fallocate, fstat, fstatfs, and what /proc tells
 * about pages (see platform.h for the rules every function keeps). No
 * Python here.
 */
#define _GNU_SOURCE 1
#include "platform.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/syscall.h>
#include <unistd.h>

#ifndef SYS_memfd_secret
#define SYS_memfd_secret 447
#endif
#ifndef F_DUPFD_CLOEXEC
#define F_DUPFD_CLOEXEC 1030
#endif
#ifndef HUGETLBFS_MAGIC
#define HUGETLBFS_MAGIC 0x958458f6
#endif
#ifndef FALLOC_FL_KEEP_SIZE
#define FALLOC_FL_KEEP_SIZE 0x01
#endif
#ifndef FALLOC_FL_PUNCH_HOLE
#define FALLOC_FL_PUNCH_HOLE 0x02
#endif

int
os_memfd(int *fd, const char *name, unsigned int flags)
{
#ifdef SYS_memfd_create
    long r = syscall(SYS_memfd_create, name, flags);   /* no glibc wrapper needed */

    if (r < 0)
        return errno;
    *fd = (int)r;
    return 0;
#else
    return ENOSYS;
#endif
}

int
os_memfd_secret(int *fd, unsigned int flags)
{
    long r = syscall(SYS_memfd_secret, flags);

    if (r < 0)
        return errno;
    *fd = (int)r;
    return 0;
}

/* A call's result r (a descriptor, flags) to *out: 0, or the errno when it failed (r < 0). */
static int
result_or_errno(int r, int *out)
{
    if (r < 0)
        return errno;
    *out = r;
    return 0;
}

int
os_close(int fd)
{
    return close(fd) == 0 ? 0 : errno;
}

int
os_dup(int fd, int *out)
{
    return result_or_errno(fcntl(fd, F_DUPFD_CLOEXEC, 0), out);
}

int
os_reopen_readonly(int fd, int *out)
{
    char path[64];

    snprintf(path, sizeof path, "/proc/self/fd/%d", fd);
    return result_or_errno(open(path, O_RDONLY | O_CLOEXEC), out);
}

int
os_set_cloexec(int fd)
{
    return fcntl(fd, F_SETFD, FD_CLOEXEC) == 0 ? 0 : errno;
}

int
os_file_info(int fd, OsFileInfo *info)
{
    struct stat st;

    if (fstat(fd, &st) != 0)
        return errno;
    info->size = (int64_t)st.st_size;
    info->blksize = (int64_t)st.st_blksize;
    info->nlink = (int64_t)st.st_nlink;
    info->regular = S_ISREG(st.st_mode);
    info->dev = (uint64_t)st.st_dev;
    info->ino = (uint64_t)st.st_ino;
    info->changed = (int64_t)st.st_ctim.tv_sec * 1000000000 + st.st_ctim.tv_nsec;
    return 0;
}

int
os_file_page(int fd, size_t *page)
{
    struct statfs fs;

    if (fstatfs(fd, &fs) != 0)
        return errno;
    *page = fs.f_type == HUGETLBFS_MAGIC && fs.f_bsize > 0 ? (size_t)fs.f_bsize : os_page_size();
    return 0;
}

int
os_file_writable(int fd, int *writable)
{
    int flags = 0, err = result_or_errno(fcntl(fd, F_GETFL), &flags);

    if (err == 0)
        *writable = (flags & O_ACCMODE) != O_RDONLY;
    return err;
}

int
os_file_truncate(int fd, int64_t size)
{
    return ftruncate(fd, (off_t)size) == 0 ? 0 : errno;
}

int
os_file_allocate(int fd, int64_t offset, int64_t length)
{
    return fallocate(fd, 0, (off_t)offset, (off_t)length) == 0 ? 0 : errno;
}

int
os_file_punch(int fd, int64_t offset, int64_t length)
{
    return fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)offset,
                     (off_t)length) == 0 ? 0 : errno;
}

int
os_file_seals(int fd, int *seals)
{
    return result_or_errno(fcntl(fd, F_GET_SEALS), seals);
}

int
os_file_add_seals(int fd, int seals)
{
    return fcntl(fd, F_ADD_SEALS, seals) == 0 ? 0 : errno;
}

void
os_pages_with_data(void *p, size_t length, unsigned char *out)
{
    size_t page = (size_t)sysconf(_SC_PAGESIZE), n = length / page, done = 0;
    int fd = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
    uint64_t entries[512];

    if (fd < 0) {
        memset(out, 1, n);
        return;
    }
    while (done < n) {
        size_t want = n - done < 512 ? n - done : 512;
        off_t at = (off_t)(((uintptr_t)p / page + done) * sizeof(uint64_t));
        ssize_t got = pread(fd, entries, want * sizeof(uint64_t), at);
        if (got <= 0) {
            memset(out + done, 1, n - done);
            break;
        }
        for (size_t k = 0; k < (size_t)got / sizeof(uint64_t); k++)
            out[done + k] = (entries[k] >> 62) != 0;   /* bit 63 present, 62 swapped */
        done += (size_t)got / sizeof(uint64_t);
    }
    close(fd);
}

int
os_query_protection(void *p, size_t length,
                    void (*fn)(void *arg, size_t start, size_t end, int prot), void *arg)
{
    FILE *maps = fopen("/proc/self/maps", "re");
    uintptr_t base = (uintptr_t)p, end = base + length;
    char line[512];

    if (maps == NULL)
        return errno;
    while (fgets(line, sizeof line, maps)) {
        unsigned long lo, hi;
        char perms[5];
        if (sscanf(line, "%lx-%lx %4s", &lo, &hi, perms) != 3 || hi <= base || lo >= end)
            continue;
        fn(arg, (lo > base ? lo : base) - base, (hi < end ? hi : end) - base,
           (perms[0] == 'r' ? PROT_READ : 0) | (perms[1] == 'w' ? PROT_WRITE : 0)
               | (perms[2] == 'x' ? PROT_EXEC : 0));
    }
    fclose(maps);
    return 0;
}

int
os_mapping_count(long *count)
{
    char buffer[4096];
    ssize_t got;
    int fd = open("/proc/self/maps", O_RDONLY | O_CLOEXEC), error = 0;

    if (fd < 0)
        return errno;
    *count = 0;
    while ((got = read(fd, buffer, sizeof buffer)) != 0) {
        if (got < 0) {
            if (errno == EINTR)
                continue;
            error = errno;
            break;
        }
        for (ssize_t i = 0; i < got; i++)
            *count += buffer[i] == '\n';
    }
    close(fd);
    return error;
}

void
os_address_space(unsigned long long *total, unsigned long long *used)
{
    char buffer[64];
    ssize_t got;
    int fd = open("/proc/self/statm", O_RDONLY | O_CLOEXEC);

#if defined(__x86_64__)
    *total = 1ULL << 47;
#else
    *total = 1ULL << 48;
#endif
    *used = 0;
    if (fd < 0)
        return;
    do
        got = read(fd, buffer, sizeof buffer - 1);
    while (got < 0 && errno == EINTR);
    close(fd);
    if (got > 0) {
        buffer[got] = '\0';
        *used = strtoull(buffer, NULL, 10) * os_page_size();   /* the first field: pages */
    }
}
