/* The kernel lock: what makes each C call of the kernel atomic on a
 * free-threaded interpreter (included by mman.h). */
#ifndef MMAP_ALLOC_KERNEL_LOCK_H
#define MMAP_ALLOC_KERNEL_LOCK_H

/* With the GIL, "no Python code between check and act" makes each C call
 * of the kernel atomic for every other thread. A free-threaded interpreter
 * (Py_GIL_DISABLED) has no GIL: there, every entry point of the kernel runs
 * inside one critical section on one process-wide object (kernel.lock), which
 * gives the same guarantee, and the same places where it lapses: a critical
 * section is suspended while its thread blocks (a system call made without
 * the GIL, a lock, a blocking call of Python code), exactly where the GIL
 * was released before, and the busy counts guard those places as they did.
 * Critical sections cannot deadlock (a blocked thread suspends its own), and
 * a fork stops the world first, so no thread holds one across it. With the
 * GIL the macros are empty: abi3 builds pay nothing.
 *
 * An entry point is the function a method, getter or slot table names,
 * tp_clear too (a free-threaded collection clears its garbage while the other
 * threads run): LOCKED_<kind>(f) defines the locked wrapper and LOCKED(f)
 * names it. */
#ifdef Py_GIL_DISABLED
/* An entry point reached from inside another (a dealloc, a buffer release,
 * Python code the kernel called) must not begin a second critical section
 * on the kernel lock: CPython 3.13's are not reentrant, so the thread would
 * block on its own lock, suspend the outer section and let every other
 * thread into the kernel in the middle of the outer call's check and act,
 * where the GIL build lets none in. The thread holds the kernel lock when
 * its innermost critical section (the active one while it runs) is the
 * kernel's: then the nested entry runs under it (CPython 3.14 makes the
 * same test itself). The low two bits of the tag are CPython's flags. */
static inline int
critical_section_holds(PyMutex *mutex)
{
    uintptr_t top = PyThreadState_GET()->critical_section;

    return top != 0 && ((PyCriticalSection *)(top & ~(uintptr_t)3))->_cs_mutex == mutex;
}
#define KERNEL_LOCK_HELD() critical_section_holds(&kernel.lock->ob_mutex)
#define KERNEL_LOCK()                                  \
    {                                                  \
        PyCriticalSection kernel_cs_;                  \
        int kernel_nested_ = KERNEL_LOCK_HELD();       \
        if (!kernel_nested_)                           \
            PyCriticalSection_Begin(&kernel_cs_, kernel.lock)
#define KERNEL_UNLOCK()                        \
        if (!kernel_nested_)                   \
            PyCriticalSection_End(&kernel_cs_); \
    }
#define LOCKED(f) f##_locked
#define LOCKED_WRAPPER(f, ret, params, args, body)                      \
    static ret f##_locked params                                         \
    {                                                                    \
        ret r;                                                           \
        KERNEL_LOCK();                                                   \
        r = f args;                                                      \
        KERNEL_UNLOCK();                                                 \
        return r;                                                        \
    }
#define LOCKED_VOID_WRAPPER(f, params, args)                            \
    static void f##_locked params                                        \
    {                                                                    \
        KERNEL_LOCK();                                                   \
        f args;                                                          \
        KERNEL_UNLOCK();                                                 \
    }
#define LOCKED_O(f) LOCKED_WRAPPER(f, PyObject *, (PyObject *s, PyObject *a), ((void *)s, a), )
#define LOCKED_FAST(f)                                                                  \
    LOCKED_WRAPPER(f, PyObject *, (PyObject *s, PyObject *const *a, Py_ssize_t n),      \
                   ((void *)s, a, n), )
#define LOCKED_FASTKW(f)                                                                \
    LOCKED_WRAPPER(f, PyObject *,                                                       \
                   (PyObject *s, PyObject *const *a, Py_ssize_t n, PyObject *k),        \
                   ((void *)s, a, n, k), )
#define LOCKED_GET(f) LOCKED_WRAPPER(f, PyObject *, (PyObject *s, void *c), ((void *)s, c), )
#define LOCKED_UNARY(f) LOCKED_WRAPPER(f, PyObject *, (PyObject *s), ((void *)s), )
#define LOCKED_BINARY(f) LOCKED_O(f)
#define LOCKED_LEN(f) LOCKED_WRAPPER(f, Py_ssize_t, (PyObject *s), ((void *)s), )
#define LOCKED_INQUIRY(f) LOCKED_WRAPPER(f, int, (PyObject *s), ((void *)s), )
#define LOCKED_CONTAINS(f) LOCKED_WRAPPER(f, int, (PyObject *s, PyObject *a), ((void *)s, a), )
#define LOCKED_ASS(f)                                                                   \
    LOCKED_WRAPPER(f, int, (PyObject *s, PyObject *k, PyObject *v), ((void *)s, k, v), )
#define LOCKED_GETBUF(f)                                                                \
    LOCKED_WRAPPER(f, int, (PyObject *s, Py_buffer *b, int fl), ((void *)s, b, fl), )
#define LOCKED_RELBUF(f) LOCKED_VOID_WRAPPER(f, (PyObject *s, Py_buffer *b), ((void *)s, b))
/* A dealloc untracks its object before it may wait for the kernel lock:
 * a thread that waits detaches, a collection may run meanwhile, and it
 * would take a tracked object that nothing refers to for garbage and free
 * it a second time (CPython's rule: untrack before anything that can let
 * another thread run). */
#define LOCKED_DEALLOC(f)                        \
    static void f##_locked(PyObject *s)          \
    {                                            \
        if (PyType_IS_GC(Py_TYPE(s)))            \
            PyObject_GC_UnTrack(s);              \
        KERNEL_LOCK();                           \
        f((void *)s);                            \
        KERNEL_UNLOCK();                         \
    }
#else
#define KERNEL_LOCK()
#define KERNEL_UNLOCK()
#define LOCKED(f) f
#define LOCKED_O(f)
#define LOCKED_FAST(f)
#define LOCKED_FASTKW(f)
#define LOCKED_GET(f)
#define LOCKED_UNARY(f)
#define LOCKED_BINARY(f)
#define LOCKED_LEN(f)
#define LOCKED_INQUIRY(f)
#define LOCKED_CONTAINS(f)
#define LOCKED_ASS(f)
#define LOCKED_GETBUF(f)
#define LOCKED_RELBUF(f)
#define LOCKED_DEALLOC(f)
#endif

#endif
