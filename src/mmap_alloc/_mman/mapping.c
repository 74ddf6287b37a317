/*
 * The mapping core: what every owner of memory embeds (Region, SecretBuffer's
 * kernel, a code heap, a shared or file region) and the rules it keeps:
 *   - data == NULL once closed; the pointer is cleared before the unmap;
 *   - rec (the protection record) says what every page allows, and every
 *     access the library makes is checked against it;
 *   - while a hold lives (a buffer exported from it, or a pin), the pages it
 *     covers are never unmapped or moved, and a buffer's never lose the
 *     access it was given; while busy (a call runs without the GIL), the
 *     mapping is never unmapped or moved;
 *   - an unmap the kernel refuses at a deallocation (vm.max_map_count) is
 *     retried later (the graveyard), never lost;
 *   - in a forked child, pages the parent advised MADV_DONTFORK are mapped
 *     again as zero pages before any Python code runs there;
 *   - a mapping of a file that may shrink (MAPPING_REPAIRABLE) holds the
 *     SIGBUS repair off (repair.c) while it changes or goes: anonymous
 *     memory pays one flag test for it.
 */
#include "mman.h"

#include <pthread.h>

/* ------------------------------------------------------------------ */
/* the extension                                                       */

/* The extension made if need be: 0, or ENOMEM with nothing raised. */
static int
extra_room(Mapping *m)
{
    if (m->x == NULL) {
        m->x = PyMem_Calloc(1, sizeof(MappingExtra));
        if (m->x == NULL)
            return ENOMEM;
        m->x->busy_gen = kernel.fork_generation;
    }
    return 0;
}

MappingExtra *
mapping_extra(Mapping *m)
{
    if (extra_room(m) != 0) {
        PyErr_NoMemory();
        return NULL;
    }
    return m->x;
}

void
mapping_free_extra(Mapping *m)
{
    PyMem_Free(m->x);
    m->x = NULL;
}

/* ------------------------------------------------------------------ */
/* busy count and holds                                                */

int
mapping_busy_enter(Mapping *m)
{
    MappingExtra *x;

    if (extra_room(m) != 0)
        return ENOMEM;
    x = m->x;
    if (x->busy_gen != kernel.fork_generation) {
        x->busy = 0;
        x->busy_gen = kernel.fork_generation;
    }
    x->busy++;
    return 0;
}

void
mapping_busy_leave(Mapping *m)
{
    if (m->x != NULL && m->x->busy_gen == kernel.fork_generation && m->x->busy > 0)
        m->x->busy--;
}

int
mapping_check_idle(const Mapping *m, const char *what, const char *noun)
{
    if (mapping_exports(m) > 0) {
        PyErr_Format(PyExc_BufferError, "cannot %s: %s has %zd exported buffer(s) or pin(s)",
                     what, noun, mapping_exports(m));
        return -1;
    }
    if (mapping_pins(m) > 0) {
        PyErr_Format(PyExc_BufferError,
                     "cannot %s: %zd function(s) or pin(s) hold %s where it is (made by "
                     "function() or pin())", what, mapping_pins(m), noun);
        return -1;
    }
    if (mapping_busy(m) > 0) {
        PyErr_Format(PyExc_BufferError, "cannot %s: a system call on %s is in progress", what,
                     noun);
        return -1;
    }
    return 0;
}

Hold *
mapping_hold(Mapping *m, Py_ssize_t start, Py_ssize_t end, int kind)
{
    MappingExtra *x = mapping_extra(m);
    Hold *h;

    if (x == NULL)
        return NULL;
    h = PyMem_Malloc(sizeof(Hold));
    if (h == NULL) {
        PyErr_NoMemory();
        return NULL;
    }
    h->start = start;
    h->end = end;
    h->kind = kind;
    LIST_PUSH(x->holds, h);
    if (kind == HOLD_PIN)
        x->pins++;
    else
        x->nexports++;
    return h;
}

void
mapping_unhold(Mapping *m, Hold *h)
{
    MappingExtra *x = m->x;   /* a hold exists: so does the extension */

    LIST_UNLINK(x->holds, h);
    if (h->kind == HOLD_PIN)
        x->pins--;
    else
        x->nexports--;
    PyMem_Free(h);
}

Py_ssize_t
mapping_conflicts(const Mapping *m, Py_ssize_t start, Py_ssize_t end, int prot)
{
    Py_ssize_t n = 0;

    for (const Hold *h = mapping_holds(m); h != NULL; h = h->next) {
        Py_ssize_t lo = h->start & ~(m->page - 1), hi = round_up(h->end, m->page);
        if (h->kind != HOLD_PIN && lo < end && start < hi
            && (!(prot & PROT_READ) || (h->kind == HOLD_WRITE && !(prot & PROT_WRITE))))
            n++;
    }
    return n;
}

void
mapping_holds_in(const Mapping *m, Py_ssize_t start, Py_ssize_t end, Py_ssize_t *buffers,
                 Py_ssize_t *pins)
{
    *buffers = *pins = 0;
    for (const Hold *h = mapping_holds(m); h != NULL; h = h->next) {
        if (h->start < end && start < h->end) {
            if (h->kind == HOLD_PIN)
                (*pins)++;
            else
                (*buffers)++;
        }
    }
}

/* ------------------------------------------------------------------ */
/* protection                                                          */

static void
record_kernel_view(void *arg, size_t start, size_t end, int prot)
{
    Mapping *m = arg;

    if (rec_room(&m->rec, 2) == 0)
        rec_set(&m->rec, (Py_ssize_t)start, (Py_ssize_t)end, prot, 0, 0);
}

int
mapping_protect(Mapping *m, Py_ssize_t start, Py_ssize_t end, int prot)
{
    int err, broken = 0;

    if (start >= end)
        return 0;
    if (rec_room(&m->rec, 2) != 0)
        return ENOMEM;
    err = os_protect(m->data + start, (size_t)(end - start), prot);
    if (err == ENOMEM && kernel_trim_caches() > 0)   /* at vm.max_map_count: the caches give room */
        err = os_protect(m->data + start, (size_t)(end - start), prot);
    if (!err) {
        rec_set(&m->rec, start, end, prot, 0, 0);
        if (m->flags & MAPPING_REPAIRABLE) {   /* the protection repaired pages get */
            repair_lock(m);
            repair_unlock(m);
        }
        return 0;
    }
    /* mprotect works mapping by mapping and may stop part-way: put back what
     * it changed, so that a failed call changes nothing */
    for (Py_ssize_t i = rec_find(&m->rec, start); i < m->rec.n && rec_start(&m->rec, i) < end;
         i++) {
        Py_ssize_t lo = rec_start(&m->rec, i), hi = m->rec.runs[i].end;
        lo = lo > start ? lo : start;
        hi = hi < end ? hi : end;
        if (os_protect(m->data + lo, (size_t)(hi - lo), m->rec.runs[i].prot) != 0)
            broken = 1;
    }
    if (broken)   /* and that failed too: the record takes the kernel's word */
        os_query_protection(m->data + start, (size_t)(end - start), record_kernel_view, m);
    return err;
}

int
mapping_set_prot(Mapping *m, Py_ssize_t start, Py_ssize_t end, int prot)
{
    int err;

    if (start < end && rec_reserve(&m->rec, 2) < 0)
        return -1;
    err = mapping_protect(m, start, end, prot);
    if (err)
        raise_os_error_sized(err, "mprotect", end - start, "change the protection of");
    return err ? -1 : 0;
}

/* The run flag an advice sets or clears (mask), and the value it sets. */
int
advice_run_flag(int advice, int *value)
{
    switch (advice) {
    case MADV_DONTFORK: *value = RUN_DONTFORK; return RUN_DONTFORK;
    case MADV_DOFORK: *value = 0; return RUN_DONTFORK;
    case MADV_GUARD_INSTALL: *value = RUN_GUARD; return RUN_GUARD;
    case MADV_GUARD_REMOVE: *value = 0; return RUN_GUARD;
    case MADV_DONTDUMP: *value = RUN_DONTDUMP; return RUN_DONTDUMP;
    case MADV_DODUMP: *value = 0; return RUN_DONTDUMP;
    case MADV_WIPEONFORK: *value = RUN_WIPEONFORK; return RUN_WIPEONFORK;
    case MADV_KEEPONFORK: *value = 0; return RUN_WIPEONFORK;
    default: *value = 0; return 0;
    }
}

int
mapping_advise_flags(Mapping *m, Py_ssize_t start, Py_ssize_t end, int advice)
{
    int value, mask = advice_run_flag(advice, &value), err;

    /* room first: the record and the registry entry cannot fail after the act */
    if ((mask && rec_room(&m->rec, 2) != 0) || ((value & RUN_DONTFORK) && extra_room(m) != 0))
        return ENOMEM;
    err = os_advise(m->data + start, (size_t)(end - start), advice);
    if (err || !mask)
        return err;
    rec_set(&m->rec, start, end, -1, mask, value);
    if (value & RUN_DONTFORK)
        mapping_register(m);   /* its extension exists: it cannot fail */
    return 0;
}

/* ------------------------------------------------------------------ */
/* release                                                             */

typedef struct Grave { char *p; Py_ssize_t length; } Grave;

void
flush_graveyard(void)
{
    Py_ssize_t out = 0;

    for (Py_ssize_t i = 0; i < kernel.ngraves; i++) {
        if (os_unmap(kernel.graves[i].p, (size_t)kernel.graves[i].length) == 0) {
            kernel.mapped_bytes -= kernel.graves[i].length;
            trace_unmapped(kernel.graves[i].p);
        }
        else
            kernel.graves[out++] = kernel.graves[i];
    }
    kernel.ngraves = out;
}

/* munmap without the GIL (a large file's pages take milliseconds to go);
 * before_fork waits for it, so no child is made halfway through. */
static int
unmap_without_gil(char *p, size_t length)
{
    int err;

    __atomic_add_fetch(&kernel.unmapping, 1, __ATOMIC_ACQ_REL);
    Py_BEGIN_ALLOW_THREADS
    err = os_unmap(p, length);
    __atomic_sub_fetch(&kernel.unmapping, 1, __ATOMIC_ACQ_REL);
    Py_END_ALLOW_THREADS
    return err;
}

void
before_fork(void)
{
    while (__atomic_load_n(&kernel.unmapping, __ATOMIC_ACQUIRE) > 0)
        os_yield();
}

void
unmap_or_bury(char *p, Py_ssize_t length, int release_gil)
{
    int err = release_gil ? unmap_without_gil(p, (size_t)length) : os_unmap(p, (size_t)length);

    if (err == ENOMEM && kernel_trim_caches() > 0)   /* a split at vm.max_map_count */
        err = os_unmap(p, (size_t)length);
    if (!err) {
        kernel.mapped_bytes -= length;
        trace_unmapped(p);
        if (kernel.ngraves)
            flush_graveyard();
        return;
    }
    /* refused (vm.max_map_count): give the memory back now, the address space later */
    os_advise(p, (size_t)length, MADV_DONTNEED);
    os_protect(p, (size_t)length, PROT_NONE);
    if (kernel.ngraves == kernel.cap_graves) {
        /* no exception here: a deallocation may run while one propagates */
        Py_ssize_t cap = kernel.cap_graves ? kernel.cap_graves * 2 : 16;
        Grave *g = PyMem_Realloc(kernel.graves, (size_t)cap * sizeof(Grave));
        if (g == NULL)
            return;   /* lost: the address space stays taken, the memory is given back */
        kernel.graves = g;
        kernel.cap_graves = cap;
    }
    kernel.graves[kernel.ngraves].p = p;
    kernel.graves[kernel.ngraves].length = length;
    kernel.ngraves++;
}

void
mapping_forget(Mapping *m)
{
    if (m->flags & MAPPING_REPAIRABLE)
        repair_withdraw(m);   /* locked before the unmap */
    mapping_unregister(m);
    if (m->fd >= 0 && (m->flags & MAPPING_OWNS_FD))
        os_close(m->fd);
    m->fd = -1;
}

int
mapping_close(Mapping *m)
{
    char *p = m->data;
    int err;

    if (p == NULL)
        return 0;
    if (m->flags & MAPPING_REPAIRABLE)
        repair_closing(m);   /* no repair maps over the pages while they go */
    m->data = NULL;
    err = mapping_unmap_is_slow(m) ? unmap_without_gil(p, (size_t)m->capacity)
                                   : os_unmap(p, (size_t)m->capacity);
    if (err == ENOMEM && kernel_trim_caches() > 0)   /* a split at vm.max_map_count */
        err = os_unmap(p, (size_t)m->capacity);
    if (err) {
        m->data = p;   /* e.g. ENOMEM at vm.max_map_count: the mapping is intact */
        if (m->flags & MAPPING_REPAIRABLE)
            repair_unlock(m);
        return err;
    }
    kernel.mapped_bytes -= m->capacity;
    trace_unmapped(p);
    if (kernel.ngraves)
        flush_graveyard();
    mapping_forget(m);
    return 0;
}

void
mapping_release(Mapping *m)
{
    char *p = m->data;

    if (m->flags & MAPPING_REPAIRABLE)
        repair_closing(m);
    m->data = NULL;
    if (p != NULL)
        unmap_or_bury(p, m->capacity, mapping_unmap_is_slow(m));
    mapping_forget(m);
    if (m->rec.runs != &m->rec.one)
        rec_free(&m->rec);
}

/* ------------------------------------------------------------------ */
/* the registry and fork                                               */

int
mapping_register(Mapping *m)
{
    MappingExtra *x;

    if (m->flags & MAPPING_REGISTERED)
        return 0;
    if (extra_room(m) != 0)
        return ENOMEM;
    x = m->x;
    m->flags |= MAPPING_REGISTERED;
    x->prev = NULL;
    x->next = kernel.registry;
    if (kernel.registry != NULL)
        kernel.registry->x->prev = m;
    kernel.registry = m;
    return 0;
}

void
mapping_unregister(Mapping *m)
{
    MappingExtra *x = m->x;

    if (!(m->flags & MAPPING_REGISTERED))
        return;
    if (x->prev != NULL)
        x->prev->x->next = x->next;
    else
        kernel.registry = x->next;
    if (x->next != NULL)
        x->next->x->prev = x->prev;
    x->next = x->prev = NULL;
    m->flags &= ~MAPPING_REGISTERED;
}

/* Map zero pages where MADV_DONTFORK left holes, with the recorded
 * protection and the advice that was on them. 0 or errno. */
static int
refill_dontfork(Mapping *m)
{
    int err = 0;

    for (Py_ssize_t k = 0; k < m->rec.n; k++) {
        Run *run = &m->rec.runs[k];
        Py_ssize_t start = rec_start(&m->rec, k);
        void *p;
        if (!(run->flags & RUN_DONTFORK))
            continue;
        err = os_map(&p, m->data + start, (size_t)(run->end - start), run->prot, MAP_FIXED, -1, 0);
        if (err)
            return err;
        if (run->flags & RUN_DONTDUMP)
            os_advise(p, (size_t)(run->end - start), MADV_DONTDUMP);
        if (run->flags & RUN_WIPEONFORK)
            os_advise(p, (size_t)(run->end - start), MADV_WIPEONFORK);
        run->flags &= (unsigned char)~RUN_DONTFORK;
    }
    rec_merge(&m->rec);
    return 0;
}

void
after_fork_in_child(void)
{
    kernel.fork_generation++;
    repair_after_fork();
    for (Mapping *m = kernel.registry, *next; m != NULL; m = next) {
        next = m->x->next;
        if (m->data == NULL || refill_dontfork(m) == 0)
            continue;
        /* no memory for the zero pages: a mapping nothing holds is closed in
         * the child (its API says so); one with buffers keeps the hole */
        if (mapping_exports(m) == 0 && mapping_pins(m) == 0) {
            os_unmap(m->data, (size_t)m->capacity);
            kernel.mapped_bytes -= m->capacity;
            m->data = NULL;
            mapping_unregister(m);
        }
    }
}
