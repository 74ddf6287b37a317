/*
 * CodeHeap's kernel: one memfd mapped twice, blocks, pins (issue: JIT code memory).
 *
 * A heap owns one memfd of `capacity` bytes mapped twice with MAP_SHARED: a
 * read/write view (rw) that code is written through and a read/exec view
 * (rx) that code runs from. No page is writable and executable at once in
 * either view, and no mprotect is needed to patch code.
 *
 * Blocks are byte ranges of the heap (a bump pointer `top` and, below it, a
 * sorted list of free spans that coalesce). A block object owns its range
 * until it is freed (heap.free, block.close, or its deallocation). While a
 * block has pins (functions from block.function(): the Pin tokens they
 * hold) or exports (memoryviews from block.writer()), it cannot be freed and
 * the heap cannot be closed: both would let code or buffers outlive memory.
 * Code may be patched while pinned: writes go through the rw view.
 *
 * Each transition is one call here: alloc a block, free a block, pin, export,
 * write (+ instruction cache maintenance), close the heap. Objects that may
 * start a garbage collection are allocated before the checks.
 */
#include "mman.h"

#include <fcntl.h>
#include <sys/syscall.h>

/* Block extents are multiples of this, and start at multiples of it. */
#define GRANULE 16

#define HEAP_NEW 0       /* made, not opened */
#define HEAP_OPEN 1
#define HEAP_CLOSED 2

typedef struct {
    Py_ssize_t start, end;
} Span;

typedef struct CodeBlockObject CodeBlockObject;

typedef struct {
    PyObject_HEAD
    char *rx;                   /* the read/exec view; NULL unless open */
    char *rw;                   /* the read/write view of the same pages */
    Py_ssize_t capacity;        /* bytes of the memfd, of each view */
    Py_ssize_t top;             /* [top, capacity) is free */
    Span *spans;                /* free spans below top: sorted, coalesced */
    Py_ssize_t nspans, capspans;
    Py_ssize_t nblocks;         /* live blocks */
    Py_ssize_t used;            /* bytes of their extents */
    CodeBlockObject *first;     /* the live blocks (borrowed: each holds the heap) */
    unsigned long gen;          /* the fork generation the heap was opened in */
    int state;                  /* HEAP_* */
    int sync;                   /* membarrier SYNC_CORE registered (arm64) */
    PyTypeObject *block_type;   /* the type of the blocks alloc makes */
} CodeHeapObject;

struct CodeBlockObject {
    PyObject_HEAD
    CodeHeapObject *heap;       /* strong; NULL until placed */
    CodeBlockObject *next, *prev;   /* in heap->first's list while live */
    Py_ssize_t start;           /* offset in the heap; -1 when not live */
    Py_ssize_t size;            /* bytes asked for */
    Py_ssize_t extent;          /* bytes reserved: size rounded up to GRANULE */
    Py_ssize_t pins;            /* live Pin tokens */
    Py_ssize_t exports;         /* live writer views (the View type's counter) */
};

static PyTypeObject *CodeHeap_Type = NULL;
static PyTypeObject *CodeBlock_Type = NULL;

/* ------------------------------------------------------------------ */
/* instruction fetch                                                   */

#if defined(__aarch64__) || defined(__arm__) || defined(__riscv)
#define NEEDS_SYNC_CORE 1
#else
#define NEEDS_SYNC_CORE 0
#endif

/* MEMBARRIER_CMD_PRIVATE_EXPEDITED_SYNC_CORE and its registration */
#define MEMBARRIER_SYNC_CORE 32
#define MEMBARRIER_REGISTER_SYNC_CORE 64

static int
register_sync_core(void)
{
#if NEEDS_SYNC_CORE
    static int registered = 0;
    if (!registered && syscall(SYS_membarrier, MEMBARRIER_REGISTER_SYNC_CORE, 0, 0) == 0)
        registered = 1;
    return registered;
#else
    return 1;   /* x86: instruction fetch is coherent with stores */
#endif
}

/* After bytes [off, off + n) changed: make the r-x view's instruction fetch
 * see them, on this thread (cache maintenance by address, which needs the
 * address readable: the r-x view is) and on every other thread of the
 * process (membarrier SYNC_CORE serialises their instruction streams). */
static void
make_coherent(CodeHeapObject *heap, Py_ssize_t off, Py_ssize_t n)
{
    if (n <= 0)
        return;
    __builtin___clear_cache(heap->rx + off, heap->rx + off + n);
#if NEEDS_SYNC_CORE
    if (heap->sync)
        syscall(SYS_membarrier, MEMBARRIER_SYNC_CORE, 0, 0);
#endif
}

/* ------------------------------------------------------------------ */
/* errors and checks                                                   */

static int
heap_check_open(CodeHeapObject *heap)
{
    if (heap->state != HEAP_OPEN) {
        PyErr_SetString(PyExc_ValueError, heap->state == HEAP_NEW ? "the code heap is not open"
                                                                   : "the code heap is closed");
        return -1;
    }
    return 0;
}

/* The heap's pages are shared with the parent after fork(): writing them in
 * the child would change the parent's code under it. */
static int
heap_check_not_forked(CodeHeapObject *heap)
{
    if (heap->gen != fork_generation) {
        PyErr_SetString(PyExc_RuntimeError,
                        "the code heap was made before fork(): its pages are shared with the "
                        "parent process, so allocating or writing here would change the "
                        "parent's code; make a new CodeHeap in this process");
        return -1;
    }
    return 0;
}

static int
block_check_live(CodeBlockObject *block)
{
    if (block->heap == NULL || block->start < 0) {
        PyErr_SetString(PyExc_ValueError,
                        block->heap != NULL && block->heap->state == HEAP_CLOSED
                            ? "the block's code heap is closed"
                            : "the block is freed");
        return -1;
    }
    return 0;
}

static int
is_block(PyObject *o)
{
    return CodeBlock_Type != NULL && PyObject_TypeCheck(o, CodeBlock_Type);
}

/* ------------------------------------------------------------------ */
/* the free list                                                       */

/* Room for the spans any state with `blocks` live blocks can have. Free
 * spans lie below top, between live blocks, and the last one ends at a live
 * block (else top would have come down): at most one span per live block.
 * Reserved at alloc, so that a free never needs memory. */
static int
spans_reserve(CodeHeapObject *heap, Py_ssize_t blocks)
{
    Py_ssize_t need = blocks + 1;
    Span *s;

    if (need <= heap->capspans)
        return 0;
    if (need < 16)
        need = 16;
    if (need < heap->capspans * 2)
        need = heap->capspans * 2;
    s = PyMem_Realloc(heap->spans, (size_t)need * sizeof(Span));
    if (s == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    heap->spans = s;
    heap->capspans = need;
    return 0;
}

static Py_ssize_t
align_up(Py_ssize_t n, Py_ssize_t align)
{
    return (n + align - 1) & ~(align - 1);
}

/* Where an extent of n bytes aligned to align fits: first fit among the
 * spans, else above top; -1 when the heap has no room. */
static Py_ssize_t
spans_find(CodeHeapObject *heap, Py_ssize_t n, Py_ssize_t align, Py_ssize_t *span)
{
    Py_ssize_t at;

    for (Py_ssize_t i = 0; i < heap->nspans; i++) {
        at = align_up(heap->spans[i].start, align);
        if (at <= heap->spans[i].end && heap->spans[i].end - at >= n) {
            *span = i;
            return at;
        }
    }
    *span = -1;
    at = align_up(heap->top, align);
    if (at > heap->capacity || heap->capacity - at < n)
        return -1;
    return at;
}

/* Take [at, at + n) (from spans_find; needs room for one more span). */
static void
spans_take(CodeHeapObject *heap, Py_ssize_t span, Py_ssize_t at, Py_ssize_t n)
{
    if (span < 0) {
        /* above top: alignment padding becomes a free span */
        if (at > heap->top) {
            if (heap->nspans > 0 && heap->spans[heap->nspans - 1].end == heap->top)
                heap->spans[heap->nspans - 1].end = at;
            else {
                heap->spans[heap->nspans].start = heap->top;
                heap->spans[heap->nspans].end = at;
                heap->nspans++;
            }
        }
        heap->top = at + n;
        return;
    }
    {
        Span s = heap->spans[span];
        int before = at > s.start, after = at + n < s.end;
        if (before && after) {
            memmove(&heap->spans[span + 2], &heap->spans[span + 1],
                    (size_t)(heap->nspans - span - 1) * sizeof(Span));
            heap->spans[span].end = at;
            heap->spans[span + 1].start = at + n;
            heap->spans[span + 1].end = s.end;
            heap->nspans++;
        }
        else if (before)
            heap->spans[span].end = at;
        else if (after)
            heap->spans[span].start = at + n;
        else {
            memmove(&heap->spans[span], &heap->spans[span + 1],
                    (size_t)(heap->nspans - span - 1) * sizeof(Span));
            heap->nspans--;
        }
    }
}

/* Give [start, start + n) back: coalesce, or lower top. Never fails. */
static void
spans_give(CodeHeapObject *heap, Py_ssize_t start, Py_ssize_t n)
{
    Py_ssize_t end = start + n, lo = 0, hi = heap->nspans;

    if (end == heap->top) {
        heap->top = start;
        if (heap->nspans > 0 && heap->spans[heap->nspans - 1].end == heap->top) {
            heap->top = heap->spans[heap->nspans - 1].start;
            heap->nspans--;
        }
        return;
    }
    while (lo < hi) {   /* the first span starting after start */
        Py_ssize_t mid = (lo + hi) / 2;
        if (heap->spans[mid].start < start)
            lo = mid + 1;
        else
            hi = mid;
    }
    {
        int join_prev = lo > 0 && heap->spans[lo - 1].end == start;
        int join_next = lo < heap->nspans && heap->spans[lo].start == end;
        if (join_prev && join_next) {
            heap->spans[lo - 1].end = heap->spans[lo].end;
            memmove(&heap->spans[lo], &heap->spans[lo + 1],
                    (size_t)(heap->nspans - lo - 1) * sizeof(Span));
            heap->nspans--;
        }
        else if (join_prev)
            heap->spans[lo - 1].end = end;
        else if (join_next)
            heap->spans[lo].start = start;
        else {
            memmove(&heap->spans[lo + 1], &heap->spans[lo],
                    (size_t)(heap->nspans - lo) * sizeof(Span));
            heap->spans[lo].start = start;
            heap->spans[lo].end = end;
            heap->nspans++;
        }
    }
}

static void
block_link(CodeHeapObject *heap, CodeBlockObject *block)
{
    block->prev = NULL;
    block->next = heap->first;
    if (heap->first != NULL)
        heap->first->prev = block;
    heap->first = block;
    heap->nblocks++;
    heap->used += block->extent;
}

static void
block_unlink(CodeHeapObject *heap, CodeBlockObject *block)
{
    if (block->prev != NULL)
        block->prev->next = block->next;
    else
        heap->first = block->next;
    if (block->next != NULL)
        block->next->prev = block->prev;
    block->next = block->prev = NULL;
    heap->nblocks--;
    heap->used -= block->extent;
}

/* Return a live block's range to its open heap (zeroed) and mark it freed.
 * In a child after fork() the pages are the parent's too: only the child's
 * bookkeeping changes, the parent's code is left alone. */
static void
block_release(CodeBlockObject *block)
{
    CodeHeapObject *heap = block->heap;

    if (heap->gen == fork_generation)
        memset(heap->rw + block->start, 0, (size_t)block->extent);
    spans_give(heap, block->start, block->extent);
    block_unlink(heap, block);
    block->start = -1;
}

/* The checks of freeing a block, then the free. */
static int
block_free(CodeBlockObject *block, const char *what)
{
    if (block_check_live(block) < 0)
        return -1;
    if (block->pins > 0) {
        PyErr_Format(PyExc_BufferError,
                     "cannot %s: %zd function(s) made by block.function() run code in it; "
                     "delete them first", what, block->pins);
        return -1;
    }
    if (block->exports > 0) {
        PyErr_Format(PyExc_BufferError,
                     "cannot %s: %zd buffer(s) from block.writer() are alive; release them "
                     "first", what, block->exports);
        return -1;
    }
    block_release(block);
    return 0;
}

/* ------------------------------------------------------------------ */
/* CodeHeap                                                            */

static void
heap_unmap(CodeHeapObject *heap)
{
    char *rx = heap->rx, *rw = heap->rw;

    heap->rx = heap->rw = NULL;   /* cleared before munmap */
    heap->state = HEAP_CLOSED;
    if (rx != NULL)
        unmap_or_bury(rx, heap->capacity, 0);   /* shared pages: freed when the memfd closes */
    if (rw != NULL)
        unmap_or_bury(rw, heap->capacity, 0);
    PyMem_Free(heap->spans);
    heap->spans = NULL;
    heap->nspans = heap->capspans = 0;
    heap->top = 0;
}

/* _open(capacity, memfd_flags, name, address, block_type): make the memfd,
 * size it, map it read/write anywhere and read/exec at address (0: anywhere;
 * else MAP_FIXED_NOREPLACE there, never replacing a mapping). OSError(errno,
 * strerror, step) names the step the kernel refused: "memfd_create",
 * "ftruncate", "mmap rw", "mmap rx"; EEXIST: address is taken; EADDRNOTAVAIL:
 * the kernel put the mapping elsewhere (MAP_FIXED_NOREPLACE unknown to it). */
static PyObject *
heap_open(CodeHeapObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_ssize_t capacity;
    int flags, fd, err;
    const char *name;
    void *address;
    char *rw, *rx;

    if (check_nargs("_open", nargs, 5, 5) < 0 || arg_ssize(args[0], "capacity", &capacity) < 0
        || arg_int(args[1], &flags) < 0 || arg_address(args[3], &address) < 0)
        return NULL;
    name = PyUnicode_AsUTF8AndSize(args[2], NULL);
    if (name == NULL)
        return NULL;
    if (!PyType_Check(args[4]) || !PyType_IsSubtype((PyTypeObject *)args[4], CodeBlock_Type)) {
        PyErr_SetString(PyExc_TypeError, "block_type must be a subclass of CodeBlock");
        return NULL;
    }
    if (capacity <= 0 || capacity % system_page || ((uintptr_t)address % (uintptr_t)system_page)) {
        PyErr_SetString(PyExc_ValueError, "bad code heap parameters");
        return NULL;
    }
    if (self->state != HEAP_NEW) {
        PyErr_SetString(PyExc_ValueError, "the code heap is open already");
        return NULL;
    }
    fd = memfd_open(name, (unsigned int)flags);
    if (fd < 0)
        return raise_step_error(errno, "memfd_create");
    if (ftruncate(fd, (off_t)capacity) != 0) {
        err = errno;
        close(fd);
        return raise_step_error(err, "ftruncate");
    }
    /* the read/exec view first: at address, before the other view could take it */
    rx = mmap(address, (size_t)capacity, PROT_READ | PROT_EXEC,
              MAP_SHARED | (address != NULL ? MAP_FIXED_NOREPLACE : 0), fd, 0);
    if (rx != MAP_FAILED && address != NULL && rx != (char *)address) {
        munmap(rx, (size_t)capacity);   /* a kernel before 4.17: the flag was a hint */
        rx = MAP_FAILED;
        errno = EADDRNOTAVAIL;
    }
    if (rx == MAP_FAILED) {
        err = errno;
        close(fd);
        return raise_step_error(err, "mmap rx");
    }
    rw = mmap(NULL, (size_t)capacity, PROT_RW, MAP_SHARED, fd, 0);
    err = errno;
    close(fd);   /* the mappings keep the file */
    if (rw == MAP_FAILED) {
        munmap(rx, (size_t)capacity);
        return raise_step_error(err, "mmap rw");
    }
    self->rw = rw;
    self->rx = rx;
    self->capacity = capacity;
    self->top = 0;
    self->gen = fork_generation;
    self->state = HEAP_OPEN;
    self->sync = register_sync_core();
    {
        PyTypeObject *old = self->block_type;
        self->block_type = (PyTypeObject *)Py_NewRef(args[4]);
        Py_XDECREF((PyObject *)old);
    }
    mapped_bytes += 2 * capacity;
    Py_RETURN_NONE;
}

/* _alloc(size, align) -> block: a block of size bytes at a multiple of align
 * (a power of two, at most the page size); AllocError when no run fits. */
static PyObject *
heap_alloc(CodeHeapObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_ssize_t size, align, extent, at, span;
    CodeBlockObject *block;
    allocfunc alloc;

    if (check_nargs("_alloc", nargs, 2, 2) < 0 || arg_ssize(args[0], "size", &size) < 0
        || arg_ssize(args[1], "align", &align) < 0)
        return NULL;
    if (size <= 0 || align <= 0 || (align & (align - 1)) || align > system_page) {
        PyErr_SetString(PyExc_ValueError, "bad block parameters");
        return NULL;
    }
    if (self->state == HEAP_NEW) {
        PyErr_SetString(PyExc_ValueError, "the code heap is not open");
        return NULL;
    }
    /* the object first: its allocation may run the garbage collector */
    alloc = (allocfunc)PyType_GetSlot(self->block_type, Py_tp_alloc);
    block = (CodeBlockObject *)alloc(self->block_type, 0);
    if (block == NULL)
        return NULL;
    block->start = -1;
    if (heap_check_open(self) < 0 || heap_check_not_forked(self) < 0)
        goto fail;
    if (align < GRANULE)
        align = GRANULE;
    if (size > self->capacity) {
        raise_alloc_error(ENOMEM, size, "a block of %zd bytes does not fit in a code heap of "
                          "%zd bytes", size, self->capacity);
        goto fail;
    }
    extent = align_up(size, GRANULE);
    at = spans_find(self, extent, align, &span);
    if (at < 0) {
        raise_alloc_error(ENOMEM, size, "the code heap is full: no free run of %zd bytes "
                          "aligned to %zd (%zd of %zd bytes in %zd live block(s))", extent,
                          align, self->used, self->capacity, self->nblocks);
        goto fail;
    }
    if (spans_reserve(self, self->nblocks + 1) < 0)
        goto fail;
    spans_take(self, span, at, extent);
    block->heap = (CodeHeapObject *)Py_NewRef((PyObject *)self);
    block->start = at;
    block->size = size;
    block->extent = extent;
    block_link(self, block);
    return (PyObject *)block;
fail:
    Py_DECREF(block);
    return NULL;
}

/* free(block): give the block back; BufferError while it is pinned or exported */
static PyObject *
heap_free(CodeHeapObject *self, PyObject *arg)
{
    CodeBlockObject *block = (CodeBlockObject *)arg;

    if (!is_block(arg)) {
        PyObject *name = PyType_GetName(Py_TYPE(arg));
        if (name != NULL) {
            PyErr_Format(PyExc_TypeError, "expected a CodeBlock, not %U", name);
            Py_DECREF(name);
        }
        return NULL;
    }
    if (block->heap != self) {
        PyErr_SetString(PyExc_ValueError, "the block belongs to another code heap");
        return NULL;
    }
    if (block->start < 0 && self->state == HEAP_OPEN) {
        PyErr_SetString(PyExc_ValueError, "the block was already freed");
        return NULL;
    }
    if (block_free(block, "free the block") < 0)
        return NULL;
    Py_RETURN_NONE;
}

/* close(): unmap both views; the live blocks become freed. BufferError
 * (nothing changed) while any block is pinned or exported. */
static PyObject *
heap_close(CodeHeapObject *self, PyObject *unused)
{
    Py_ssize_t pinned = 0, exported = 0;

    if (self->state != HEAP_OPEN) {
        self->state = HEAP_CLOSED;
        Py_RETURN_NONE;
    }
    for (CodeBlockObject *b = self->first; b != NULL; b = b->next) {
        pinned += b->pins > 0;
        exported += b->exports > 0;
    }
    if (pinned) {
        PyErr_Format(PyExc_BufferError,
                     "cannot close the code heap: functions made by block.function() run "
                     "code in %zd of its blocks; delete them first", pinned);
        return NULL;
    }
    if (exported) {
        PyErr_Format(PyExc_BufferError,
                     "cannot close the code heap: buffers from block.writer() of %zd of its "
                     "blocks are alive; release them first", exported);
        return NULL;
    }
    while (self->first != NULL) {
        CodeBlockObject *b = self->first;
        block_unlink(self, b);
        b->start = -1;
    }
    heap_unmap(self);
    Py_RETURN_NONE;
}

/* _stats() -> (capacity, used, blocks, free spans, largest free run, pinned
 * blocks, exported blocks) */
static PyObject *
heap_stats(CodeHeapObject *self, PyObject *unused)
{
    Py_ssize_t largest = 0, pinned = 0, exported = 0;

    if (heap_check_open(self) < 0)
        return NULL;
    largest = self->capacity - self->top;
    for (Py_ssize_t i = 0; i < self->nspans; i++)
        if (self->spans[i].end - self->spans[i].start > largest)
            largest = self->spans[i].end - self->spans[i].start;
    for (CodeBlockObject *b = self->first; b != NULL; b = b->next) {
        pinned += b->pins > 0;
        exported += b->exports > 0;
    }
    return Py_BuildValue("(nnnnnnn)", self->capacity, self->used, self->nblocks, self->nspans,
                         largest, pinned, exported);
}

/* _spans() -> [(start, end)]: the free spans and [top, capacity) (for tests) */
static PyObject *
heap_spans(CodeHeapObject *self, PyObject *unused)
{
    PyObject *list;

    if (heap_check_open(self) < 0)
        return NULL;
    list = PyList_New(0);
    for (Py_ssize_t i = 0; list != NULL && i <= self->nspans; i++) {
        Py_ssize_t lo = i < self->nspans ? self->spans[i].start : self->top;
        Py_ssize_t hi = i < self->nspans ? self->spans[i].end : self->capacity;
        PyObject *item;
        if (lo == hi)
            continue;
        item = Py_BuildValue("(nn)", lo, hi);
        if (item == NULL || PyList_Append(list, item) < 0) {
            Py_XDECREF(item);
            Py_CLEAR(list);
            break;
        }
        Py_DECREF(item);
    }
    return list;
}

static PyObject *
heap_get_address(CodeHeapObject *self, void *closure)
{
    if (heap_check_open(self) < 0)
        return NULL;
    return PyLong_FromVoidPtr(self->rx);
}

static PyObject *
heap_get_writable_address(CodeHeapObject *self, void *closure)
{
    if (heap_check_open(self) < 0)
        return NULL;
    return PyLong_FromVoidPtr(self->rw);
}

static PyObject *
heap_get_capacity(CodeHeapObject *self, void *closure)
{
    return PyLong_FromSsize_t(self->capacity);
}

static PyObject *
heap_get_closed(CodeHeapObject *self, void *closure)
{
    return PyBool_FromLong(self->state != HEAP_OPEN);
}

static PyObject *
heap_get_sync(CodeHeapObject *self, void *closure)
{
    return PyBool_FromLong(self->sync);
}

static int
heap_traverse(CodeHeapObject *self, visitproc visit, void *arg)
{
    Py_VISIT(self->block_type);
    Py_VISIT(Py_TYPE((PyObject *)self));
    return 0;
}

static int
heap_clear(CodeHeapObject *self)
{
    Py_CLEAR(self->block_type);
    return 0;
}

static void
heap_dealloc(CodeHeapObject *self)
{
    PyTypeObject *tp = Py_TYPE((PyObject *)self);
    freefunc tp_free = (freefunc)PyType_GetSlot(tp, Py_tp_free);

    PyObject_GC_UnTrack(self);
    /* every live block holds the heap: none is left here */
    while (self->first != NULL) {
        CodeBlockObject *b = self->first;
        block_unlink(self, b);
        b->start = -1;
    }
    if (self->state == HEAP_OPEN)
        heap_unmap(self);
    PyMem_Free(self->spans);
    self->spans = NULL;
    heap_clear(self);
    tp_free(self);
    Py_DECREF(tp);
}

static PyMethodDef heap_methods[] = {
    {"_open", (PyCFunction)(void (*)(void))heap_open, METH_FASTCALL,
     "_open(capacity, memfd_flags, name, address, block_type): map the memfd twice."},
    {"_alloc", (PyCFunction)(void (*)(void))heap_alloc, METH_FASTCALL,
     "_alloc(size, align) -> block"},
    {"free", (PyCFunction)heap_free, METH_O,
     "free($self, block, /)\n--\n\n"
     "Give the block back to the heap (its bytes are zeroed). BufferError, nothing\n"
     "changed, while a function from block.function() or a buffer from\n"
     "block.writer() lives."},
    {"close", (PyCFunction)heap_close, METH_NOARGS,
     "close($self, /)\n--\n\n"
     "Unmap both views; every block is freed. BufferError, nothing changed, while\n"
     "any block is pinned by a function or exported by a writer. Closing a closed\n"
     "heap does nothing."},
    {"_stats", (PyCFunction)heap_stats, METH_NOARGS,
     "_stats() -> (capacity, used, blocks, spans, largest_free, pinned, exported)"},
    {"_spans", (PyCFunction)heap_spans, METH_NOARGS,
     "_spans() -> [(start, end)]: the free runs, the one above the bump pointer last."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef heap_getset[] = {
    {"address", (getter)heap_get_address, NULL,
     "Start of the read/exec view: where the heap's code runs.", NULL},
    {"_writable_address", (getter)heap_get_writable_address, NULL,
     "Start of the read/write view (never executable).", NULL},
    {"capacity", (getter)heap_get_capacity, NULL, "Bytes of the heap (of each view).", NULL},
    {"closed", (getter)heap_get_closed, NULL, "True unless the heap is open.", NULL},
    {"_sync", (getter)heap_get_sync, NULL,
     "Whether writes serialise other threads' instruction fetch (membarrier).", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyType_Slot heap_slots[] = {
    {Py_tp_doc, "The kernel of CodeHeap: one memfd mapped read/write and read/exec."},
    {Py_tp_new, PyType_GenericNew},
    {Py_tp_dealloc, heap_dealloc},
    {Py_tp_traverse, heap_traverse},
    {Py_tp_clear, heap_clear},
    {Py_tp_methods, heap_methods},
    {Py_tp_getset, heap_getset},
    {0, NULL},
};

static PyType_Spec heap_spec = {
    .name = "mmap_alloc._mman.CodeHeap",
    .basicsize = sizeof(CodeHeapObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .slots = heap_slots,
};

/* ------------------------------------------------------------------ */
/* CodeBlock                                                           */

/* Store n bytes at dst. A store of 1, 2, 4 or 8 bytes at a multiple of its
 * size is one atomic store: a thread running the code meanwhile sees the old
 * or the new bytes, never a mix of them. */
static void
store_code(char *dst, const char *src, Py_ssize_t n)
{
    uintptr_t a = (uintptr_t)dst;

    if (n == 8 && a % 8 == 0) {
        uint64_t v;
        memcpy(&v, src, 8);
        __atomic_store_n((uint64_t *)dst, v, __ATOMIC_RELEASE);
    }
    else if (n == 4 && a % 4 == 0) {
        uint32_t v;
        memcpy(&v, src, 4);
        __atomic_store_n((uint32_t *)dst, v, __ATOMIC_RELEASE);
    }
    else if (n == 2 && a % 2 == 0) {
        uint16_t v;
        memcpy(&v, src, 2);
        __atomic_store_n((uint16_t *)dst, v, __ATOMIC_RELEASE);
    }
    else if (n == 1)
        __atomic_store_n((uint8_t *)dst, (uint8_t)*src, __ATOMIC_RELEASE);
    else
        memmove(dst, src, (size_t)n);
}

/* write(data, offset=0): store data at offset of the block through the
 * read/write view, then make the read/exec view's instruction fetch see it */
static PyObject *
block_write(CodeBlockObject *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    Py_ssize_t nkw = kwnames == NULL ? 0 : PyTuple_Size(kwnames);
    PyObject *data = NULL, *offset_obj = NULL;
    Py_ssize_t offset = 0;
    Py_buffer buf;
    CodeHeapObject *heap;

    if (nargs > 2) {
        PyErr_Format(PyExc_TypeError, "write() takes at most 2 arguments (%zd given)", nargs);
        return NULL;
    }
    if (nargs >= 1)
        data = args[0];
    if (nargs == 2)
        offset_obj = args[1];
    for (Py_ssize_t k = 0; k < nkw; k++) {
        PyObject *key = PyTuple_GetItem(kwnames, k);
        PyObject **slot = NULL;
        if (PyUnicode_CompareWithASCIIString(key, "data") == 0)
            slot = &data;
        else if (PyUnicode_CompareWithASCIIString(key, "offset") == 0)
            slot = &offset_obj;
        if (slot == NULL) {
            PyErr_Format(PyExc_TypeError, "write() got an unexpected keyword argument %R", key);
            return NULL;
        }
        if (*slot != NULL) {
            PyErr_Format(PyExc_TypeError, "write() got multiple values for argument %R", key);
            return NULL;
        }
        *slot = args[nargs + k];
    }
    if (data == NULL) {
        PyErr_SetString(PyExc_TypeError, "write() missing required argument 'data'");
        return NULL;
    }
    /* conversions first: __index__ may run Python code */
    if (offset_obj != NULL && arg_ssize(offset_obj, "offset", &offset) < 0)
        return NULL;
    if (PyObject_GetBuffer(data, &buf, PyBUF_SIMPLE) < 0) {
        if (PyErr_ExceptionMatches(PyExc_TypeError)) {
            PyObject *name = PyType_GetName(Py_TYPE(data));
            PyErr_Clear();
            if (name != NULL) {
                PyErr_Format(PyExc_TypeError, "data must be a bytes-like object, not %U", name);
                Py_DECREF(name);
            }
        }
        return NULL;
    }
    if (block_check_live(self) < 0)
        goto fail;
    heap = self->heap;
    if (heap_check_not_forked(heap) < 0)
        goto fail;
    if (offset > self->size || buf.len > self->size - offset) {
        PyErr_Format(PyExc_ValueError,
                     "%zd bytes at offset %zd do not fit in the block's %zd bytes", buf.len,
                     offset, self->size);
        goto fail;
    }
    store_code(heap->rw + self->start + offset, buf.buf, buf.len);
    make_coherent(heap, self->start + offset, buf.len);
    PyBuffer_Release(&buf);
    Py_RETURN_NONE;
fail:
    PyBuffer_Release(&buf);
    return NULL;
}

/* _sync(offset, length): instruction cache maintenance for bytes written
 * through a writer view */
static PyObject *
block_sync(CodeBlockObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_ssize_t offset, length;

    if (check_nargs("_sync", nargs, 2, 2) < 0 || arg_ssize(args[0], "offset", &offset) < 0
        || arg_ssize(args[1], "length", &length) < 0 || block_check_live(self) < 0)
        return NULL;
    if (offset > self->size || length > self->size - offset) {
        PyErr_SetString(PyExc_ValueError, "the range lies outside the block");
        return NULL;
    }
    make_coherent(self->heap, self->start + offset, length);
    Py_RETURN_NONE;
}

/* _view() -> memoryview of the block's bytes in the read/write view; the
 * block cannot be freed, nor its heap closed, while it lives */
static PyObject *
block_view(CodeBlockObject *self, PyObject *unused)
{
    PyObject *view;

    if (block_check_live(self) < 0 || heap_check_not_forked(self->heap) < 0)
        return NULL;
    /* view_new allocates (a collection may run finalizers): hold an export of
     * our own across it, so that nothing can free the block meanwhile */
    self->exports++;
    view = view_new((PyObject *)self, NULL, self->heap->rw + self->start, 0, self->size, 1,
                    &self->exports);
    self->exports--;
    return view;
}

/* _pin(offset) -> Pin: from now until the token dies the block keeps its
 * range (no free, no heap close); its code may still be rewritten */
static PyObject *
block_pin(CodeBlockObject *self, PyObject *arg)
{
    Py_ssize_t offset;
    PinObject *pin;

    if (arg_ssize(arg, "offset", &offset) < 0)
        return NULL;
    pin = pin_alloc();
    if (pin == NULL)
        return NULL;
    if (block_check_live(self) < 0)
        goto fail;
    if (offset >= self->size) {
        PyErr_Format(PyExc_ValueError, "offset %zd lies outside the block (size %zd)", offset,
                     self->size);
        goto fail;
    }
    return pin_attach(pin, (PyObject *)self, &self->pins,
                      self->heap->rx + self->start + offset);
fail:
    Py_DECREF(pin);
    return NULL;
}

/* close(): free the block; closing a freed block does nothing */
static PyObject *
block_close(CodeBlockObject *self, PyObject *unused)
{
    if (self->heap == NULL || self->start < 0)
        Py_RETURN_NONE;
    if (block_free(self, "close the block") < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *
block_get_address(CodeBlockObject *self, void *closure)
{
    if (block_check_live(self) < 0)
        return NULL;
    return PyLong_FromVoidPtr(self->heap->rx + self->start);
}

static PyObject *
block_get_offset(CodeBlockObject *self, void *closure)
{
    if (block_check_live(self) < 0)
        return NULL;
    return PyLong_FromSsize_t(self->start);
}

static PyObject *
block_get_size(CodeBlockObject *self, void *closure)
{
    return PyLong_FromSsize_t(self->size);
}

static PyObject *
block_get_closed(CodeBlockObject *self, void *closure)
{
    return PyBool_FromLong(self->heap == NULL || self->start < 0);
}

static PyObject *
block_get_heap(CodeBlockObject *self, void *closure)
{
    return Py_NewRef(self->heap != NULL ? (PyObject *)self->heap : Py_None);
}

static PyObject *
block_get_pins(CodeBlockObject *self, void *closure)
{
    return PyLong_FromSsize_t(self->pins);
}

static PyObject *
block_get_exports(CodeBlockObject *self, void *closure)
{
    return PyLong_FromSsize_t(self->exports);
}

static PyObject *
block_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    PyErr_SetString(PyExc_TypeError, "blocks are made by CodeHeap.alloc()");
    return NULL;
}

static int
block_traverse(CodeBlockObject *self, visitproc visit, void *arg)
{
    Py_VISIT(self->heap);
    Py_VISIT(Py_TYPE((PyObject *)self));
    return 0;
}

static void
block_dealloc(CodeBlockObject *self)
{
    PyTypeObject *tp = Py_TYPE((PyObject *)self);
    freefunc tp_free = (freefunc)PyType_GetSlot(tp, Py_tp_free);
    CodeHeapObject *heap = self->heap;

    PyObject_GC_UnTrack(self);
    /* pins and exports hold the block: none is left, the range goes back */
    if (heap != NULL && self->start >= 0 && heap->state == HEAP_OPEN)
        block_release(self);
    self->heap = NULL;
    tp_free(self);
    Py_XDECREF((PyObject *)heap);
    Py_DECREF(tp);
}

static PyMethodDef block_methods[] = {
    {"write", (PyCFunction)(void (*)(void))block_write, METH_FASTCALL | METH_KEYWORDS,
     "write($self, /, data, offset=0)\n--\n\n"
     "Store data (bytes-like) at offset of the block through the heap's read/write\n"
     "view, then make it visible to instruction fetch in the read/exec view (cache\n"
     "maintenance, and membarrier SYNC_CORE for other threads, on arm64). Allowed\n"
     "while functions of the block live. A write of 1, 2, 4 or 8 bytes at a\n"
     "multiple of its size is one atomic store."},
    {"close", (PyCFunction)block_close, METH_NOARGS,
     "close($self, /)\n--\n\n"
     "Free the block (as heap.free(block)); closing a freed block does nothing."},
    {"_view", (PyCFunction)block_view, METH_NOARGS,
     "_view() -> memoryview of the block in the read/write view (exports the block)."},
    {"_sync", (PyCFunction)(void (*)(void))block_sync, METH_FASTCALL,
     "_sync(offset, length): make bytes written through a view visible to instruction fetch."},
    {"_pin", (PyCFunction)block_pin, METH_O,
     "_pin(offset) -> Pin: pin the block for code at offset."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef block_getset[] = {
    {"address", (getter)block_get_address, NULL,
     "Where the block's code runs (in the heap's read/exec view).", NULL},
    {"offset", (getter)block_get_offset, NULL, "The block's offset in its heap.", NULL},
    {"size", (getter)block_get_size, NULL, "Bytes asked for.", NULL},
    {"closed", (getter)block_get_closed, NULL, "True once the block is freed.", NULL},
    {"heap", (getter)block_get_heap, NULL, "The heap the block belongs to.", NULL},
    {"_pins", (getter)block_get_pins, NULL, "Live functions (pins).", NULL},
    {"_exports", (getter)block_get_exports, NULL, "Live writer buffers.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyType_Slot block_slots[] = {
    {Py_tp_doc, "The kernel of CodeBlock: a range of a code heap, its pins and exports."},
    {Py_tp_new, block_new},
    {Py_tp_dealloc, block_dealloc},
    {Py_tp_traverse, block_traverse},
    {Py_tp_methods, block_methods},
    {Py_tp_getset, block_getset},
    {0, NULL},
};

static PyType_Spec block_spec = {
    .name = "mmap_alloc._mman.CodeBlock",
    .basicsize = sizeof(CodeBlockObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .slots = block_slots,
};


/* ------------------------------------------------------------------ */

int
codeheap_init(PyObject *module)
{
    PyObject *types[2];
    PyType_Spec *specs[2] = {&heap_spec, &block_spec};
    const char *names[2] = {"CodeHeap", "CodeBlock"};

    for (int i = 0; i < 2; i++) {
        types[i] = PyType_FromModuleAndSpec(module, specs[i], NULL);
        if (types[i] == NULL)
            return -1;
        if (PyModule_AddObjectRef(module, names[i], types[i]) < 0) {
            Py_DECREF(types[i]);
            return -1;
        }
    }
    /* the module holds them for the life of the process, as Region_Type */
    CodeHeap_Type = (PyTypeObject *)types[0];
    CodeBlock_Type = (PyTypeObject *)types[1];
    return 0;
}
