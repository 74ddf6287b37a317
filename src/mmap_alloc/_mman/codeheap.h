/*
 * The code heap extension's shared declarations (codeheap.c: the heap and
 * the life of its blocks; codeblock.c: the CodeBlock type). The design is at
 * the head of codeheap.c.
 */
#ifndef MMAP_ALLOC_CODEHEAP_H
#define MMAP_ALLOC_CODEHEAP_H

#include "mman.h"
#include "spans.h"

/* Block extents are multiples of this, and start at multiples of it. */
#define GRANULE 16

#define HEAP_NEW 0       /* made, not opened */
#define HEAP_OPEN 1
#define HEAP_CLOSED 2

typedef struct CodeBlockObject CodeBlockObject;

typedef struct {
    PyObject_HEAD
    Mapping m;                  /* the read/write view of the memfd */
    char *rx;                   /* the read/exec view of the same pages; NULL unless open */
    SpanList spans;             /* where blocks are */
    Py_ssize_t nblocks;         /* live blocks */
    Py_ssize_t used;            /* bytes of their extents */
    CodeBlockObject *first;     /* the live blocks (borrowed: each holds the heap) */
    int state;                  /* HEAP_* */
    int sync;                   /* other threads' instruction fetch is serialised (arm64) */
    PyTypeObject *block_type;   /* the type of the blocks alloc makes */
} CodeHeapObject;

struct CodeBlockObject {
    PyObject_HEAD
    CodeHeapObject *heap;       /* strong; NULL until placed */
    CodeBlockObject *next, *prev;   /* in heap->first's list while live */
    Py_ssize_t start;           /* offset in the heap; -1 when not live */
    Py_ssize_t size;            /* bytes asked for */
    Py_ssize_t extent;          /* bytes reserved: size rounded up to GRANULE */
};

extern PyType_Spec block_spec;

/* After bytes [off, off + n) of the heap changed: instruction fetch in the
 * read/exec view sees them, on every thread. */
void make_coherent(CodeHeapObject *heap, Py_ssize_t off, Py_ssize_t n);
int heap_check_open(CodeHeapObject *heap);
/* RuntimeError in a forked child: the pages are the parent's code too. */
int heap_check_not_forked(CodeHeapObject *heap);
int block_check_live(CodeBlockObject *block);
int is_block(PyObject *o);
void block_link(CodeHeapObject *heap, CodeBlockObject *block);
void block_unlink(CodeHeapObject *heap, CodeBlockObject *block);
/* Return a live block's range to its open heap (zeroed) and mark it freed. */
void block_release(CodeBlockObject *block);
/* The holds on a live block's range: writer buffers and pins. */
void block_holds(CodeBlockObject *block, Py_ssize_t *buffers, Py_ssize_t *pins);
/* The checks of freeing a block (BufferError while held), then the free. */
int block_free(CodeBlockObject *block, const char *what);

#endif
