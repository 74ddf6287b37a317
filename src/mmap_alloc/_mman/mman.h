/*
 * _mman: the safety kernel of mmap_alloc. The shared declarations.
 *
 * Three layers, each calling only the one below it:
 *
 *   the owners     region.c (+ region_size.c, bytes.c, protect.c, advise.c, views.c),
 *                  allocator.c (+ cache.c), pool.c, and the extensions of the core for
 *                  other kinds of memory: secret.c, codeheap.c (+ spans.c),
 *                  shared.c, files.c (+ repair.c, the SIGBUS repair);
 *   the core       mapping.c (a mapping, its record, holds, busy count, the
 *                  registry and the fork hook), resize.c (growing, moving and
 *                  shrinking any mapping, anonymous or of a file), record.c
 *                  (the protection record), state.c, errors.c, args.c,
 *                  objects.c (what the types share);
 *   the platform   platform.h, implemented by os_linux.c and
 *                  os_linux_files.c: every memory system call.
 *
 * The rule: every change of memory-safety state is one C call that checks
 * and acts with no Python code able to run in between (no callback, no
 * decref of an arbitrary object, no allocation of a GC-tracked object
 * between check and act). Arguments are converted (which may run __index__)
 * and objects allocated before any check. Python calls C; C calls Python only
 * through callables given once at configuration (the pool's slab source, the
 * allocator's slow path), and only where its own state is consistent.
 *
 * Models: CPython's Modules/mmapmodule.c (exports, pointer cleared before
 * munmap, every NULL return with an exception set), psutil (a platform is a
 * file, one error vocabulary naming the call), msgspec (state in one struct).
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

#include "platform.h"

/* System calls that fault in or free this many bytes or more release the GIL:
 * below it, releasing and taking the GIL back costs about as much as the
 * call. Unmapping pages nobody touched is fast whatever their number, so an
 * unmap keeps the GIL unless the library committed the pages itself (as
 * numpy keeps it when it frees a large array). */
#define SLOW_CALL_BYTES (1 << 20)

typedef struct Mapping Mapping;

#include "kernel_lock.h"

/* Py_XSETREF, which the limited API lacks: store the new reference first,
 * then release the old one. */
#define REPLACE_REF(field, value)                \
    do {                                         \
        void *old_ = (void *)(field);            \
        (field) = (value);                       \
        Py_XDECREF((PyObject *)old_);            \
    } while (0)

/* The kernel's lists (blocks, holds, caches), linked through prev and next from
 * head: LIST_PUSH puts node first; LIST_UNLINK takes it out, linked to nothing. */
#define LIST_PUSH(head, node)                  \
    do {                                       \
        (node)->prev = NULL;                   \
        (node)->next = (head);                 \
        if ((head) != NULL)                    \
            (head)->prev = (node);             \
        (head) = (node);                       \
    } while (0)
#define LIST_UNLINK(head, node)                \
    do {                                       \
        if ((node)->prev != NULL)              \
            (node)->prev->next = (node)->next; \
        else                                   \
            (head) = (node)->next;             \
        if ((node)->next != NULL)              \
            (node)->next->prev = (node)->prev; \
        (node)->next = (node)->prev = NULL;    \
    } while (0)

/* ------------------------------------------------------------------ */
/* state.c: the process-wide state, in one place                       */

/* Mappings are the process's, not an interpreter's: what the kernel of the
 * library knows about them is process-wide, and the fork handler (which
 * runs outside Python) must reach it. So it is one static struct, not
 * module state; the module's GC functions visit the objects it holds. */
typedef struct {
    Py_ssize_t page;                 /* the system's base page size */
    Py_ssize_t mapped_bytes;         /* mapped by this module, not unmapped yet */
    unsigned int fork_generation;    /* bumped in every forked child */
    Mapping *registry;               /* mappings the process-wide hooks visit */
    struct MappingCache *caches;     /* allocators' caches that hold mappings */
    int trimming;                    /* inside the caches' trim (cache.c) */
    Py_ssize_t (*trim_caches)(void); /* cache.c's, set when a cache first keeps a mapping */
    void *spare_regions;             /* dead Regions kept for reuse (region_alloc) */
    int nspare_regions;
    int unmapping;                   /* unmaps under way without the GIL (before_fork) */
    struct Grave *graves;            /* unmaps the kernel refused, to retry */
    Py_ssize_t ngraves, cap_graves;
    PyTypeObject *region_type, *pin_type, *view_type, *iter_type, *pool_type,
        *allocator_type, *secret_type, *opening_type, *heap_type, *block_type;
    PyObject *alloc_error;           /* registered once by exceptions.py */
    PyObject *cannot_realloc;
    PyObject *memory_corruption;
    PyObject *lock;                  /* free-threaded builds: the kernel lock's object */
    PyObject *file_truncated;        /* FileTruncatedError, registered by exceptions.py */
    struct RepairTable *repair;      /* the SIGBUS repair's published table (repair.c) */
    unsigned char canary[16];        /* the secrets' canary, random per process */
    int canary_ready;
    /* tracemalloc's PyTraceMalloc_Track and _Untrack, found at import (they
     * are outside the limited API); NULL where the interpreter lacks them */
    int (*trace_track)(unsigned int domain, uintptr_t ptr, size_t size);
    int (*trace_untrack)(unsigned int domain, uintptr_t ptr);
} KernelState;

extern KernelState kernel;

/* Before a refusal for lack of memory or of mappings fails: every cache unmaps
 * what it keeps (a hook: the core does not call up to them). Bytes released. */
static inline Py_ssize_t
kernel_trim_caches(void)
{
    return kernel.trim_caches != NULL ? kernel.trim_caches() : 0;
}

/* The tracemalloc domain of the library's memory (regions, pool slabs,
 * secrets, shared and code memory; not mappings of files): "mmap" in ASCII. */
#define TRACE_DOMAIN 0x6d6d6170u

/* tracemalloc sees the memory at p as size bytes now (a new mapping, or one
 * that grew or shrank in place); with tracing off, one call that returns. */
static inline void
trace_mapped(const void *p, Py_ssize_t size)
{
    if (kernel.trace_track != NULL)
        kernel.trace_track(TRACE_DOMAIN, (uintptr_t)p, (size_t)size);
}

/* ... and no longer (unmapped, or moved away). */
static inline void
trace_unmapped(const void *p)
{
    if (kernel.trace_untrack != NULL)
        kernel.trace_untrack(TRACE_DOMAIN, (uintptr_t)p);
}

/* ------------------------------------------------------------------ */
/* errors.c: the one error vocabulary                                  */

/* OSError(err, strerror(err), call): the OS refused `call` (the name of the
 * system call, or the step of a longer operation, is the exception's
 * filename; policy in Python reads it). Built without PyErr_SetFromErrno,
 * which runs signal handlers on EINTR. Returns NULL. */
PyObject *raise_os_error(int err, const char *call);
/* The same failure worded: "cannot <what> <size> bytes: <strerror> (<call>)";
 * ENOMEM and EAGAIN (the kernel's refusal to split a mapping at
 * vm.max_map_count, or to lock memory) become an AllocError that says so.
 * Returns NULL. */
PyObject *raise_os_error_sized(int err, const char *call, Py_ssize_t size, const char *what);
/* AllocError(message, errno=err, size=size): memory the library could not
 * provide (MemoryError until exceptions.py registers the type). NULL. */
PyObject *raise_alloc_error(int err, Py_ssize_t size, const char *format, ...);
/* TypeError "<expected>, not <the type of got>", the expected part made
 * from format as by PyUnicode_FromFormat: "expected a Region, not str",
 * "size must be an integer, not str". Returns NULL. */
PyObject *raise_wrong_type(PyObject *got, const char *format, ...);

/* ------------------------------------------------------------------ */
/* args.c: arguments                                                   */

int arg_ssize(PyObject *o, const char *name, Py_ssize_t *out);   /* __index__, >= 0 */
int arg_int(PyObject *o, const char *name, int *out);
int arg_address(PyObject *o, void **out);
int check_nargs(const char *name, Py_ssize_t nargs, Py_ssize_t min, Py_ssize_t max);
/* "data must be a bytes-like object, not X" for a failed PyObject_GetBuffer. */
int arg_buffer(PyObject *o, const char *name, Py_buffer *view, int flags);
/* Convert [extra,] offset and length arguments (positional or by keyword)
 * with __index__ first (user code may run); returns new references (None
 * for an absent length). extra_name: the first argument's name, or NULL. */
int convert_range_args(PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames,
                       const char *fname, PyObject **offset, PyObject **length,
                       PyObject **extra, const char *extra_name);
/* (data, offset=0) by position or by keyword: borrowed references, offset
 * NULL when absent; TypeError naming fname. */
int parse_data_offset(PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames, const char *fname,
                      PyObject **data, PyObject **offset);
/* Converted offset and length (exact ints, or None) to whole pages of a
 * mapping; ValueError naming the argument. */
int page_range(const Mapping *m, PyObject *offset, PyObject *length, Py_ssize_t *start,
               Py_ssize_t *n);

/* Room for `need` items of `size` bytes in the PyMem array *items of *cap
 * items, doubling from `first`; -1 with MemoryError, nothing changed. */
static inline int
reserve_items(void **items, Py_ssize_t *cap, Py_ssize_t need, Py_ssize_t first, size_t size)
{
    Py_ssize_t n = *cap > 0 ? *cap : first;
    void *grown;

    if (need <= *cap)
        return 0;
    while (n < need)
        n *= 2;
    grown = PyMem_Realloc(*items, (size_t)n * size);
    if (grown == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    *items = grown;
    *cap = n;
    return 0;
}

/* Append item (a new reference, taken; NULL: its making failed) to list: 0,
 * or -1 with the exception set (the list is still the caller's). */
int list_append_new(PyObject *list, PyObject *item);

static inline Py_ssize_t
round_up(Py_ssize_t n, Py_ssize_t page)
{
    return (n + page - 1) & ~(page - 1);
}

/* ------------------------------------------------------------------ */
/* record.c: the protection record                                     */

/* Run flags: what the kernel does to these pages besides PROT_*. */
#define RUN_GUARD 1         /* MADV_GUARD_INSTALL: any access faults */
#define RUN_DONTFORK 2      /* MADV_DONTFORK: absent in a child until remapped */
#define RUN_DONTDUMP 4      /* MADV_DONTDUMP: left out of core dumps */
#define RUN_WIPEONFORK 8    /* MADV_WIPEONFORK: zero in a child */

typedef struct {
    Py_ssize_t end;         /* the run covers [previous end, end) */
    unsigned char prot;     /* PROT_* */
    unsigned char flags;    /* RUN_* */
} Run;

typedef struct {
    Run *runs;              /* &one while there is one run */
    int n;                  /* runs (at most INT_MAX: rec_reserve refuses more) */
    int cap;
    Run one;
} PageRecord;

void rec_free(PageRecord *rec);
/* Room for `extra` more runs (a change of one range needs 2); -1 + MemoryError.
 * rec_room: the same, 0 or ENOMEM with nothing raised (no Python code runs). */
int rec_reserve(PageRecord *rec, Py_ssize_t extra);
int rec_room(PageRecord *rec, Py_ssize_t extra);
/* Set prot (when prot >= 0) and flags (bits of mask to the bits of value)
 * on [start, end); needs rec_reserve(rec, 2) first; never fails. */
void rec_set(PageRecord *rec, Py_ssize_t start, Py_ssize_t end, int prot, int mask, int value);
void rec_truncate(PageRecord *rec, Py_ssize_t capacity);
/* Join neighbouring runs that are alike (after flags changed in place). */
void rec_merge(PageRecord *rec);
/* Grow to capacity with new pages of prot and flags; needs rec_reserve(rec, 1). */
void rec_extend(PageRecord *rec, Py_ssize_t capacity, int prot, int flags);
Py_ssize_t rec_start(const PageRecord *rec, Py_ssize_t i);
/* The index of the run holding byte offset (0 <= offset < capacity). */
Py_ssize_t rec_find(const PageRecord *rec, Py_ssize_t offset);
/* The access pages allow: PROT_* with RUN_GUARD read as no access. */
int run_access(const Run *run);
/* AND and OR of run_access over the runs touching [start, end). */
int rec_access_all(const PageRecord *rec, Py_ssize_t start, Py_ssize_t end);
int rec_access_any(const PageRecord *rec, Py_ssize_t start, Py_ssize_t end);
/* Whether every run touching [start, end) has prot (the one-run case
 * inline: protection flips test it first). */
int rec_uniform_runs(const PageRecord *rec, Py_ssize_t start, Py_ssize_t end, int prot);
static inline int
rec_uniform(const PageRecord *rec, Py_ssize_t start, Py_ssize_t end, int prot)
{
    return rec->n == 1 ? rec->runs[0].prot == prot : rec_uniform_runs(rec, start, end, prot);
}

/* ------------------------------------------------------------------ */
/* mapping.c: the core every owner of memory embeds                    */

/* A hold on a byte range of a mapping: a buffer exported from it, or a pin.
 * While a hold lives, its pages are never unmapped or moved; a buffer's are
 * never stripped of the access it was given. */
#define HOLD_READ 1         /* a read-only buffer */
#define HOLD_WRITE 2        /* a writable buffer */
#define HOLD_PIN 4          /* a Pin token: code runs there, or a raw pointer */

typedef struct Hold {
    struct Hold *next, *prev;
    Py_ssize_t start, end;
    int kind;
} Hold;

/* Mapping flags */
#define MAPPING_SHARED 1       /* MAP_SHARED of fd: the file's pages, not private ones */
#define MAPPING_OWNS_FD 2      /* close fd with the mapping */
#define MAPPING_COMMITTED 4    /* the library faulted pages in: unmapping takes long */
#define MAPPING_REGISTERED 8   /* on the registry (kernel.registry) */
#define MAPPING_UNTRACED 16    /* not reported to tracemalloc (a mapping of a file) */
#define MAPPING_REPAIRABLE 32  /* of a file that may shrink: in the SIGBUS repair's table */
#define MAPPING_ADVISED 64     /* the kernel keeps state for it the record does not
                                * (a lock, access-pattern or huge-page advice):
                                * never reused from an allocator's cache */

/* What few mappings need, made on first use (mapping_extra) and freed with
 * the mapping's owner: most regions never export a buffer, run a call
 * without the GIL, map a file or join the registry, and a Region stays
 * small (at most 144 bytes, as sys.getsizeof counts) without it. */
typedef struct {
    Hold *holds;            /* live buffers and pins, a doubly linked list */
    Py_ssize_t nexports;    /* holds that are buffers */
    Py_ssize_t pins;        /* holds that are pins */
    Py_ssize_t busy;        /* calls running without the GIL, in generation busy_gen */
    unsigned int busy_gen;
    int64_t offset;         /* where in the file data starts */
    int repair;             /* its slot in the repair table, while MAPPING_REPAIRABLE */
    Mapping *next, *prev;   /* in kernel.registry while MAPPING_REGISTERED */
} MappingExtra;

struct Mapping {
    char *data;             /* NULL once closed; cleared before the unmap */
    Py_ssize_t size;        /* bytes of contents: len(), the buffer length */
    Py_ssize_t capacity;    /* bytes mapped (whole pages); what the unmap is given */
    PageRecord rec;         /* protection of each page: the authority */
    MappingExtra *x;        /* NULL until needed */
    int mflags;             /* MAP_* for new pages like these (no POPULATE/FIXED) */
    int fd;                 /* the file mapped, or -1 */
    int32_t page;           /* granule: sizes and ranges round to it (at most 1 GiB) */
    unsigned int gen;       /* the fork generation it was mapped in */
    uint16_t flags;         /* MAPPING_* */
    unsigned char align_shift;   /* log2 of the alignment kept when it moves */
    unsigned char advice;   /* madvise for new pages (MADV_HUGEPAGE), or 0 */
    unsigned char populate; /* prefault pages a grow adds */
};

/* The extension of m, made now if need be; NULL with MemoryError. */
MappingExtra *mapping_extra(Mapping *m);
/* Free it: at the owner's deallocation, when nothing can hold or use m
 * (a hold keeps its owner alive). */
void mapping_free_extra(Mapping *m);

static inline Hold *
mapping_holds(const Mapping *m)
{
    return m->x != NULL ? m->x->holds : NULL;
}

static inline Py_ssize_t
mapping_exports(const Mapping *m)
{
    return m->x != NULL ? m->x->nexports : 0;
}

static inline Py_ssize_t
mapping_pins(const Mapping *m)
{
    return m->x != NULL ? m->x->pins : 0;
}

static inline int64_t
mapping_offset(const Mapping *m)
{
    return m->x != NULL ? m->x->offset : 0;
}

static inline Py_ssize_t
mapping_align(const Mapping *m)
{
    return (Py_ssize_t)1 << m->align_shift;
}

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

/* Own the pages at data (mapped already, per spec); fd < 0: anonymous.
 * Every field is set (m may be a reused object's). Inline: it is on the
 * path of every allocation. */
static inline void
mapping_init(Mapping *m, char *data, Py_ssize_t size, Py_ssize_t capacity, const MapSpec *spec,
             int fd)
{
    m->data = data;
    m->size = size;
    m->capacity = capacity;
    m->rec.one.end = capacity;
    m->rec.one.prot = (unsigned char)spec->prot;
    m->rec.one.flags = 0;
    m->rec.runs = &m->rec.one;
    m->x = NULL;
    m->flags = 0;
    m->rec.n = m->rec.cap = 1;
    m->gen = kernel.fork_generation;
    m->page = (int32_t)spec->page;
    m->align_shift = (unsigned char)__builtin_ctzll((unsigned long long)spec->align);
    m->mflags = spec->mflags;
    m->advice = (unsigned char)spec->advice;
    m->populate = (unsigned char)spec->populate;
    m->fd = fd;
}
/* Calls running without the GIL on m, counted in this process only (a
 * forked child does not inherit the threads that made them). */
static inline Py_ssize_t
mapping_busy(const Mapping *m)
{
    return m->x != NULL && m->x->busy_gen == kernel.fork_generation ? m->x->busy : 0;
}
/* Mark m busy: 0, or ENOMEM (no extension for the count). */
int mapping_busy_enter(Mapping *m);
void mapping_busy_leave(Mapping *m);
/* Whether nothing holds or uses m (no exception: for fast paths). */
static inline int
mapping_idle(const Mapping *m)
{
    return m->x == NULL || (m->x->holds == NULL && mapping_busy(m) == 0);
}
/* BufferError unless nothing holds or uses m: for unmap, move, shrink. noun
 * names the owner ("the region"). */
int mapping_check_idle(const Mapping *m, const char *what, const char *noun);
Hold *mapping_hold(Mapping *m, Py_ssize_t start, Py_ssize_t end, int kind);
void mapping_unhold(Mapping *m, Hold *h);
/* What an exporter's getbuffer put in buffer->internal, taken out: NULL the
 * second time the same buffer is released (3.13's free-threaded memoryview
 * does that when two threads release it at once), so a hold ends once. */
static inline void *
buffer_release_once(Py_buffer *buffer)
{
    void *token = buffer->internal;

    buffer->internal = NULL;
    return token;
}
/* The buffers overlapping [start, end) that prot would take access from. */
Py_ssize_t mapping_conflicts(const Mapping *m, Py_ssize_t start, Py_ssize_t end, int prot);
/* The holds overlapping [start, end): buffers and pins. */
void mapping_holds_in(const Mapping *m, Py_ssize_t start, Py_ssize_t end, Py_ssize_t *buffers,
                      Py_ssize_t *pins);
/* Change [start, end) to prot in the kernel and the record, all or nothing;
 * -1 with the exception set. mapping_protect: the same, 0 or errno with
 * nothing raised, for a caller that checked and must not run Python code
 * before it acts. */
int mapping_set_prot(Mapping *m, Py_ssize_t start, Py_ssize_t end, int prot);
int mapping_protect(Mapping *m, Py_ssize_t start, Py_ssize_t end, int prot);
/* The run flag an advice sets or clears (0: none; *value: what it sets). */
int advice_run_flag(int advice, int *value);
/* Advise [start, end) and record the run flag the advice sets or clears
 * (MADV_DONTFORK also registers m for the fork hook); 0 or errno. */
int mapping_advise_flags(Mapping *m, Py_ssize_t start, Py_ssize_t end, int advice);
/* Unmap it (the pointer cleared first; fd closed, registry left): 0, or the
 * errno of a refusal with m intact. Checks nothing: the caller did. */
int mapping_close(Mapping *m);
/* The same, for a deallocation: a refused unmap goes to the graveyard. */
void mapping_release(Mapping *m);
/* Unmap pages nobody can reach any more (a refusal: the graveyard). */
void unmap_or_bury(char *p, Py_ssize_t length, int release_gil);
void flush_graveyard(void);
/* Join the registry (for pages a fork leaves out, or a file's peers): 0,
 * or ENOMEM (no extension for the links; no exception). */
int mapping_register(Mapping *m);
void mapping_unregister(Mapping *m);
/* What a closed mapping leaves behind: the repair's slot, the registry
 * entry and the file. */
void mapping_forget(Mapping *m);
/* pthread_atfork's handlers. Before: unmaps under way without the GIL end.
 * Child: new generation; pages MADV_DONTFORK left out are mapped again as
 * zero pages, so that no buffer points at a hole. */
void before_fork(void);
void after_fork_in_child(void);

/* resize.c: growing, moving and shrinking any mapping (fd < 0: anonymous) */
/* Unmap the pages from newcap (< capacity, page-aligned) on and record it;
 * 0 or errno (nothing changed). */
int mapping_drop_tail(Mapping *m, Py_ssize_t newcap);
/* Grow to newcap where it is (mremap, or a map of the next pages of the
 * file or of fresh memory next to it); the new pages get the last run's
 * protection and flags. 0 or errno (nothing changed). */
int mapping_grow_in_place(Mapping *m, Py_ssize_t newcap);
/* Move to a new place of newcap bytes (>= capacity): mremap when one kernel
 * mapping holds it, else a new mapping (of the file, or a copy of the
 * anonymous pages that hold data) with the record applied. spec, when not
 * NULL, says how to map anonymous pages that must be copied (and *backing
 * takes its backing). 0; an errno with *call the step the kernel refused;
 * or -1 with an exception set (MemoryError). Nothing changes on failure.
 * The caller checked that m is idle. */
int mapping_move(Mapping *m, Py_ssize_t newcap, const MapSpec *spec, PyObject **backing,
                 const char **call);
/* Give fresh pages at p (a new mapping of m's pages, made with prot0 over
 * [0, upto)) the record's protection (less prot_mask) and advice; 0 or errno. */
int mapping_apply_record(Mapping *m, char *p, Py_ssize_t upto, int prot0, int prot_mask);
/* Zero bytes [start, end), whichever their protection; -1 + exception. */
int mapping_zero(Mapping *m, Py_ssize_t start, Py_ssize_t end, const char *noun);
/* Advise and prefault pages [old, new) as the first pages were. */
void mapping_prepare(Mapping *m, Py_ssize_t old, Py_ssize_t new);
/* Map m's file again over [start, end), in place, with the record's
 * protection and flags there (pages the SIGBUS repair replaced); 0 or errno. */
int mapping_map_file_again(Mapping *m, Py_ssize_t start, Py_ssize_t end);

/* repair.c: the SIGBUS repair of mappings of files that may shrink. The
 * core calls these only for mappings with MAPPING_REPAIRABLE set. */
/* Publish m (mapped, fd and offset set) and install the handler: 0, or -1
 * with an exception (nothing published). */
int repair_publish(Mapping *m);
/* Hold the handler off m's slot while m changes (waits for a repair in
 * progress); repair_unlock shows m as it is then. */
void repair_lock(Mapping *m);
void repair_unlock(Mapping *m);
/* Before m is unmapped: its slot covers nothing (waits for a repair in
 * progress). After the unmap, repair_withdraw frees it; if the unmap
 * failed, repair_unlock shows m again. */
void repair_closing(Mapping *m);
/* After m was unmapped (lock held): its slot is free again. */
void repair_withdraw(Mapping *m);
/* Map the file again over the pages repaired below `upto` (lock held); 0 or errno. */
int repair_restore(Mapping *m, Py_ssize_t upto);
/* The file was mapped again over all of m (lock held): no page is repaired. */
void repair_remapped(Mapping *m);
/* The offset of m's first repaired page, or -1. */
Py_ssize_t repair_first(const Mapping *m);
/* FileTruncatedError if [start, end) touches pages repaired since the last
 * refresh; 0 when not. */
int repair_check(const Mapping *m, Py_ssize_t start, Py_ssize_t end);
/* In a forked child: slots held by threads that do not exist there are
 * live again, and those closing are withdrawn (mapping_forget). */
void repair_after_fork(void);

/* repair_check for any mapping: nothing but a flag test for anonymous memory. */
static inline int
mapping_check_truncated(const Mapping *m, Py_ssize_t start, Py_ssize_t end)
{
    return (m->flags & MAPPING_REPAIRABLE) ? repair_check(m, start, end) : 0;
}

/* ------------------------------------------------------------------ */
/* cache.c: an allocator's cache of freed mappings (pure data)         */

typedef struct CacheClass CacheClass;

typedef struct MappingCache {
    CacheClass *table;          /* the classes, open addressing */
    CacheClass *last;           /* the class found last (a hint), or NULL */
    Py_ssize_t size, used;      /* slots, classes */
    Py_ssize_t max;             /* mappings kept per class; 0: off */
    Py_ssize_t mappings, bytes; /* held now */
    unsigned long long hits, misses;
    struct MappingCache *next, *prev;   /* on kernel.caches from its first mapping on */
    int linked;
} MappingCache;

/* A mapping of the class, out of the cache; NULL when it holds none. */
char *cache_take(MappingCache *c, Py_ssize_t capacity, Py_ssize_t align, int attempt);
/* The class, with room for one more mapping (made if need be); NULL when it
 * is full or there is no memory for it. Valid until the next cache call. */
CacheClass *cache_room(MappingCache *c, Py_ssize_t capacity, Py_ssize_t align, int attempt);
/* Keep the mapping at p in cls (cache_room's, with no cache call since). */
void cache_push(MappingCache *c, CacheClass *cls, char *p);
/* Unmap every mapping held; the bytes of address space given back. */
Py_ssize_t cache_trim(MappingCache *c);
/* cache_trim, then free the classes (the cache's end). */
void cache_free(MappingCache *c);
/* [(address, capacity, align, attempt)] of the mappings held (for tests). */
PyObject *cache_list(const MappingCache *c);

/* ------------------------------------------------------------------ */
/* region.c: Region, an owner of one mapping                           */

typedef struct {
    PyObject_HEAD
    Mapping m;
    PyObject *owner;        /* the allocator that made it, or None */
    PyObject *backing;      /* what backs it, recorded when it was mapped */
    PyObject *weakreflist;
} RegionObject;

extern PyType_Spec region_spec, pin_spec, view_spec, iter_spec, pool_spec, allocator_spec;

static inline int
is_region(PyObject *o)
{
    return kernel.region_type != NULL && PyObject_TypeCheck(o, kernel.region_type);
}

/* Dead Regions of exactly kernel.region_type kept for the next ones (a
 * free list, as CPython keeps floats): no allocator call, no collection.
 * None in free-threaded builds, where CPython's own free lists are per thread. */
#ifdef Py_GIL_DISABLED
#define SPARE_REGIONS 0
#else
#define SPARE_REGIONS 64
#endif

/* A new Region of cls, GC-tracked, its object fields NULL and its mapping
 * for mapping_init to set (every field): a dead one kept for reuse when cls
 * is the Region type itself, else a fresh one. NULL with MemoryError.
 * Nothing here runs Python code but a collection that a fresh allocation
 * may start. */
static inline RegionObject *
region_alloc(PyTypeObject *cls)
{
    RegionObject *self = (RegionObject *)kernel.spare_regions;

    if (self == NULL || cls != kernel.region_type)
        return (RegionObject *)PyType_GenericAlloc(cls, 0);
    kernel.spare_regions = self->m.data;   /* the list's link */
    kernel.nspare_regions--;
    self->m.data = NULL;
    self->m.x = NULL;
    self->owner = self->backing = self->weakreflist = NULL;
    PyObject_Init((PyObject *)self, cls);
    PyObject_GC_Track(self);
    return self;
}
/* Free the dead Regions kept (the module's end). */
void region_free_spares(void);

int region_check_open(RegionObject *self);
/* The (region, offset=0, length=None) of the module function fname (method:
 * the name its argument errors give): the region that kind takes (open, of
 * its kind; else NULL with the exception), checked after the conversion,
 * and the range as whole pages of it. NULL with the exception. */
RegionObject *region_range_arg(PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames,
                               const char *fname, const char *method,
                               RegionObject *(*kind)(PyObject *), Py_ssize_t *start,
                               Py_ssize_t *n);
/* A new region over `capacity` bytes at data (owned from now on). NULL on
 * failure (the caller unmaps). spec is the caller's own: region_alloc may
 * run Python code, which must not be able to change it. */
PyObject *region_wrap(PyTypeObject *cls, char *data, Py_ssize_t size, Py_ssize_t capacity,
                      const MapSpec *spec, PyObject *owner, int fd);
/* Map pages per spec (at address exactly when not NULL) and wrap them: NULL
 * with OSError when the kernel refuses; nothing left mapped on failure. */
PyObject *region_map(PyTypeObject *cls, Py_ssize_t size, Py_ssize_t capacity,
                     const MapSpec *spec, PyObject *owner, char *address);
PyObject *region_release(RegionObject *self, PyObject *owner);
/* Whether unmapping the mapping is slow enough to release the GIL for. */
static inline int
mapping_unmap_is_slow(const Mapping *m)
{
    return m->capacity >= SLOW_CALL_BYTES && (m->flags & MAPPING_COMMITTED);
}

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
PyObject *region_pin_public(RegionObject *, PyObject *);
PyObject *region_runs(RegionObject *, PyObject *);
PyObject *region_resize(RegionObject *, PyObject *const *, Py_ssize_t);
PyObject *region_populate(RegionObject *, PyObject *const *, Py_ssize_t, PyObject *);
PyObject *region_madvise(RegionObject *, PyObject *const *, Py_ssize_t, PyObject *);
PyObject *region_mlock(RegionObject *, PyObject *const *, Py_ssize_t, PyObject *);
PyObject *region_munlock(RegionObject *, PyObject *const *, Py_ssize_t, PyObject *);
PyObject *region_mincore(RegionObject *, PyObject *const *, Py_ssize_t, PyObject *);
PyObject *region_view(RegionObject *, PyObject *const *, Py_ssize_t, PyObject *);

#include "tokens.h"

/* ------------------------------------------------------------------ */
/* objects.c: what the kernel's object types share                     */

#include "objects.h"

/* Each extension adds its functions and types to the module (module.c
 * calls them once, at import). */
int secret_init(PyObject *module);
int shared_init(PyObject *module);
int codeheap_init(PyObject *module);
int files_init(PyObject *module);
int repair_init(PyObject *module);

#endif
