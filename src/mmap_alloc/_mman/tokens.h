/* views.c and protect.c: the two tokens of a hold (included by mman.h,
 * after the mapping core they hold on). */
#ifndef MMAP_ALLOC_TOKENS_H
#define MMAP_ALLOC_TOKENS_H

/* What a View and a Pin begin with: the object that keeps the memory alive
 * and the hold on its mapping (NULL before the hold, and for pool memory). */
#define TOKEN_HEAD     \
    PyObject_HEAD      \
    PyObject *owner;   \
    Mapping *m;        \
    Hold *hold;
typedef struct {
    TOKEN_HEAD
} TokenObject;
/* A token of type (GC, not tracked yet) that holds nothing: allocated before
 * any check, since an allocation may run the collector and its finalizers,
 * which must not land between a check and the hold. Only the head is set;
 * the caller sets the rest. NULL with MemoryError. */
TokenObject *token_new(PyTypeObject *type);
/* A token's teardown: its hold ends (exactly once) and its owner goes. */
void token_release(TokenObject *t);

/* A memoryview of [start, end) of m: a hold on it for as long as the view
 * lives; owner keeps m alive. Read-only where a page lacks WRITE or writable
 * is 0; BufferError where one lacks READ. */
PyObject *view_new(PyObject *owner, Mapping *m, Py_ssize_t start, Py_ssize_t end, int writable);
/* What a view of raw memory (a pool object) exposes; its owner counts the
 * views of that memory in *counter. */
typedef struct {
    char *base;
    Py_ssize_t length;
    int writable;
    Py_ssize_t *counter;
} ViewTarget;
/* A memoryview of raw memory of owner, in the rule's order: the View
 * allocated (a collection may run finalizers), then `target`, which runs no
 * Python code, checks the owner for key (the converted arguments) and sets
 * what to expose (-1 with the exception), then the count. NULL on failure. */
PyObject *view_counted(PyObject *owner, const void *key,
                       int (*target)(PyObject *owner, const void *key, ViewTarget *t));
/* A Pin token: while it lives, a hold of kind HOLD_PIN (or a buffer kind)
 * on [start, end) of m keeps those pages mapped and in place; address is
 * what it gives (the code at the offset pinned). */
typedef struct {
    Mapping *m;
    Py_ssize_t start, end;
    int kind;
    char *address;
} PinTarget;
/* A Pin of owner, in the rule's order: offset (arg; none when NULL)
 * converted, the Pin allocated (a collection may run finalizers), then
 * `target`, which runs no Python code, checks the owner and sets what to
 * hold for offset (-1 with the exception), then the hold. NULL on failure. */
PyObject *pin_at(PyObject *owner, PyObject *arg,
                 int (*target)(PyObject *owner, Py_ssize_t offset, PinTarget *t));

#endif
