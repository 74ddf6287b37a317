/*
 * Growing, moving and shrinking a mapping: the one implementation under
 * Region's realloc, grow and shrink in place, SharedRegion's resize and
 * refresh, and file regions. A mapping of a file (fd >= 0) maps the file's
 * next pages; an anonymous one fresh pages. Each function leaves the
 * mapping as it was when it fails, and keeps the record true when it
 * succeeds; the checks (exports, pins, busy) are the caller's, made first.
 */
#include "mman.h"

static Py_ssize_t
natural_align(const Mapping *m)
{
    return (m->mflags & MAP_HUGETLB) ? m->page : kernel.page;
}

/* ---------------------------------------------------------------- zero */

/* memset [lo, hi) (within one run of protection prot), raising the protection
 * for the time of the write if needed. */
static int
memset_run(Mapping *m, Py_ssize_t lo, Py_ssize_t hi, int prot)
{
    Py_ssize_t plo, phi;
    int err;

    if (prot & PROT_WRITE) {
        memset(m->data + lo, 0, (size_t)(hi - lo));
        return 0;
    }
    plo = lo & ~(kernel.page - 1);
    phi = round_up(hi, kernel.page);
    err = os_protect(m->data + plo, (size_t)(phi - plo), prot | PROT_RW);
    if (err) {
        raise_os_error_sized(err, "mprotect", phi - plo, "change the protection of");
        return -1;
    }
    memset(m->data + lo, 0, (size_t)(hi - lo));
    if (os_protect(m->data + plo, (size_t)(phi - plo), prot) != 0) {
        /* practically impossible (it merges mappings back): keep the record true */
        if (rec_room(&m->rec, 2) == 0)
            rec_set(&m->rec, plo, phi, prot | PROT_RW, 0, 0);
    }
    return 0;
}

/* memset [lo, hi), run by run; guard pages hold nothing and are skipped. */
static int
memset_range(Mapping *m, Py_ssize_t lo, Py_ssize_t hi)
{
    PageRecord *rec = &m->rec;

    for (Py_ssize_t i = rec_find(rec, lo); i < rec->n && rec_start(rec, i) < hi; i++) {
        Py_ssize_t a = rec_start(rec, i), b = rec->runs[i].end;
        a = a > lo ? a : lo;
        b = b < hi ? b : hi;
        if (!(rec->runs[i].flags & RUN_GUARD) && memset_run(m, a, b, rec->runs[i].prot) < 0)
            return -1;
    }
    return 0;
}

int
mapping_zero(Mapping *m, Py_ssize_t start, Py_ssize_t end, const char *noun)
{
    Py_ssize_t full_start, full_end;

    if (start >= end)
        return 0;
    if (mapping_pins(m) > 0) {
        PyErr_Format(PyExc_BufferError,
                     "cannot re-zero bytes of %s: %zd function(s) made by function() run code "
                     "in it (pinned code keeps its contents)", noun, mapping_pins(m));
        return -1;
    }
    full_start = round_up(start, m->page);
    full_end = end & ~(m->page - 1);
    if (full_start >= full_end || (m->flags & MAPPING_SHARED))
        return memset_range(m, start, end);
    if (start < full_start && memset_range(m, start, full_start) < 0)
        return -1;
    /* whole private pages go back to the kernel and read as zero (locked
     * pages refuse: then they are written) */
    if (os_advise(m->data + full_start, (size_t)(full_end - full_start), MADV_DONTNEED) != 0
        && memset_range(m, full_start, full_end) < 0)
        return -1;
    if (full_end < end)
        return memset_range(m, full_end, end);
    return 0;
}

/* ---------------------------------------------------------------- new pages */

void
mapping_prepare(Mapping *m, Py_ssize_t old, Py_ssize_t new)
{
    int prot;

    if (new <= old)
        return;
    if (m->advice)
        os_advise(m->data + old, (size_t)(new - old), m->advice);
    if (m->advice == MADV_HUGEPAGE && m->fd >= 0) {
        /* shmem: from the huge page the old end lies in, which may be whole
         * now (best effort: khugepaged may do it later anyway) */
        Py_ssize_t from = old & ~(mapping_align(m) - 1);
        os_advise(m->data + from, (size_t)(new - from), MADV_COLLAPSE);
    }
    prot = m->rec.runs[m->rec.n - 1].prot;
    if (m->populate && (prot & PROT_RW))
        os_advise(m->data + old, (size_t)(new - old),
                  (prot & PROT_WRITE) ? MADV_POPULATE_WRITE : MADV_POPULATE_READ);
}

/* Map pages of m's file at p (MAP_FIXED or MAP_FIXED_NOREPLACE in mflags).
 * A mapping without PROT_WRITE goes through a read-only open of the file
 * when the kernel refuses it on the mapping's own descriptor (kernels
 * before 6.7 refuse any shared mapping of a descriptor open for writing
 * once the file is sealed against writing). 0 or errno. */
static int
map_file_pages(Mapping *m, char *p, Py_ssize_t length, int prot, int mflags, int64_t offset)
{
    void *q;
    int ro, err = os_map(&q, p, (size_t)length, prot, mflags, m->fd, (off_t)offset);

    if (!err || (prot & PROT_WRITE) || (err != EPERM && err != EACCES))
        return err;
    err = os_reopen_readonly(m->fd, &ro);
    if (err)
        return err;
    err = os_map(&q, p, (size_t)length, prot, mflags, ro, (off_t)offset);
    os_close(ro);
    return err;
}

/* Map fresh pages (of the file, or anonymous) at p with prot, exactly there
 * (MAP_FIXED_NOREPLACE) or over what m owns (MAP_FIXED). */
static int
map_pages(Mapping *m, char *p, Py_ssize_t length, int prot, int fixed, int64_t offset)
{
    void *q;

    if (m->fd >= 0)
        return map_file_pages(m, p, length, prot, (m->mflags & ~MAP_POPULATE) | fixed, offset);
    return os_map(&q, p, (size_t)length, prot, (m->mflags & ~MAP_POPULATE) | fixed, -1, 0);
}

int
mapping_map_file_again(Mapping *m, Py_ssize_t start, Py_ssize_t end)
{
    static const struct { int flag, advice; } kinds[] = {
        {RUN_DONTFORK, MADV_DONTFORK}, {RUN_DONTDUMP, MADV_DONTDUMP},
        {RUN_WIPEONFORK, MADV_WIPEONFORK},
    };
    PageRecord *rec = &m->rec;
    int prot0 = rec->runs[rec_find(rec, start)].prot;
    int err = map_pages(m, m->data + start, end - start, prot0, MAP_FIXED,
                        mapping_offset(m) + start);

    if (err)
        return err;
    if (m->advice)   /* best effort, as when the pages were first mapped */
        os_advise(m->data + start, (size_t)(end - start), m->advice);
    for (Py_ssize_t i = rec_find(rec, start); !err && i < rec->n && rec_start(rec, i) < end; i++) {
        Py_ssize_t lo = rec_start(rec, i), hi = rec->runs[i].end;
        lo = lo > start ? lo : start;
        hi = hi < end ? hi : end;
        if (rec->runs[i].prot != prot0)
            err = os_protect(m->data + lo, (size_t)(hi - lo), rec->runs[i].prot);
        for (size_t k = 0; !err && k < sizeof kinds / sizeof kinds[0]; k++)
            if (rec->runs[i].flags & kinds[k].flag)
                err = os_advise(m->data + lo, (size_t)(hi - lo), kinds[k].advice);
    }
    return err;
}

/* The advice of run flags, given again to fresh pages [lo, hi) of a new
 * kernel mapping; returns the flags it took (guards are never extended). */
static int
advise_like(Mapping *m, Py_ssize_t lo, Py_ssize_t hi, int flags)
{
    static const struct { int flag, advice; } kinds[] = {
        {RUN_DONTFORK, MADV_DONTFORK}, {RUN_DONTDUMP, MADV_DONTDUMP},
        {RUN_WIPEONFORK, MADV_WIPEONFORK}, {RUN_GUARD, MADV_GUARD_INSTALL},
    };
    int took = 0;

    for (size_t k = 0; k < sizeof kinds / sizeof kinds[0]; k++)
        if ((flags & kinds[k].flag)
            && os_advise(m->data + lo, (size_t)(hi - lo), kinds[k].advice) == 0)
            took |= kinds[k].flag;
    return took;
}

/* ---------------------------------------------------------------- grow, shrink */

int
mapping_drop_tail(Mapping *m, Py_ssize_t newcap)
{
    int err;

    if (m->flags & MAPPING_REPAIRABLE)
        repair_lock(m);   /* no repair maps over the pages while they go */
    err = os_unmap(m->data + newcap, (size_t)(m->capacity - newcap));
    if (!err) {
        kernel.mapped_bytes -= m->capacity - newcap;
        m->capacity = newcap;
        if (!(m->flags & MAPPING_UNTRACED))
            trace_mapped(m->data, newcap);
        rec_truncate(&m->rec, newcap);
    }
    if (m->flags & MAPPING_REPAIRABLE)
        repair_unlock(m);
    return err;
}

/* The mapping now reaches newcap (its new pages have prot and flags). */
static void
commit_growth(Mapping *m, Py_ssize_t newcap, int prot, int flags)
{
    Py_ssize_t old = m->capacity;

    rec_extend(&m->rec, newcap, prot, flags);
    kernel.mapped_bytes += newcap - old;
    m->capacity = newcap;
    if (!(m->flags & MAPPING_UNTRACED))
        trace_mapped(m->data, newcap);
    mapping_prepare(m, old, newcap);
}

static int grow_in_place(Mapping *m, Py_ssize_t newcap);

/* Pages the SIGBUS repair replaced are the file's again before a mapping of
 * a file grows or moves (the file holds them by then), so that the repaired
 * pages stay one range at the end, as the repair's table says; the slot is
 * held meanwhile (repair_done releases it). */
static int
repaired_first(Mapping *m)
{
    repair_lock(m);
    return repair_restore(m, m->capacity);
}

static int
repair_done(Mapping *m, int err)
{
    repair_unlock(m);
    return err;
}

int
mapping_grow_in_place(Mapping *m, Py_ssize_t newcap)
{
    int err;

    if (!(m->flags & MAPPING_REPAIRABLE))
        return grow_in_place(m, newcap);
    err = repaired_first(m);
    return repair_done(m, err ? err : grow_in_place(m, newcap));
}

static int
grow_in_place(Mapping *m, Py_ssize_t newcap)
{
    Py_ssize_t cap = m->capacity;
    Run last;
    int err;

    if (rec_room(&m->rec, 1) != 0)
        return ENOMEM;
    last = m->rec.runs[m->rec.n - 1];
    if (m->rec.n == 1) {
        /* one kernel mapping: extend it (its advice comes along) */
        err = os_grow_in_place(m->data, (size_t)cap, (size_t)newcap);
        if (!err) {
            commit_growth(m, newcap, last.prot, last.flags & ~RUN_GUARD);
            return 0;
        }
        if (err == ENOMEM)
            return err;   /* the next pages are taken (or the limits say no) */
    }
    /* several kernel mappings, hugetlb, or a kernel that refuses to mremap
     * this mapping: map the next pages themselves, right after it */
    err = map_pages(m, m->data + cap, newcap - cap, last.prot, MAP_FIXED_NOREPLACE,
                    mapping_offset(m) + cap);
    if (err)
        return err;
    commit_growth(m, newcap, last.prot, advise_like(m, cap, newcap, last.flags & ~RUN_GUARD));
    return 0;
}

/* ---------------------------------------------------------------- move */

int
mapping_apply_record(Mapping *m, char *p, Py_ssize_t upto, int prot0, int prot_mask)
{
    PageRecord *rec = &m->rec;
    static const struct { int flag, advice; } kinds[] = {
        {RUN_GUARD, MADV_GUARD_INSTALL}, {RUN_DONTFORK, MADV_DONTFORK},
        {RUN_DONTDUMP, MADV_DONTDUMP}, {RUN_WIPEONFORK, MADV_WIPEONFORK},
    };

    for (Py_ssize_t i = 0; i < rec->n && rec_start(rec, i) < upto; i++) {
        Py_ssize_t lo = rec_start(rec, i), hi = rec->runs[i].end < upto ? rec->runs[i].end : upto;
        int prot = rec->runs[i].prot & ~prot_mask;
        int err = prot == prot0 ? 0 : os_protect(p + lo, (size_t)(hi - lo), prot);
        for (size_t k = 0; !err && k < sizeof kinds / sizeof kinds[0]; k++)
            if (rec->runs[i].flags & kinds[k].flag)
                err = os_advise(p + lo, (size_t)(hi - lo), kinds[k].advice);
        if (err)
            return err;
    }
    return 0;
}

/* An aligned reservation of length bytes (PROT_NONE, no commit charge). */
static int
reserve(char **out, Py_ssize_t length, Py_ssize_t align)
{
    void *p;
    int err = os_map_aligned(&p, (size_t)length, (size_t)align, (size_t)kernel.page, PROT_NONE,
                             MAP_NORESERVE, -1, 0);

    if (!err)
        *out = p;
    return err;
}

/* Move by remapping: page tables move, nothing is copied. 0, or errno with
 * nothing changed. */
static int
move_by_remap(Mapping *m, Py_ssize_t newcap)
{
    char *target = NULL;
    void *p;
    int err;

    if (mapping_align(m) > natural_align(m)
        && (err = reserve(&target, newcap, mapping_align(m))) != 0)
        return err;   /* keep the alignment (THP): move into an aligned reservation */
    err = os_move(&p, m->data, (size_t)m->capacity, (size_t)newcap, target);
    if (err) {
        if (target != NULL)
            os_unmap(target, (size_t)newcap);
        return err;
    }
    trace_unmapped(m->data);   /* commit_growth traces the new place */
    m->data = p;
    commit_growth(m, newcap, m->rec.runs[0].prot, m->rec.runs[0].flags);
    return 0;
}

/* Move a mapping of a file by mapping the file again elsewhere: the pages
 * are the same pages. 0, or errno with nothing changed. */
static int
move_file_mapping(Mapping *m, Py_ssize_t newcap)
{
    Py_ssize_t cap = m->capacity;
    int prot0 = m->rec.runs[0].prot, last = m->rec.runs[m->rec.n - 1].prot, err;
    char *target, *old;

    err = reserve(&target, newcap,
                  mapping_align(m) > natural_align(m) ? mapping_align(m) : natural_align(m));
    if (err)
        return err;
    err = map_pages(m, target, newcap, prot0, MAP_FIXED, mapping_offset(m));
    if (!err)
        err = mapping_apply_record(m, target, cap, prot0, 0);
    if (!err && last != prot0)
        err = os_protect(target + cap, (size_t)(newcap - cap), last);
    if (err) {
        os_unmap(target, (size_t)newcap);
        return err;
    }
    /* the old mapping goes with the GIL held: nothing sees the region half moved */
    old = m->data;
    m->data = target;
    kernel.mapped_bytes += cap;   /* unmap_or_bury takes it off again */
    unmap_or_bury(old, cap, 0);
    commit_growth(m, newcap, last, advise_like(m, cap, newcap,
                                               m->rec.runs[m->rec.n - 1].flags & ~RUN_GUARD));
    return 0;
}

/* Move anonymous pages by copying into a new mapping made per spec (for
 * mappings mremap cannot move: several kernel mappings, hugetlb). Pages
 * that hold no data are not touched, so a reservation stays uncommitted.
 * -1 with the exception set. */
static int
move_by_copy(Mapping *m, Py_ssize_t newcap, const MapSpec *spec, const char **call)
{
    PageRecord *rec = &m->rec;
    Py_ssize_t natural = (spec->mflags & MAP_HUGETLB) ? spec->page : kernel.page;
    Py_ssize_t copy_end = round_up(m->size, kernel.page), raised = 0, oldcap = m->capacity;
    unsigned char *has = NULL;
    char *old;
    void *target;
    int err;

    if (copy_end > newcap)
        copy_end = newcap;
    /* room first: the busy count of the commit below cannot fail */
    if (rec_reserve(rec, 1) < 0 || mapping_extra(m) == NULL)
        return -1;
    *call = "mmap";
    err = os_map_aligned(&target, (size_t)newcap, (size_t)mapping_align(m), (size_t)natural, PROT_RW,
                         spec->mflags, -1, 0);
    if (err)
        return err;
    *call = "madvise";
    if (spec->advice && (err = os_advise(target, (size_t)newcap, spec->advice)) != 0)
        goto fail;
    has = PyMem_Malloc((size_t)(copy_end / kernel.page + 1));
    if (has == NULL) {
        os_unmap(target, (size_t)newcap);
        PyErr_NoMemory();
        return -1;
    }
    /* contents: run by run, only pages with data; unreadable pages become
     * readable for the copy */
    for (Py_ssize_t i = 0; i < rec->n && rec_start(rec, i) < copy_end; i++) {
        Py_ssize_t lo = rec_start(rec, i), hi = rec->runs[i].end, n;
        hi = hi < copy_end ? hi : copy_end;
        if (rec->runs[i].flags & RUN_GUARD)
            continue;
        *call = "mprotect";
        if (!(rec->runs[i].prot & PROT_READ)) {
            err = os_protect(m->data + lo, (size_t)(hi - lo), rec->runs[i].prot | PROT_READ);
            if (err)
                goto fail;
            raised = hi;
        }
        n = (hi - lo) / kernel.page;
        os_pages_with_data(m->data + lo, (size_t)(hi - lo), has);
        for (Py_ssize_t k = 0, j; k < n; k = j) {
            for (j = k; j < n && has[j] == has[k]; j++)
                ;
            if (has[k])
                memcpy((char *)target + lo + k * kernel.page, m->data + lo + k * kernel.page,
                       (size_t)((j - k) * kernel.page));
        }
    }
    /* protections and flags of the target, the last run stretched to newcap */
    err = mapping_apply_record(m, target, oldcap < newcap ? oldcap : newcap, PROT_RW, 0);
    if (!err && newcap > oldcap && rec->runs[rec->n - 1].prot != PROT_RW)
        err = os_protect((char *)target + oldcap, (size_t)(newcap - oldcap),
                         rec->runs[rec->n - 1].prot);
    if (err)
        goto fail;
    PyMem_Free(has);
    /* commit: from here nothing can fail; the mapping is whole at its new
     * place before the old pages go, since a large unmap releases the GIL
     * (busy meanwhile: another thread's shrink or move waits its turn) */
    old = m->data;
    m->data = target;
    m->mflags = spec->mflags;
    m->advice = spec->advice;
    kernel.mapped_bytes += oldcap;   /* unmap_or_bury takes it off again */
    if (newcap < oldcap) {
        kernel.mapped_bytes += newcap - oldcap;
        rec_truncate(rec, newcap);
        m->capacity = newcap;
        trace_mapped(target, newcap);
    }
    else
        commit_growth(m, newcap, rec->runs[rec->n - 1].prot, rec->runs[rec->n - 1].flags);
    mapping_busy_enter(m);   /* its extension exists: it cannot fail */
    unmap_or_bury(old, oldcap, oldcap >= SLOW_CALL_BYTES);
    mapping_busy_leave(m);
    return 0;

fail:
    PyMem_Free(has);
    for (Py_ssize_t i = 0; i < rec->n && rec_start(rec, i) < raised; i++)
        if (!(rec->runs[i].prot & PROT_READ) && !(rec->runs[i].flags & RUN_GUARD)) {
            Py_ssize_t lo = rec_start(rec, i), hi = rec->runs[i].end;
            os_protect(m->data + lo, (size_t)((hi < raised ? hi : raised) - lo), rec->runs[i].prot);
        }
    os_unmap(target, (size_t)newcap);
    return err;
}

static int move(Mapping *m, Py_ssize_t newcap, const MapSpec *spec, PyObject **backing,
                const char **call);

int
mapping_move(Mapping *m, Py_ssize_t newcap, const MapSpec *spec, PyObject **backing,
             const char **call)
{
    int err;

    if (!(m->flags & MAPPING_REPAIRABLE))
        return move(m, newcap, spec, backing, call);
    *call = "mmap";
    err = repaired_first(m);
    return repair_done(m, err ? err : move(m, newcap, spec, backing, call));
}

static int
move(Mapping *m, Py_ssize_t newcap, const MapSpec *spec, PyObject **backing, const char **call)
{
    MapSpec own = {.mflags = m->mflags, .advice = m->advice, .page = m->page};
    int err;

    if (spec == NULL)
        spec = &own;
    if (rec_reserve(&m->rec, 1) < 0)
        return -1;
    if (m->fd >= 0 && !(m->mflags & MAP_SHARED)) {
        /* a private mapping of a file holds its own copies of pages: only
         * mremap moves them (a new mapping of the file would lose them) */
        *call = "mremap";
        return m->rec.n == 1 ? move_by_remap(m, newcap) : EFAULT;
    }
    if (m->rec.n == 1 && !(m->rec.runs[0].flags & RUN_GUARD) && spec->mflags == m->mflags) {
        *call = "mremap";
        err = move_by_remap(m, newcap);
        if (err != EFAULT && err != EINVAL)
            return err;   /* moved, or refused for want of memory or address space */
    }
    if (m->fd >= 0) {
        *call = "mmap";
        return move_file_mapping(m, newcap);
    }
    err = move_by_copy(m, newcap, spec, call);
    if (err == 0 && backing != NULL && spec->backing != NULL) {
        PyObject *previous = *backing;
        *backing = Py_NewRef(spec->backing);
        Py_DECREF(previous);   /* a Backing member or None: no finalizer */
    }
    return err;
}
