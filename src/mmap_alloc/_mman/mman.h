/*
 * _mman: the safety kernel of mmap_alloc.
 *
 * What C owns (everything whose state keeps memory safe), one concern a file:
 *   module.c      the module: init, types, constants, the fork hook, and the
 *                 plain calls that cannot hurt (mincore, memfd_secret, probes);
 *   common.c      what every file uses: errors, argument helpers, aligned
 *                 mapping, the byte count, the fork generation, the graveyard;
 *   pages.c       the protection record of a mapping: runs of pages with their
 *                 PROT_* bits and flags (guard, dontfork); pure data, no Python;
 *   region.c      Region: one mapping, its record, exports, pins and busy
 *                 count; creation, close, the buffer protocol, introspection;
 *   bytes.c       Region as a bytes-like object: items, slices, find, iteration;
 *   protect.c     protect / make_exec / make_writable / flush_icache, and pins
 *                 (the Pin token whose deallocation unpins exactly once);
 *   resize.c      realloc, grow and shrink in place, move by copy, zeroing of
 *                 exposed bytes;
 *   advise.c      commit (populate), uncommit and other advice, mlock, mincore;
 *   views.c       sub-range exporters (Region.view, ObjectPool.view);
 *   allocator.c   the alloc/dealloc fast path of MapAlloc;
 *   pool.c, pool_batch.c (with pool.h)
 *                 ObjectPool: the slabs it owns, free bitmaps, views, batches;
 *   secret.c, shared.c, codeheap.c
 *                 the kernels of SecretBuffer, SharedRegion and CodeHeap.
 *
 * The rule: every change of that state is one C call that checks and acts
 * with no Python code able to run in between (no callback, no decref of an
 * arbitrary object, no allocation of a GC-tracked object between check and
 * act). Arguments are converted (which may run __index__) before any check.
 * Python calls C; C calls Python only through callables given once at
 * configuration (the pool's slab source, the allocator's slow path, the
 * exception types), and only where its own state is consistent.
 *
 * Models: CPython's Modules/mmapmodule.c (exports, pointer cleared before
 * munmap, every NULL return with an exception set, slow calls without the
 * GIL) and psutil (one C file per concern under one extension).
 */
#ifndef MMAP_ALLOC_MMAN_H
#define MMAP_ALLOC_MMAN_H

/* Py_LIMITED_API (0x030B0000, abi3) comes from setup.py, for GIL builds only */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

/* Linux ABI values the C library's headers may predate. */
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
#ifndef MLOCK_ONFAULT
#define MLOCK_ONFAULT 1
#endif
#ifndef MREMAP_FIXED
#define MREMAP_FIXED 2
#endif

#define PROT_RW (PROT_READ | PROT_WRITE)
#define PROT_ALL (PROT_READ | PROT_WRITE | PROT_EXEC)

/* System calls that fault in or free this many bytes or more release the GIL:
 * below it, releasing and taking the GIL back costs about as much as the
 * call. Unmapping pages nobody touched is fast whatever their number, so
 * munmap keeps the GIL unless the library committed the pages itself (as
 * numpy keeps it when it frees a large array). */
#define SLOW_CALL_BYTES (1 << 20)

/* ------------------------------------------------------------------ */
/* pages.c: the protection record                                      */

/* Run flags: what the kernel does to these pages besides PROT_*. */
#define RUN_GUARD 1       /* MADV_GUARD_INSTALL: any access faults */
#define RUN_DONTFORK 2    /* MADV_DONTFORK: absent in a child until remapped */

typedef struct {
    Py_ssize_t end;       /* the run covers [previous end, end) */
    unsigned char prot;   /* PROT_* */
    unsigned char flags;  /* RUN_* */
} Run;

typedef struct {
    Run *runs;            /* &one while there is one run */
    Py_ssize_t n;
    Py_ssize_t cap;
    Run one;
} PageRecord;

void rec_init(PageRecord *rec, Py_ssize_t capacity, int prot);
void rec_free(PageRecord *rec);
/* Room for `extra` more runs (a change of one range needs 2); -1 + MemoryError. */
int rec_reserve(PageRecord *rec, Py_ssize_t extra);
/* Set prot (when prot >= 0) and flags (bits of mask to the bits of value)
 * on [start, end); needs rec_reserve(rec, 2) first; never fails. */
void rec_set(PageRecord *rec, Py_ssize_t start, Py_ssize_t end, int prot, int mask,
             int value);
void rec_truncate(PageRecord *rec, Py_ssize_t capacity);
/* Join neighbouring runs that are alike (after flags changed in place). */
void rec_merge(PageRecord *rec);
/* Grow to capacity with new pages of prot and flags; needs rec_reserve(rec, 1). */
void rec_extend(PageRecord *rec, Py_ssize_t capacity, int prot, int flags);
/* Move the record of src into dst (dst is freed first; src becomes empty). */
void rec_move(PageRecord *dst, PageRecord *src);
Py_ssize_t rec_start(const PageRecord *rec, Py_ssize_t i);
/* The index of the run holding byte offset (0 <= offset < capacity). */
Py_ssize_t rec_find(const PageRecord *rec, Py_ssize_t offset);
/* The access pages allow: PROT_* with RUN_GUARD read as no access. */
int run_access(const Run *run);
/* AND and OR of run_access over the runs touching [start, end). */
int rec_access_all(const PageRecord *rec, Py_ssize_t start, Py_ssize_t end);
int rec_access_any(const PageRecord *rec, Py_ssize_t start, Py_ssize_t end);
int rec_flags_any(const PageRecord *rec, Py_ssize_t start, Py_ssize_t end);

/* ------------------------------------------------------------------ */
/* region.c                                                            */

typedef struct Export {
    struct Export *next, *prev;
    Py_ssize_t start, end;   /* bytes of the region the buffer covers */
    int writable;
} Export;

/* Region flags */
#define REGION_SHARED 1      /* MAP_SHARED of fd; realloc does not apply */
#define REGION_OWNS_FD 2     /* close fd when the region closes */
#define REGION_PRIVATE 4     /* held by a library object, never handed to users */
#define REGION_DONTFORK 8    /* has MADV_DONTFORK pages: on the list the fork hook remaps */
#define REGION_COMMITTED 16  /* the library faulted pages in: unmapping them takes long */

typedef struct {
    PyObject_HEAD
    char *data;             /* NULL once closed; cleared before munmap */
    Py_ssize_t size;        /* bytes asked for: len(), the buffer length */
    Py_ssize_t capacity;    /* bytes mapped (whole pages); what munmap is given */
    Py_ssize_t page;        /* granule: sizes and ranges round to it */
    Py_ssize_t align;       /* alignment kept when the region moves */
    int mflags;             /* MAP_* for new pages like these (no POPULATE/FIXED) */
    int advice;             /* madvise for new pages (MADV_HUGEPAGE), or 0 */
    int populate;           /* prefault pages a grow adds */
    int fd;                 /* the file mapped (REGION_SHARED), else -1 */
    unsigned int flags;     /* REGION_* */
    PageRecord rec;         /* protection of each page: the authority */
    Export *exports;        /* the live buffers, a doubly linked list */
    Py_ssize_t nexports;
    Py_ssize_t pins;        /* live Pin tokens (functions from function()) */
    Py_ssize_t busy;        /* calls running without the GIL, in fork generation busy_gen */
    unsigned long busy_gen;
    PyObject *owner;        /* the allocator that made it, or None */
    PyObject *backing;      /* what backs it, recorded when it was mapped */
    PyObject *weakreflist;
} RegionObject;

/* How to map pages: the parameters a backing gives. */
typedef struct {
    int prot;
    int mflags;
    int advice;
    int populate;
    Py_ssize_t page;
    Py_ssize_t align;
    PyObject *backing;      /* borrowed */
} MapSpec;

typedef struct {
    PyTypeObject *region_type;
    PyTypeObject *pin_type;
    PyTypeObject *view_type;
    PyTypeObject *iter_type;
    PyTypeObject *pool_type;
    PyTypeObject *allocator_type;
} module_state;

extern PyTypeObject *Region_Type;   /* the C base type, set at module init */
extern PyTypeObject *Pin_Type;
extern PyTypeObject *View_Type;
extern PyTypeObject *Iter_Type;
extern Py_ssize_t mapped_bytes;     /* bytes mapped by this module and not unmapped */
extern unsigned long fork_generation;
extern Py_ssize_t system_page;

extern PyType_Spec region_spec, pin_spec, view_spec, iter_spec, pool_spec, allocator_spec;
int region_init_types(PyObject *module);

int is_region(PyObject *o);
int region_check_open(RegionObject *self);

/* Calls running without the GIL on the region, counted in this process only
 * (a forked child does not inherit the threads that made them). */
static inline Py_ssize_t
region_busy(RegionObject *self)
{
    return self->busy_gen == fork_generation ? self->busy : 0;
}

void region_busy_enter(RegionObject *self);
void region_busy_leave(RegionObject *self);
/* BufferError unless nothing pins, exports or uses the region: for unmap, move, shrink. */
int region_check_idle(RegionObject *self, const char *what);
/* A new region over `capacity` bytes at data (owned from now on). NULL on failure
 * (the caller unmaps). */
PyObject *region_wrap(PyTypeObject *cls, char *data, Py_ssize_t size, Py_ssize_t capacity,
                      const MapSpec *spec, PyObject *owner);
/* Map pages per spec (aligned to spec->align) and wrap them; NULL with OSError
 * (errno set) when the kernel refuses; nothing left mapped on any failure. */
PyObject *region_map(PyTypeObject *cls, Py_ssize_t size, Py_ssize_t capacity,
                     const MapSpec *spec, PyObject *owner);
/* Whether unmapping the region is slow enough to release the GIL for. */
static inline int
region_unmap_is_slow(RegionObject *self)
{
    return self->capacity >= SLOW_CALL_BYTES && (self->flags & REGION_COMMITTED);
}

/* As region_map, at address exactly (a multiple of spec->align; NULL: anywhere)
 * with MAP_FIXED_NOREPLACE: never replaces a mapping. OSError EEXIST when the
 * range is taken, EADDRNOTAVAIL when the kernel placed it elsewhere (a kernel
 * before 4.17 takes the flag for a hint). */
PyObject *region_map_at(PyTypeObject *cls, Py_ssize_t size, Py_ssize_t capacity,
                        const MapSpec *spec, PyObject *owner, char *address);
/* Unmap a closed-off mapping; a refusal (vm.max_map_count) sends it to the graveyard. */
void unmap_or_bury(char *p, Py_ssize_t length, int release_gil);

/* Retry the unmaps the kernel refused (ngraves of them wait). */
extern Py_ssize_t ngraves;
void flush_graveyard(void);
int region_close_mapping(RegionObject *self);
/* In a forked child: map zero pages where MADV_DONTFORK left holes. */
void region_after_fork_in_child(void);
/* Record that the region has MADV_DONTFORK pages (remapped in a forked child). */
int region_track_dontfork(RegionObject *self);
/* Export bookkeeping, used by the buffer protocol and views. */
Export *region_export(RegionObject *self, Py_ssize_t start, Py_ssize_t end, int writable);
void region_unexport(RegionObject *self, Export *e);
/* Whether an export overlapping [start, end) needs access `need` (PROT_READ,
 * PROT_WRITE) that prot would remove; 1 with BufferError set. */
int region_exports_conflict(RegionObject *self, Py_ssize_t start, Py_ssize_t end, int prot);

/* ------------------------------------------------------------------ */
/* mapping helpers (common.c)                                          */

/* mmap `length` bytes at a multiple of align (over-map and trim); natural is
 * the alignment the kernel gives such a mapping anyway (the page; the huge
 * page for hugetlb). MAP_FAILED with errno set, nothing left mapped. fd < 0:
 * anonymous private memory; else mflags must say MAP_SHARED or MAP_PRIVATE. */
void *map_aligned(Py_ssize_t length, Py_ssize_t align, Py_ssize_t natural, int prot,
                  int mflags, int fd, int release_gil);
Py_ssize_t round_up(Py_ssize_t n, Py_ssize_t page);
/* memfd_create(2) by its system call number (no glibc wrapper needed); -1 + errno */
int memfd_open(const char *name, unsigned int flags);

/* ------------------------------------------------------------------ */
/* errors (common.c)                                                   */

/* The library's exception types, registered once by exceptions.py. */
extern PyObject *AllocError_Type;          /* falls back to MemoryError */
extern PyObject *CannotReallocInPlace_Type;
/* AllocError(message, errno=err, size=size); returns NULL. */
PyObject *raise_alloc_error(int err, Py_ssize_t size, const char *format, ...);
/* OSError(err, message); returns NULL. */
PyObject *raise_os_error(int err, const char *format, ...);
/* OSError(err, strerror(err), step): which step of a multi-call operation
 * failed (the step is the exception's filename); returns NULL. Built without
 * PyErr_SetFromErrno, which would run signal handlers on EINTR. */
PyObject *raise_step_error(int err, const char *step);
/* The error a failed mprotect/munmap/madvise becomes: ENOMEM/EAGAIN an AllocError
 * naming vm.max_map_count, others an OSError; returns NULL. */
PyObject *raise_syscall_error(int err, Py_ssize_t size, const char *what);

/* ------------------------------------------------------------------ */
/* argument helpers (common.c)                                         */

int arg_ssize(PyObject *o, const char *name, Py_ssize_t *out);   /* __index__, >= 0 */
int arg_int(PyObject *o, int *out);
int arg_address(PyObject *o, void **out);
int check_nargs(const char *name, Py_ssize_t nargs, Py_ssize_t min, Py_ssize_t max);
/* offset and length objects (converted already: exact ints or None) to a
 * range of whole pages of the region; ValueError naming the argument. */
int page_range(RegionObject *self, PyObject *offset, PyObject *length, Py_ssize_t *start,
               Py_ssize_t *n);
/* Convert offset/length arguments with __index__ first (user code may run);
 * returns new references (None for absent length). */
int convert_range_args(PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames,
                       Py_ssize_t first, const char *fname, PyObject **offset,
                       PyObject **length, PyObject **extra, const char *extra_name);

/* bytes.c: the bytes-like protocol of Region */
int region_check_readable(RegionObject *self, Py_ssize_t start, Py_ssize_t end);
int region_check_writable(RegionObject *self, Py_ssize_t start, Py_ssize_t end);
Py_ssize_t region_length(RegionObject *self);
PyObject *region_subscript(RegionObject *self, PyObject *key);
int region_ass_subscript(RegionObject *self, PyObject *key, PyObject *value);
PyObject *region_find(RegionObject *self, PyObject *const *args, Py_ssize_t nargs);
PyObject *region_rfind(RegionObject *self, PyObject *const *args, Py_ssize_t nargs);
int region_contains(RegionObject *self, PyObject *sub);
PyObject *region_iter(RegionObject *self);

/* method implementations spread over files */
PyObject *region_protect(RegionObject *, PyObject *const *, Py_ssize_t, PyObject *);
PyObject *region_check_protect(RegionObject *, PyObject *const *, Py_ssize_t, PyObject *);
PyObject *region_make_exec(RegionObject *, PyObject *const *, Py_ssize_t, PyObject *);
PyObject *region_make_writable(RegionObject *, PyObject *const *, Py_ssize_t, PyObject *);
PyObject *region_flush_icache(RegionObject *, PyObject *const *, Py_ssize_t, PyObject *);
PyObject *region_pin(RegionObject *, PyObject *);
/* A Pin token (protect.c): while it lives, the owner's pin counter stays
 * raised by one; its deallocation lowers it exactly once. Allocate it before
 * the checks (an allocation may run finalizers), attach it after them. */
typedef struct PinObject PinObject;
PinObject *pin_alloc(void);
PyObject *pin_attach(PinObject *pin, PyObject *owner, Py_ssize_t *count, char *address);
PyObject *region_runs(RegionObject *, PyObject *);
PyObject *region_resize(RegionObject *, PyObject *const *, Py_ssize_t);
PyObject *region_populate(RegionObject *, PyObject *const *, Py_ssize_t, PyObject *);
PyObject *region_madvise(RegionObject *, PyObject *const *, Py_ssize_t, PyObject *);
PyObject *region_mlock(RegionObject *, PyObject *const *, Py_ssize_t, PyObject *);
PyObject *region_munlock(RegionObject *, PyObject *const *, Py_ssize_t, PyObject *);
PyObject *region_mincore(RegionObject *, PyObject *const *, Py_ssize_t, PyObject *);
PyObject *region_view(RegionObject *, PyObject *const *, Py_ssize_t, PyObject *);
/* unmap the pages of the region from newcap (< capacity, page-aligned) on and
 * record it; -1 with errno set and nothing changed (resize.c) */
int region_drop_tail(RegionObject *self, Py_ssize_t newcap);
/* zero bytes [start, end) of the region, whichever their protection; -1 + exception */
int region_zero(RegionObject *self, Py_ssize_t start, Py_ssize_t end);
/* mprotect [start, end) to prot and record it, all or nothing; -1 + exception */
int region_set_prot(RegionObject *self, Py_ssize_t start, Py_ssize_t end, int prot);
/* a memoryview of [start, end) of a region (pinning it), or of raw pool memory */
PyObject *view_new(PyObject *owner, RegionObject *region, char *base, Py_ssize_t start,
                   Py_ssize_t end, int writable, Py_ssize_t *pool_exports);

/* Each capability adds its functions and types to the module here (module.c
 * calls them once, at import). */
int secret_init(PyObject *module);
int shared_init(PyObject *module);
int codeheap_init(PyObject *module);

#endif
