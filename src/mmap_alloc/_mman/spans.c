/*
 * The free-span allocator of a code heap: byte ranges [0, capacity) handed
 * out as extents, a bump pointer `top` and, below it, a sorted list of free
 * spans that coalesce. Pure data: nothing here calls Python (but for the
 * MemoryError of spans_reserve) or the kernel.
 */
#include "spans.h"

static Py_ssize_t
align_up(Py_ssize_t n, Py_ssize_t align)
{
    return (n + align - 1) & ~(align - 1);
}

void
spans_init(SpanList *l, Py_ssize_t capacity)
{
    PyMem_Free(l->spans);
    l->spans = NULL;
    l->n = l->cap = 0;
    l->top = 0;
    l->capacity = capacity;
}

/* Free spans lie below top, between live extents, and the last one ends at
 * a live extent (else top would have come down): at most one span per live
 * extent, plus one. Reserved when an extent is taken, so that giving one
 * back never needs memory. */
int
spans_reserve(SpanList *l, Py_ssize_t extents)
{
    return reserve_items((void **)&l->spans, &l->cap, extents + 1, 16, sizeof(Span));
}

Py_ssize_t
spans_find(const SpanList *l, Py_ssize_t n, Py_ssize_t align, Py_ssize_t *span)
{
    Py_ssize_t at;

    for (Py_ssize_t i = 0; i < l->n; i++) {   /* first fit */
        at = align_up(l->spans[i].start, align);
        if (at <= l->spans[i].end && l->spans[i].end - at >= n) {
            *span = i;
            return at;
        }
    }
    *span = -1;
    at = align_up(l->top, align);
    if (at > l->capacity || l->capacity - at < n)
        return -1;
    return at;
}

void
spans_take(SpanList *l, Py_ssize_t span, Py_ssize_t at, Py_ssize_t n)
{
    Span s;
    int before, after;

    if (span < 0) {
        /* above top: alignment padding becomes a free span */
        if (at > l->top) {
            if (l->n > 0 && l->spans[l->n - 1].end == l->top)
                l->spans[l->n - 1].end = at;
            else
                l->spans[l->n++] = (Span){l->top, at};
        }
        l->top = at + n;
        return;
    }
    s = l->spans[span];
    before = at > s.start;
    after = at + n < s.end;
    if (before && after) {
        memmove(&l->spans[span + 2], &l->spans[span + 1],
                (size_t)(l->n - span - 1) * sizeof(Span));
        l->spans[span].end = at;
        l->spans[span + 1] = (Span){at + n, s.end};
        l->n++;
    }
    else if (before)
        l->spans[span].end = at;
    else if (after)
        l->spans[span].start = at + n;
    else {
        memmove(&l->spans[span], &l->spans[span + 1], (size_t)(l->n - span - 1) * sizeof(Span));
        l->n--;
    }
}

void
spans_give(SpanList *l, Py_ssize_t start, Py_ssize_t n)
{
    Py_ssize_t end = start + n, lo = 0, hi = l->n;
    int join_prev, join_next;

    if (end == l->top) {
        l->top = start;
        if (l->n > 0 && l->spans[l->n - 1].end == l->top)
            l->top = l->spans[--l->n].start;
        return;
    }
    while (lo < hi) {   /* the first span starting after start */
        Py_ssize_t mid = (lo + hi) / 2;
        if (l->spans[mid].start < start)
            lo = mid + 1;
        else
            hi = mid;
    }
    join_prev = lo > 0 && l->spans[lo - 1].end == start;
    join_next = lo < l->n && l->spans[lo].start == end;
    if (join_prev && join_next) {
        l->spans[lo - 1].end = l->spans[lo].end;
        memmove(&l->spans[lo], &l->spans[lo + 1], (size_t)(l->n - lo - 1) * sizeof(Span));
        l->n--;
    }
    else if (join_prev)
        l->spans[lo - 1].end = end;
    else if (join_next)
        l->spans[lo].start = start;
    else {
        memmove(&l->spans[lo + 1], &l->spans[lo], (size_t)(l->n - lo) * sizeof(Span));
        l->spans[lo] = (Span){start, end};
        l->n++;
    }
}

Py_ssize_t
spans_largest(const SpanList *l)
{
    Py_ssize_t largest = l->capacity - l->top;

    for (Py_ssize_t i = 0; i < l->n; i++)
        if (l->spans[i].end - l->spans[i].start > largest)
            largest = l->spans[i].end - l->spans[i].start;
    return largest;
}
