/* spans.c: the free-span allocator of a code heap (pure data), included by
 * codeheap.h. */
#ifndef MMAP_ALLOC_SPANS_H
#define MMAP_ALLOC_SPANS_H

#include "mman.h"

typedef struct {
    Py_ssize_t start, end;
} Span;

typedef struct {
    Span *spans;            /* free spans below top: sorted, coalesced */
    Py_ssize_t n, cap;
    Py_ssize_t top;         /* [top, capacity) is free */
    Py_ssize_t capacity;
} SpanList;

/* Empty, over [0, capacity) (what it held is freed). */
void spans_init(SpanList *l, Py_ssize_t capacity);
/* Room for the spans any state with `extents` live extents can have. */
int spans_reserve(SpanList *l, Py_ssize_t extents);
/* Where an extent of n bytes aligned to align fits: first fit among the
 * spans (*span its index), else above top (*span -1); -1 when none does. */
Py_ssize_t spans_find(const SpanList *l, Py_ssize_t n, Py_ssize_t align, Py_ssize_t *span);
/* Take [at, at + n) as spans_find found it (room reserved for one more span). */
void spans_take(SpanList *l, Py_ssize_t span, Py_ssize_t at, Py_ssize_t n);
/* Give [start, start + n) back: coalesce, or lower top. Never fails. */
void spans_give(SpanList *l, Py_ssize_t start, Py_ssize_t n);
Py_ssize_t spans_largest(const SpanList *l);

#endif
