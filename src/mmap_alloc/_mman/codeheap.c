/*
 * The code heap extension of the mapping core: CodeHeap's kernel, one
 * memfd mapped twice with MAP_SHARED: a read/write view (the core's
 * mapping: its record, and every hold on the heap) that code is written
 * through, and a read/exec view (rx) that code runs from. No page is
 * writable and executable at once in either view, and no mprotect is needed
 * to patch code.
 *
 * Blocks are byte ranges of the heap, placed by the free-span allocator
 * (spans.c). A block object owns its range until it is freed (heap.free,
 * block.close, or its deallocation). Functions from block.function() (Pin
 * tokens) and buffers from block.writer() (views) are holds on the block's
 * range of the heap's mapping: while one lives the block cannot be freed
 * and the heap cannot be closed, since both would let code or buffers
 * outlive memory. Code may be patched while pinned: writes go through the
 * read/write view.
 *
 * Each transition is one call here: alloc a block, free a block, pin,
 * export, write (+ instruction cache maintenance), close the heap. Objects
 * that may start a garbage collection are allocated before the checks.
 */
#include "codeheap.h"

/* After bytes [off, off + n) changed: make the r-x view's instruction fetch
 * see them, on this thread (cache maintenance by address, which needs the
 * address readable: the r-x view is) and on every other thread of the
 * process (membarrier SYNC_CORE serialises their instruction streams). */
void
make_coherent(CodeHeapObject *heap, Py_ssize_t off, Py_ssize_t n)
{
    if (n <= 0)
        return;
    os_flush_icache(heap->rx + off, (size_t)n);
    if (heap->sync)
        os_sync_core();
}

/* ------------------------------------------------------------------ */
/* errors and checks                                                   */

int
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
int
heap_check_not_forked(CodeHeapObject *heap)
{
    if (heap->m.gen != kernel.fork_generation) {
        PyErr_SetString(PyExc_RuntimeError,
                        "the code heap was made before fork(): its pages are shared with the "
                        "parent process, so allocating or writing here would change the "
                        "parent's code; make a new CodeHeap in this process");
        return -1;
    }
    return 0;
}

int
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

int
is_block(PyObject *o)
{
    return kernel.block_type != NULL && PyObject_TypeCheck(o, kernel.block_type);
}

void
block_link(CodeHeapObject *heap, CodeBlockObject *block)
{
    LIST_PUSH(heap->first, block);
    heap->nblocks++;
    heap->used += block->extent;
}

void
block_unlink(CodeHeapObject *heap, CodeBlockObject *block)
{
    LIST_UNLINK(heap->first, block);
    heap->nblocks--;
    heap->used -= block->extent;
}

/* Return a live block's range to its open heap (zeroed) and mark it freed.
 * In a child after fork() the pages are the parent's too: only the child's
 * bookkeeping changes, the parent's code is left alone. */
void
block_release(CodeBlockObject *block)
{
    CodeHeapObject *heap = block->heap;

    if (heap->m.gen == kernel.fork_generation)
        memset(heap->m.data + block->start, 0, (size_t)block->extent);
    spans_give(&heap->spans, block->start, block->extent);
    block_unlink(heap, block);
    block->start = -1;
}

/* The holds on a live block's range: writer buffers and pins. */
void
block_holds(CodeBlockObject *block, Py_ssize_t *buffers, Py_ssize_t *pins)
{
    mapping_holds_in(&block->heap->m, block->start, block->start + block->extent, buffers, pins);
}

/* The checks of freeing a block, then the free. */
int
block_free(CodeBlockObject *block, const char *what)
{
    Py_ssize_t buffers, pins;

    if (block_check_live(block) < 0)
        return -1;
    block_holds(block, &buffers, &pins);
    if (pins > 0) {
        PyErr_Format(PyExc_BufferError,
                     "cannot %s: %zd function(s) made by block.function() run code in it; "
                     "delete them first", what, pins);
        return -1;
    }
    if (buffers > 0) {
        PyErr_Format(PyExc_BufferError,
                     "cannot %s: %zd buffer(s) from block.writer() are alive; release them "
                     "first", what, buffers);
        return -1;
    }
    block_release(block);
    return 0;
}

/* ------------------------------------------------------------------ */
/* CodeHeap                                                            */

/* Unmap both views (the pointers cleared first); every block is freed. */
static void
heap_unmap(CodeHeapObject *heap)
{
    char *rx = heap->rx;

    while (heap->first != NULL) {
        CodeBlockObject *b = heap->first;
        block_unlink(heap, b);
        b->start = -1;
    }
    heap->rx = NULL;
    heap->state = HEAP_CLOSED;
    mapping_release(&heap->m);   /* shared pages: freed when the memfd's last mapping goes */
    if (rx != NULL)
        unmap_or_bury(rx, heap->spans.capacity, 0);
    spans_init(&heap->spans, heap->spans.capacity);   /* the capacity stays, for repr */
}

/* Make the memfd, size it, map it read/exec at address (NULL: anywhere;
 * else exactly there, never replacing a mapping) and read/write anywhere;
 * 0 or errno with *call the step the kernel refused. */
static int
map_views(CodeHeapObject *self, Py_ssize_t capacity, unsigned int flags, const char *name,
          char *address, const char **call)
{
    MapSpec spec = {PROT_RW, MAP_SHARED, 0, 0, kernel.page, kernel.page, NULL};
    void *rw, *rx;
    int fd, err;

    *call = "memfd_create";
    if ((err = os_memfd(&fd, name, flags)) != 0)
        return err;
    *call = "ftruncate";
    err = os_file_truncate(fd, capacity);
    /* the read/exec view first: at address, before the other view could take it */
    if (!err) {
        *call = "mmap rx";
        err = os_map(&rx, address, (size_t)capacity, PROT_READ | PROT_EXEC,
                     MAP_SHARED | (address != NULL ? MAP_FIXED_NOREPLACE : 0), fd, 0);
    }
    if (!err) {
        *call = "mmap rw";
        err = os_map(&rw, NULL, (size_t)capacity, PROT_RW, MAP_SHARED, fd, 0);
        if (err)
            os_unmap(rx, (size_t)capacity);
    }
    os_close(fd);   /* the mappings keep the file */
    if (err)
        return err;
    mapping_init(&self->m, rw, capacity, capacity, &spec, -1);
    self->m.flags |= MAPPING_SHARED;   /* zeroing writes: the pages are the memfd's */
    self->rx = rx;
    return 0;
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
    int flags, err;
    const char *name, *call;
    void *address;

    if (check_nargs("_open", nargs, 5, 5) < 0 || arg_ssize(args[0], "capacity", &capacity) < 0
        || arg_int(args[1], "memfd_flags", &flags) < 0 || arg_address(args[3], &address) < 0)
        return NULL;
    name = PyUnicode_AsUTF8AndSize(args[2], NULL);
    if (name == NULL)
        return NULL;
    if (!PyType_Check(args[4]) || !PyType_IsSubtype((PyTypeObject *)args[4], kernel.block_type)) {
        PyErr_SetString(PyExc_TypeError, "block_type must be a subclass of CodeBlock");
        return NULL;
    }
    if (capacity <= 0 || capacity % kernel.page || ((uintptr_t)address % (uintptr_t)kernel.page)) {
        PyErr_SetString(PyExc_ValueError, "bad code heap parameters");
        return NULL;
    }
    if (self->state != HEAP_NEW) {
        PyErr_SetString(PyExc_ValueError, "the code heap is open already");
        return NULL;
    }
    err = map_views(self, capacity, (unsigned int)flags, name, address, &call);
    if (err)
        return raise_os_error(err, call);
    spans_init(&self->spans, capacity);
    self->state = HEAP_OPEN;
    self->sync = os_sync_core_ready();
    REPLACE_REF(self->block_type, (PyTypeObject *)Py_NewRef(args[4]));
    kernel.mapped_bytes += 2 * capacity;
    trace_mapped(self->m.data, capacity);   /* the pages once: rx is a view of them */
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
    if (size <= 0 || align <= 0 || (align & (align - 1)) || align > kernel.page) {
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
    if (size > self->spans.capacity) {
        raise_alloc_error(ENOMEM, size, "a block of %zd bytes does not fit in a code heap of "
                          "%zd bytes", size, self->spans.capacity);
        goto fail;
    }
    extent = (size + GRANULE - 1) & ~(Py_ssize_t)(GRANULE - 1);
    at = spans_find(&self->spans, extent, align, &span);
    if (at < 0) {
        raise_alloc_error(ENOMEM, size, "the code heap is full: no free run of %zd bytes "
                          "aligned to %zd (%zd of %zd bytes in %zd live block(s))", extent,
                          align, self->used, self->spans.capacity, self->nblocks);
        goto fail;
    }
    if (spans_reserve(&self->spans, self->nblocks + 1) < 0)
        goto fail;
    spans_take(&self->spans, span, at, extent);
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

    if (!is_block(arg))
        return raise_wrong_type(arg, "expected a CodeBlock");
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

/* How many live blocks are pinned, and how many exported. */
static void
count_held_blocks(CodeHeapObject *self, Py_ssize_t *pinned, Py_ssize_t *exported)
{
    *pinned = *exported = 0;
    for (CodeBlockObject *b = self->first; b != NULL; b = b->next) {
        Py_ssize_t buffers, pins;
        block_holds(b, &buffers, &pins);
        *pinned += pins > 0;
        *exported += buffers > 0;
    }
}

/* close(): unmap both views; the live blocks become freed. BufferError
 * (nothing changed) while any block is pinned or exported. */
static PyObject *
heap_close(CodeHeapObject *self, PyObject *unused)
{
    Py_ssize_t pinned, exported;

    if (self->state != HEAP_OPEN) {
        self->state = HEAP_CLOSED;
        Py_RETURN_NONE;
    }
    count_held_blocks(self, &pinned, &exported);
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
    heap_unmap(self);
    Py_RETURN_NONE;
}

/* _stats() -> (capacity, used, blocks, free spans, largest free run, pinned
 * blocks, exported blocks) */
static PyObject *
heap_stats(CodeHeapObject *self, PyObject *unused)
{
    Py_ssize_t pinned, exported;

    if (heap_check_open(self) < 0)
        return NULL;
    count_held_blocks(self, &pinned, &exported);
    return Py_BuildValue("(nnnnnnn)", self->spans.capacity, self->used, self->nblocks,
                         self->spans.n, spans_largest(&self->spans), pinned, exported);
}

/* _spans() -> [(start, end)]: the free spans and [top, capacity) (for tests) */
static PyObject *
heap_spans(CodeHeapObject *self, PyObject *unused)
{
    SpanList *l = &self->spans;
    Py_ssize_t n;
    Span *spans;
    PyObject *list;

    if (heap_check_open(self) < 0)
        return NULL;
    /* copied first: a collection the list starts may use the heap */
    n = l->n + 1;
    spans = PyMem_Malloc((size_t)n * sizeof(Span));
    if (spans == NULL)
        return PyErr_NoMemory();
    memcpy(spans, l->spans, (size_t)l->n * sizeof(Span));
    spans[n - 1] = (Span){l->top, l->capacity};
    list = PyList_New(0);
    for (Py_ssize_t i = 0; list != NULL && i < n; i++)
        if (spans[i].start != spans[i].end
            && list_append_new(list, Py_BuildValue("(nn)", spans[i].start, spans[i].end)) < 0)
            Py_CLEAR(list);
    PyMem_Free(spans);
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
    return PyLong_FromVoidPtr(self->m.data);
}

static PyObject *
heap_get_closed(CodeHeapObject *self, void *closure)
{
    return PyBool_FromLong(self->state != HEAP_OPEN);
}

ONE_REF_TRAVERSE(heap, CodeHeapObject, block_type)
ONE_REF_CLEAR(heap, CodeHeapObject, block_type)

static int
heap_teardown(PyObject *obj)
{
    CodeHeapObject *self = (CodeHeapObject *)obj;

    /* every live block holds the heap: none is left here */
    if (self->state == HEAP_OPEN)
        heap_unmap(self);
    PyMem_Free(self->spans.spans);
    self->spans.spans = NULL;
    mapping_free_extra(&self->m);
    return heap_clear(obj);
}

KERNEL_DEALLOC(heap_dealloc, heap_teardown)

/* entry points: under the kernel lock in free-threaded builds (mman.h) */
LOCKED_FAST(heap_open)
LOCKED_FAST(heap_alloc)
LOCKED_O(heap_free)
LOCKED_O(heap_close)
LOCKED_O(heap_stats)
LOCKED_O(heap_spans)

static PyMethodDef heap_methods[] = {
    METHOD_FAST("_open", heap_open,
        "_open(capacity, memfd_flags, name, address, block_type): map the memfd twice."),
    METHOD_FAST("_alloc", heap_alloc, "_alloc(size, align) -> block"),
    METHOD_O("free", heap_free,
        "free($self, block, /)\n--\n\n"
        "Give the block back to the heap (its bytes are zeroed). BufferError, nothing\n"
        "changed, while a function from block.function() or a buffer from\n"
        "block.writer() lives."),
    METHOD_NOARGS("close", heap_close,
        "close($self, /)\n--\n\n"
        "Unmap both views; every block is freed. BufferError, nothing changed, while\n"
        "any block is pinned by a function or exported by a writer. Closing a closed\n"
        "heap does nothing."),
    METHOD_NOARGS("_stats", heap_stats,
        "_stats() -> (capacity, used, blocks, spans, largest_free, pinned, exported)"),
    METHOD_NOARGS("_spans", heap_spans,
        "_spans() -> [(start, end)]: the free runs, the one above the bump pointer last."),
    {NULL, NULL, 0, NULL},
};

/* entry points: under the kernel lock in free-threaded builds (mman.h) */
LOCKED_GET(heap_get_address)
LOCKED_GET(heap_get_writable_address)
LOCKED_GET(heap_get_closed)
LOCKED_GET(field_get)

static PyGetSetDef heap_getset[] = {
    {"address", (getter)LOCKED(heap_get_address), NULL,
     "Start of the read/exec view: where the heap's code runs.", NULL},
    {"_writable_address", (getter)LOCKED(heap_get_writable_address), NULL,
     "Start of the read/write view (never executable).", NULL},
    FIELD_GETSET("capacity", CodeHeapObject, spans.capacity, GET_SSIZE,
                 "Bytes of the heap (of each view)."),
    {"closed", (getter)LOCKED(heap_get_closed), NULL, "True unless the heap is open.", NULL},
    FIELD_GETSET("_sync", CodeHeapObject, sync, GET_BOOL,
                 "Whether writes serialise other threads' instruction fetch (membarrier)."),
    {NULL, NULL, NULL, NULL, NULL},
};

LOCKED_INQUIRY(heap_clear)
static PyType_Slot heap_slots[] = {
    {Py_tp_doc, "The kernel of CodeHeap: one memfd mapped read/write and read/exec."},
    {Py_tp_new, PyType_GenericNew},
    GC_SLOTS(heap),
    {Py_tp_methods, heap_methods},
    {Py_tp_getset, heap_getset},
    {0, NULL},
};

static PyType_Spec heap_spec
    = KERNEL_SPEC("CodeHeap", CodeHeapObject, Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC, heap_slots);

int
codeheap_init(PyObject *module)
{
    REPLACE_REF(kernel.heap_type,
               (PyTypeObject *)PyType_FromModuleAndSpec(module, &heap_spec, NULL));
    if (kernel.heap_type == NULL
        || PyModule_AddObjectRef(module, "CodeHeap", (PyObject *)kernel.heap_type) < 0)
        return -1;
    REPLACE_REF(kernel.block_type,
               (PyTypeObject *)PyType_FromModuleAndSpec(module, &block_spec, NULL));
    if (kernel.block_type == NULL
        || PyModule_AddObjectRef(module, "CodeBlock", (PyObject *)kernel.block_type) < 0)
        return -1;
    return 0;
}
