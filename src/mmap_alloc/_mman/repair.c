/*
 * The SIGBUS repair. When the file under a mapping shrinks (another process
 * truncates it, a peer cuts a memfd short, log rotation copies and
 * truncates), the kernel takes the pages past the new end away, and the next
 * touch of one raises SIGBUS: through numpy, a memoryview, ctypes, any
 * exporter, on any thread. Left alone, that kills the process. Here the
 * library keeps a published table of the mappings of files that may shrink
 * (MAPPING_REPAIRABLE), and a SIGBUS handler that, for a fault inside one of
 * them past the file's end, maps anonymous zero pages (MAP_FIXED |
 * MAP_PRIVATE | MAP_ANONYMOUS) over [the file's end rounded up to a page,
 * the end of the mapping) and returns: the access runs again and completes
 * on the zero page. Writes there reach no file; the region's own methods
 * raise FileTruncatedError for those pages until refresh() maps the file
 * again over them (repair_restore).
 *
 * The table is process-wide (kernel.repair) and lock-free for the handler,
 * which runs on any thread, with or without the GIL, at any instruction:
 * it reads only slots, with __atomic loads, and makes only async-signal-safe
 * calls (fstat, mmap, yield and re-sending a signal through the platform
 * layer; sigaction). A slot is {state, fd, protection, [start, end), file offset, granule,
 * repaired-from, the size the last repair found}; its state says who may
 * touch it:
 *
 *   FREE  -> BUSY   an owner takes it for a new mapping (GIL held)
 *   LIVE  -> BUSY   an owner changes the mapping (grow, move, shrink, close,
 *                   protect, refresh), or the handler repairs it
 *   BUSY  -> LIVE   the same, done: the owner publishes the mapping as it is
 *   BUSY  -> CLOSING  an owner unmaps it (perhaps without the GIL); CLOSING
 *                   covers no address, and no owner takes it
 *   CLOSING -> FREE an owner withdraws it, after the unmap (or LIVE again
 *                   if the unmap failed); a forked child withdraws it itself,
 *                   as the owner's thread does not exist there
 *
 * Whoever holds BUSY is alone with the slot and the pages it covers; the
 * other side waits (a repair is one fstat and one mmap; an owner's change a
 * few system calls, none of which touches the pages). So a slot is never
 * withdrawn or moved while a repair maps over its range, and a repair never
 * maps over pages the owner is unmapping: nothing else that lands at those
 * addresses later can be "repaired". A fault inside the file's size when
 * the handler looks is run again: the file grew back after the fault (a
 * copy-and-truncate rotation whose writer appends at once). One that stays
 * inside the size that many times in a row (an I/O error, a full disk under
 * a hole), a fault outside every slot, or one the kernel did not raise, goes
 * to the handler that was there before (see chain()); the default action is
 * restored so the access kills the process exactly as it would have.
 */
#define _GNU_SOURCE 1
#include "mman.h"

#include <signal.h>
#include <stdlib.h>
#include <unistd.h>

#define CHUNK 256           /* slots per chunk; chunks are never freed */
#define MAX_CHUNKS 1024     /* 262,144 slots: more mappings than vm.max_map_count allows */
#define NONE UINTPTR_MAX    /* repaired: no page is */
#define PREVIOUS 8          /* handlers we chained to, kept for handlers still running */
#define PASSING 64          /* threads passing a signal on at once */
#define SPIN_LIMIT (1L << 20)   /* yields a handler waits for a slot: about a second */
#define REGROWN_LIMIT 256   /* faults in a row inside the file's size run again */
#define IN_A_ROW_NS 100000000LL   /* faults at a page further apart are not in a row */

enum { SLOT_FREE, SLOT_LIVE, SLOT_BUSY, SLOT_CLOSING };

typedef struct {
    int state;
    int fd;                 /* the mapping's file (the owner's descriptor) */
    int prot;               /* what repaired pages get: every protection of the mapping */
    uintptr_t start, end;   /* the mapping */
    uintptr_t granule;      /* the page of the mapping (a huge page on hugetlbfs) */
    int64_t offset;         /* the file offset of start */
    uintptr_t repaired;     /* offset of the first repaired page from start, or NONE */
    int64_t size;           /* the file's size when the last repair found it */
    Mapping *owner;         /* for a forked child, which withdraws a slot closing */
} Slot;

struct RepairTable {
    Slot *chunks[MAX_CHUNKS];
    int used;               /* slots ever taken: the handler scans [0, used) */
    int hint;               /* no slot below it is free */
    int installs;           /* times our handler was put in place */
    int previous_at;        /* the handler foreign signals go to: previous[previous_at] */
    struct sigaction previous[PREVIOUS];
    pid_t passing[PASSING]; /* threads inside a handler we passed a signal on to */
    /* each thread's last fault: faults_in_a_row() */
    struct { pid_t tid; uintptr_t page; int64_t changed; long count; long long at; } again[PASSING];
};

#define LOAD(x) __atomic_load_n(&(x), __ATOMIC_RELAXED)
#define STORE(x, v) __atomic_store_n(&(x), (v), __ATOMIC_RELAXED)

static Slot *
slot_at(struct RepairTable *t, int i)
{
    return __atomic_load_n(&t->chunks[i / CHUNK], __ATOMIC_ACQUIRE) + i % CHUNK;
}

static Slot *
slot_of(const Mapping *m)
{
    return slot_at(kernel.repair, m->x->repair);   /* published: it has the extension */
}

static void
pause_briefly(void)
{
    os_yield();
}

static pid_t
this_thread(void)
{
    return (pid_t)os_thread_id();
}

/* ------------------------------------------------------------------ */
/* the handler                                                         */

static void repair_handler(int sig, siginfo_t *info, void *context);

/* The faults this thread took in a row at page (none more than IN_A_ROW_NS
 * apart, the file's change time the same), this one included; 0 when the
 * table has no room to count them. A fault at a page the table says is
 * repaired already: another thread repaired it between the fault and now,
 * and the access completes when it runs again; twice in a row, the table is
 * wrong about it (which no owner lets happen), and the page is repaired
 * again rather than faulting for ever. A fault inside the file's size runs
 * again until REGROWN_LIMIT in a row with the file unchanged: a file cut
 * short and grown back between each of them changes every time. */
static long
faults_in_a_row(struct RepairTable *t, pid_t tid, uintptr_t page, int64_t changed)
{
    long long now = os_monotonic_ns();
    int i, spare = -1;
    pid_t holder = 0;

    for (i = 0; i < PASSING && LOAD(t->again[i].tid) != tid; i++) {
        pid_t other = LOAD(t->again[i].tid);
        if (spare < 0 && (other == 0 || now - LOAD(t->again[i].at) > IN_A_ROW_NS)) {
            spare = i;   /* free, or counting nothing in a row any more */
            holder = other;
        }
    }
    if (i == PASSING) {
        if (spare < 0 || !__atomic_compare_exchange_n(&t->again[spare].tid, &holder, tid, 0,
                                                      __ATOMIC_RELAXED, __ATOMIC_RELAXED))
            return 0;
        i = spare;
        STORE(t->again[i].count, 0);
    }
    if (LOAD(t->again[i].page) != page || LOAD(t->again[i].changed) != changed
        || now - LOAD(t->again[i].at) > IN_A_ROW_NS)
        STORE(t->again[i].count, 0);
    STORE(t->again[i].page, page);
    STORE(t->again[i].changed, changed);
    STORE(t->again[i].at, now);
    STORE(t->again[i].count, LOAD(t->again[i].count) + 1);
    return LOAD(t->again[i].count);
}

/* Repair the fault at addr if slot s covers it: 1 done (the access can run
 * again), 0 a fault of s that is no truncation, -1 s does not cover addr. */
static int
repair_slot(struct RepairTable *t, Slot *s, uintptr_t addr)
{
    uintptr_t start, end, granule, from, rep;
    int64_t edge;
    OsFileInfo info;
    void *p;
    int expected, done = 0;

    for (long spins = 0;; spins++) {
        expected = SLOT_LIVE;
        if (__atomic_compare_exchange_n(&s->state, &expected, SLOT_BUSY, 0, __ATOMIC_ACQUIRE,
                                        __ATOMIC_RELAXED))
            break;
        /* withdrawn; or held that long, which no owner does (its change is a
         * few system calls) unless it waits for the GIL this thread holds:
         * a raw pointer used while its region closes. Not a repair then. */
        if (expected == SLOT_FREE || expected == SLOT_CLOSING || spins == SPIN_LIMIT)
            return -1;
        pause_briefly();   /* the owner changes the mapping, or another thread repairs it */
    }
    start = s->start;
    end = s->end;
    if (addr < start || addr >= end) {
        __atomic_store_n(&s->state, SLOT_LIVE, __ATOMIC_RELEASE);
        return -1;
    }
    granule = s->granule;
    rep = s->repaired < end - start ? s->repaired : end - start;
    if (os_file_info(s->fd, &info) == 0) {
        /* pages from the file's end (rounded up to the granule) on fault */
        edge = ((info.size + (int64_t)granule - 1) & ~(int64_t)(granule - 1)) - s->offset;
        from = edge <= 0 ? 0 : (uintptr_t)edge < end - start ? (uintptr_t)edge : end - start;
        uintptr_t page = addr & ~(granule - 1);
        if (addr - start >= rep) {
            done = 1;
            if (faults_in_a_row(t, this_thread(), page, 0) >= 2)
                done = os_map(&p, (void *)page, granule, s->prot, MAP_FIXED | MAP_NORESERVE, -1,
                              0) == 0;
        }
        else if (addr - start >= from) {
            if (os_map(&p, (void *)(start + from), rep - from, s->prot,
                       MAP_FIXED | MAP_NORESERVE, -1, 0) == 0) {
                /* read without the slot by the owner's checks (repair_check) */
                __atomic_store_n(&s->size, info.size, __ATOMIC_RELAXED);
                __atomic_store_n(&s->repaired, from, __ATOMIC_RELEASE);
                done = 1;
            }
        }
        else {
            long n = faults_in_a_row(t, this_thread(), page, info.changed);
            done = n > 0 && n < REGROWN_LIMIT;
        }
    }
    __atomic_store_n(&s->state, SLOT_LIVE, __ATOMIC_RELEASE);
    return done;
}

/* 1 if the fault at addr was past the end of a file the table has, and is
 * repaired now. */
static int
repair_fault(uintptr_t addr)
{
    struct RepairTable *t = __atomic_load_n(&kernel.repair, __ATOMIC_ACQUIRE);
    int used = t == NULL ? 0 : __atomic_load_n(&t->used, __ATOMIC_ACQUIRE);

    for (int i = 0; i < used; i++) {
        Slot *s = slot_at(t, i);
        int r;
        if (__atomic_load_n(&s->state, __ATOMIC_ACQUIRE) == SLOT_FREE || addr < LOAD(s->start)
            || addr >= LOAD(s->end))
            continue;
        r = repair_slot(t, s, addr);
        if (r > 0)
            return 1;
    }
    return 0;
}

/* The end of the chain: what SIG_DFL or SIG_IGN would have done. */
static void
act_as_default(int sig, const siginfo_t *info, int ignored)
{
    int from_kernel = info != NULL && info->si_code > 0;
    struct sigaction dfl;

    if (ignored && !from_kernel)
        return;   /* a signal sent to be ignored: ignored */
    memset(&dfl, 0, sizeof dfl);
    dfl.sa_handler = SIG_DFL;
    sigemptyset(&dfl.sa_mask);
    sigaction(sig, &dfl, NULL);
    /* a fault runs its access again and dies of it; a sent signal is sent
     * again (our handler has SA_NODEFER: it arrives now) */
    if (!from_kernel)
        os_resend_signal(sig);
}

static int
mark_passing(struct RepairTable *t, pid_t tid)
{
    for (int i = 0; i < PASSING; i++) {
        pid_t none = 0;
        if (__atomic_compare_exchange_n(&t->passing[i], &none, tid, 0, __ATOMIC_ACQ_REL,
                                        __ATOMIC_RELAXED))
            return i;
    }
    return -1;
}

/* Pass a signal that is not ours to the handler that was there before. A
 * signal that comes back while this thread is inside that handler (it
 * restored a handler that leads back here, and raised the signal again: as
 * faulthandler does) ends the chain: the default action. */
static void
chain(int sig, siginfo_t *info, void *context)
{
    struct RepairTable *t = __atomic_load_n(&kernel.repair, __ATOMIC_ACQUIRE);
    const struct sigaction *prev;
    pid_t tid = this_thread();
    int mark;

    for (int i = 0; i < PASSING; i++)
        if (__atomic_load_n(&t->passing[i], __ATOMIC_ACQUIRE) == tid) {
            act_as_default(sig, info, 0);
            return;
        }
    prev = &t->previous[__atomic_load_n(&t->previous_at, __ATOMIC_ACQUIRE)];
    if (!(prev->sa_flags & SA_SIGINFO)
        && (prev->sa_handler == SIG_DFL || prev->sa_handler == SIG_IGN)) {
        act_as_default(sig, info, prev->sa_handler == SIG_IGN);
        return;
    }
    mark = mark_passing(t, tid);
    if (prev->sa_flags & SA_SIGINFO)
        prev->sa_sigaction(sig, info, context);
    else
        prev->sa_handler(sig);
    if (mark >= 0)
        __atomic_store_n(&t->passing[mark], 0, __ATOMIC_RELEASE);
}

static void
repair_handler(int sig, siginfo_t *info, void *context)
{
    int saved = errno;

    if (!(info != NULL && info->si_code == BUS_ADRERR
          && repair_fault((uintptr_t)info->si_addr)))
        chain(sig, info, context);
    errno = saved;
}

/* ------------------------------------------------------------------ */
/* installing it                                                       */

static int
handler_in_place(void)
{
    struct sigaction now;

    return sigaction(SIGBUS, NULL, &now) == 0 && (now.sa_flags & SA_SIGINFO)
           && now.sa_sigaction == repair_handler;
}

/* Put our handler in place, over whatever is there (which it passes foreign
 * signals to); nothing if it is in place already. 0 or errno. */
static int
install(struct RepairTable *t)
{
    struct sigaction now, ours;
    int next;

    if (sigaction(SIGBUS, NULL, &now) != 0)
        return errno;
    if ((now.sa_flags & SA_SIGINFO) && now.sa_sigaction == repair_handler)
        return 0;
    /* a new place for it: a handler still running may read the one before */
    next = t->installs == 0 ? 0 : (t->previous_at + 1) % PREVIOUS;
    t->previous[next] = now;
    __atomic_store_n(&t->previous_at, next, __ATOMIC_RELEASE);
    memset(&ours, 0, sizeof ours);
    ours.sa_sigaction = repair_handler;
    ours.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_NODEFER | SA_RESTART;
    sigemptyset(&ours.sa_mask);
    if (sigaction(SIGBUS, &ours, NULL) != 0)
        return errno;
    t->installs++;
    return 0;
}

static struct RepairTable *
table(void)
{
    struct RepairTable *t = kernel.repair;

    if (t == NULL) {
        t = calloc(1, sizeof *t);   /* plain C memory: it outlives interpreters */
        if (t == NULL)
            return (struct RepairTable *)PyErr_NoMemory();
        __atomic_store_n(&kernel.repair, t, __ATOMIC_RELEASE);
    }
    return t;
}

/* A free slot, taken (BUSY): its index, or -1 with an exception. */
static int
take_slot(struct RepairTable *t)
{
    int i;

    for (i = t->hint; i < t->used; i++) {
        Slot *s = slot_at(t, i);
        int expected = SLOT_FREE;
        if (__atomic_compare_exchange_n(&s->state, &expected, SLOT_BUSY, 0, __ATOMIC_ACQUIRE,
                                        __ATOMIC_RELAXED)) {
            t->hint = i + 1;
            return i;
        }
    }
    if (i == CHUNK * MAX_CHUNKS) {
        raise_alloc_error(ENOMEM, 0, "cannot map another file region: %d are mapped, the most "
                          "the SIGBUS repair can watch", i);
        return -1;
    }
    if (i % CHUNK == 0 && t->chunks[i / CHUNK] == NULL) {
        Slot *chunk = calloc(CHUNK, sizeof(Slot));
        if (chunk == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        __atomic_store_n(&t->chunks[i / CHUNK], chunk, __ATOMIC_RELEASE);
    }
    __atomic_store_n(&slot_at(t, i)->state, SLOT_BUSY, __ATOMIC_RELAXED);
    __atomic_store_n(&t->used, i + 1, __ATOMIC_RELEASE);
    t->hint = i + 1;
    return i;
}

/* ------------------------------------------------------------------ */
/* the owners' side (GIL held)                                         */

int
repair_publish(Mapping *m)
{
    struct RepairTable *t = table();
    Slot *s;
    int err, i;

    if (t == NULL || mapping_extra(m) == NULL)   /* the slot's number is kept there */
        return -1;
    if ((err = install(t)) != 0) {
        raise_os_error(err, "sigaction");
        return -1;
    }
    if ((i = take_slot(t)) < 0)
        return -1;
    s = slot_at(t, i);
    s->fd = m->fd;
    s->granule = (uintptr_t)m->page;
    s->offset = mapping_offset(m);
    s->repaired = NONE;
    s->size = 0;
    s->owner = m;
    m->x->repair = i;
    m->flags |= MAPPING_REPAIRABLE;
    repair_unlock(m);
    return 0;
}

void
repair_lock(Mapping *m)
{
    Slot *s = slot_of(m);

    for (;;) {
        int expected = SLOT_LIVE;
        if (__atomic_compare_exchange_n(&s->state, &expected, SLOT_BUSY, 0, __ATOMIC_ACQUIRE,
                                        __ATOMIC_RELAXED))
            return;
        pause_briefly();   /* a repair on another thread: fstat and mmap, then it is done */
    }
}

/* The protection repaired pages get: every access some page of m allows
 * (no page loses one an exporter may use; none gains one the file's open
 * mode refuses: these are private pages). */
static int
any_prot(const Mapping *m)
{
    int prot = 0;

    for (Py_ssize_t i = 0; i < m->rec.n; i++)
        prot |= m->rec.runs[i].prot;
    return prot;
}

void
repair_unlock(Mapping *m)
{
    Slot *s = slot_of(m);

    /* start and end are read by handlers scanning the table: whole stores */
    STORE(s->start, (uintptr_t)m->data);
    STORE(s->end, (uintptr_t)m->data + (uintptr_t)m->capacity);
    s->prot = any_prot(m);
    if (s->repaired != NONE && s->repaired >= (uintptr_t)m->capacity)
        s->repaired = NONE;
    __atomic_store_n(&s->state, SLOT_LIVE, __ATOMIC_RELEASE);
}

void
repair_closing(Mapping *m)
{
    Slot *s = slot_of(m);

    repair_lock(m);
    STORE(s->start, 0);
    STORE(s->end, 0);
    __atomic_store_n(&s->state, SLOT_CLOSING, __ATOMIC_RELEASE);
}

void
repair_withdraw(Mapping *m)
{
    Slot *s = slot_of(m);
    struct RepairTable *t = kernel.repair;

    STORE(s->start, 0);
    STORE(s->end, 0);
    s->fd = -1;
    __atomic_store_n(&s->state, SLOT_FREE, __ATOMIC_RELEASE);
    if (m->x->repair < t->hint)
        t->hint = m->x->repair;
    m->flags &= ~MAPPING_REPAIRABLE;
}

int
repair_restore(Mapping *m, Py_ssize_t upto)
{
    Slot *s = slot_of(m);
    uintptr_t rep = s->repaired;
    void *p;
    int err;

    if (upto > m->capacity)
        upto = m->capacity;
    if (rep == NONE || (Py_ssize_t)rep >= upto)
        return 0;
    err = mapping_map_file_again(m, (Py_ssize_t)rep, upto);
    if (err) {
        /* the range may be part file, part hole now: zero pages over it again */
        os_map(&p, m->data + rep, (size_t)(upto - (Py_ssize_t)rep), s->prot,
               MAP_FIXED | MAP_NORESERVE, -1, 0);
        return err;
    }
    s->repaired = upto < m->capacity ? (uintptr_t)upto : NONE;
    /* pages may fault again now: a second fault at one is a new one */
    memset(kernel.repair->again, 0, sizeof kernel.repair->again);
    return 0;
}

void
repair_remapped(Mapping *m)
{
    slot_of(m)->repaired = NONE;
    memset(kernel.repair->again, 0, sizeof kernel.repair->again);
}

Py_ssize_t
repair_first(const Mapping *m)
{
    uintptr_t rep = __atomic_load_n(&slot_of(m)->repaired, __ATOMIC_ACQUIRE);

    return rep == NONE || rep >= (uintptr_t)m->capacity ? -1 : (Py_ssize_t)rep;
}

int
repair_check(const Mapping *m, Py_ssize_t start, Py_ssize_t end)
{
    Slot *s = slot_of(m);
    uintptr_t rep = __atomic_load_n(&s->repaired, __ATOMIC_ACQUIRE);
    long long size = (long long)__atomic_load_n(&s->size, __ATOMIC_RELAXED);
    PyObject *message, *args, *kwargs = NULL, *exc = NULL;

    if (start >= end || rep == NONE || (uintptr_t)end <= rep)
        return 0;
    message = PyUnicode_FromFormat(
        "the file under the region was cut short (to %lld bytes): its pages from offset %zd "
        "of the region on lie past the file's end, and read as zeros here (writes there reach "
        "no file); refresh() maps the file as it is now", size, (Py_ssize_t)rep);
    if (message == NULL)
        return -1;
    if (kernel.file_truncated == NULL) {
        PyErr_SetObject(PyExc_OSError, message);
        Py_DECREF(message);
        return -1;
    }
    args = PyTuple_Pack(1, message);
    kwargs = Py_BuildValue("{s:L}", "size", size);
    if (args != NULL && kwargs != NULL)
        exc = PyObject_Call(kernel.file_truncated, args, kwargs);
    if (exc != NULL) {
        PyErr_SetObject((PyObject *)Py_TYPE(exc), exc);
        Py_DECREF(exc);
    }
    Py_XDECREF(args);
    Py_XDECREF(kwargs);
    Py_DECREF(message);
    return -1;
}

void
repair_after_fork(void)
{
    struct RepairTable *t = kernel.repair;

    if (t == NULL)
        return;
    for (int i = 0; i < t->used; i++) {
        Slot *s = slot_at(t, i);
        if (s->state == SLOT_BUSY)   /* held by a thread that is not in the child */
            s->state = SLOT_LIVE;
        else if (s->state == SLOT_CLOSING)   /* its unmap is done (before_fork waited) */
            mapping_forget(s->owner);
    }
    memset(t->passing, 0, sizeof t->passing);
    memset(t->again, 0, sizeof t->again);
}

/* ------------------------------------------------------------------ */
/* module functions                                                    */

/* _repair_install(): put the handler back on top if another replaced it
 * (faulthandler.enable(), a runtime's own), chaining to that one. */
static PyObject *
repair_install(PyObject *module, PyObject *unused)
{
    struct RepairTable *t = table();
    int err;

    if (t == NULL)
        return NULL;
    if ((err = install(t)) != 0)
        return raise_os_error(err, "sigaction");
    Py_RETURN_NONE;
}

/* _repair_state() -> (in_place, installs, watched): whether our handler is
 * SIGBUS's now, how often it was put there, the mappings it watches. */
static PyObject *
repair_state(PyObject *module, PyObject *unused)
{
    struct RepairTable *t = kernel.repair;
    int watched = 0;

    for (int i = 0; t != NULL && i < t->used; i++)
        watched += slot_at(t, i)->state != SLOT_FREE;
    return Py_BuildValue("(Nii)", PyBool_FromLong(handler_in_place()),
                         t == NULL ? 0 : t->installs, watched);
}

/* entry points: under the kernel lock in free-threaded builds (mman.h) */
LOCKED_O(repair_install)
LOCKED_O(repair_state)

static PyMethodDef repair_methods[] = {
    METHOD_NOARGS("_repair_install", repair_install,
        "_repair_install($module, /)\n--\n\n"
        "Put the SIGBUS repair's handler on top again (chaining to the one there)."),
    METHOD_NOARGS("_repair_state", repair_state,
        "_repair_state($module, /)\n--\n\n"
        "(in_place, installs, watched): the SIGBUS repair's handler and table."),
    {NULL, NULL, 0, NULL},
};

int
repair_init(PyObject *module)
{
    return PyModule_AddFunctions(module, repair_methods);
}
