/*
 * CodeBlock: a range of a code heap (codeheap.c), written through the heap's
 * read/write view, run from its read/exec view; its writer views and the
 * pins of its functions are holds on the heap's mapping.
 */
#include "codeheap.h"

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
    PyObject *data, *offset_obj;
    Py_ssize_t offset = 0;
    Py_buffer buf;
    CodeHeapObject *heap;

    /* conversions first: __index__ may run Python code */
    if (parse_data_offset(args, nargs, kwnames, "write", &data, &offset_obj) < 0
        || (offset_obj != NULL && arg_ssize(offset_obj, "offset", &offset) < 0)
        || arg_buffer(data, "data", &buf, PyBUF_SIMPLE) < 0)
        return NULL;
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
    store_code(heap->m.data + self->start + offset, buf.buf, buf.len);
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
    Hold *h;

    if (block_check_live(self) < 0 || heap_check_not_forked(self->heap) < 0)
        return NULL;
    /* view_new allocates (a collection may run finalizers): a hold of our own
     * across it keeps anything from freeing the block meanwhile */
    h = mapping_hold(&self->heap->m, self->start, self->start + self->extent, HOLD_PIN);
    if (h == NULL)
        return NULL;
    view = view_new((PyObject *)self, &self->heap->m, self->start, self->start + self->size, 1);
    mapping_unhold(&self->heap->m, h);
    return view;
}

/* what _pin(offset) holds: the block's range, for its code at offset */
static int
block_code_target(PyObject *owner, Py_ssize_t offset, PinTarget *t)
{
    CodeBlockObject *self = (CodeBlockObject *)owner;

    if (block_check_live(self) < 0)
        return -1;
    if (offset >= self->size) {
        PyErr_Format(PyExc_ValueError, "offset %zd lies outside the block (size %zd)", offset,
                     self->size);
        return -1;
    }
    *t = (PinTarget){&self->heap->m, self->start, self->start + self->extent, HOLD_PIN,
                     self->heap->rx + self->start + offset};
    return 0;
}

/* _pin(offset) -> Pin: from now until the token dies the block keeps its
 * range (no free, no heap close); its code may still be rewritten */
static PyObject *
block_pin(CodeBlockObject *self, PyObject *arg)
{
    return pin_at((PyObject *)self, arg, block_code_target);
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
block_get_closed(CodeBlockObject *self, void *closure)
{
    return PyBool_FromLong(self->heap == NULL || self->start < 0);
}

static PyObject *
block_get_heap(CodeBlockObject *self, void *closure)
{
    return Py_NewRef(self->heap != NULL ? (PyObject *)self->heap : Py_None);
}

/* (buffers, pins) on the block: (0, 0) once it is freed */
static void
held(CodeBlockObject *self, Py_ssize_t *buffers, Py_ssize_t *pins)
{
    *buffers = *pins = 0;
    if (self->heap != NULL && self->start >= 0)
        block_holds(self, buffers, pins);
}

static PyObject *
block_get_pins(CodeBlockObject *self, void *closure)
{
    Py_ssize_t buffers, pins;

    held(self, &buffers, &pins);
    return PyLong_FromSsize_t(pins);
}

static PyObject *
block_get_exports(CodeBlockObject *self, void *closure)
{
    Py_ssize_t buffers, pins;

    held(self, &buffers, &pins);
    return PyLong_FromSsize_t(buffers);
}

MADE_BY(block_new, "blocks are made by CodeHeap.alloc()")

ONE_REF_TRAVERSE(block, CodeBlockObject, heap)

static int
block_teardown(PyObject *obj)
{
    CodeBlockObject *self = (CodeBlockObject *)obj;

    /* pins and exports hold the block: none is left, the range goes back */
    if (self->heap != NULL && self->start >= 0 && self->heap->state == HEAP_OPEN)
        block_release(self);
    Py_CLEAR(self->heap);
    return 0;
}

KERNEL_DEALLOC(block_dealloc, block_teardown)

/* entry points: under the kernel lock in free-threaded builds (mman.h) */
LOCKED_FASTKW(block_write)
LOCKED_O(block_close)
LOCKED_O(block_view)
LOCKED_FAST(block_sync)
LOCKED_O(block_pin)

static PyMethodDef block_methods[] = {
    METHOD_FASTKW("write", block_write,
        "write($self, /, data, offset=0)\n--\n\n"
        "Store data (bytes-like) at offset of the block through the heap's read/write\n"
        "view, then make it visible to instruction fetch in the read/exec view (cache\n"
        "maintenance, and membarrier SYNC_CORE for other threads, on arm64). Allowed\n"
        "while functions of the block live. A write of 1, 2, 4 or 8 bytes at a\n"
        "multiple of its size is one atomic store."),
    METHOD_NOARGS("close", block_close,
        "close($self, /)\n--\n\n"
        "Free the block (as heap.free(block)); closing a freed block does nothing."),
    METHOD_NOARGS("_view", block_view,
        "_view() -> memoryview of the block in the read/write view (exports the block)."),
    METHOD_FAST("_sync", block_sync,
        "_sync(offset, length): make bytes written through a view visible to instruction fetch."),
    METHOD_O("_pin", block_pin, "_pin(offset) -> Pin: pin the block for code at offset."),
    {NULL, NULL, 0, NULL},
};

/* entry points: under the kernel lock in free-threaded builds (mman.h) */
LOCKED_GET(block_get_address)
LOCKED_GET(block_get_offset)
LOCKED_GET(block_get_closed)
LOCKED_GET(block_get_heap)
LOCKED_GET(block_get_pins)
LOCKED_GET(block_get_exports)
LOCKED_GET(field_get)

static PyGetSetDef block_getset[] = {
    {"address", (getter)LOCKED(block_get_address), NULL,
     "Where the block's code runs (in the heap's read/exec view).", NULL},
    {"offset", (getter)LOCKED(block_get_offset), NULL, "The block's offset in its heap.", NULL},
    FIELD_GETSET("size", CodeBlockObject, size, GET_SSIZE, "Bytes asked for."),
    {"closed", (getter)LOCKED(block_get_closed), NULL, "True once the block is freed.", NULL},
    {"heap", (getter)LOCKED(block_get_heap), NULL, "The heap the block belongs to.", NULL},
    {"_pins", (getter)LOCKED(block_get_pins), NULL, "Live functions (pins).", NULL},
    {"_exports", (getter)LOCKED(block_get_exports), NULL, "Live writer buffers.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyType_Slot block_slots[] = {
    {Py_tp_doc, "The kernel of CodeBlock: a range of a code heap, its pins and exports."},
    {Py_tp_new, block_new},
    LIFE_SLOTS(block),
    {Py_tp_methods, block_methods},
    {Py_tp_getset, block_getset},
    {0, NULL},
};

PyType_Spec block_spec
    = KERNEL_SPEC("CodeBlock", CodeBlockObject, Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC, block_slots);


/* ------------------------------------------------------------------ */

