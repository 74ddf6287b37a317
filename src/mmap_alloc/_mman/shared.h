/*
 * The shared extension's shared declarations (shared.c: making, attaching,
 * seals, the descriptor; shared_size.c: resize, refresh, discard and the
 * peers of a file), which the file extension (files.c) uses too. The rules
 * are at the head of shared.c.
 */
#ifndef MMAP_ALLOC_SHARED_H
#define MMAP_ALLOC_SHARED_H

#include "mman.h"

static inline int
is_hugetlb(const Mapping *m)
{
    return m->page > kernel.page;
}

/* The region argument: an open shared region; NULL with an exception. */
RegionObject *shared_arg(PyObject *o);
/* Allocate or punch file blocks (a punch gives pages back) without the GIL
 * for large ranges (m, if given, marked busy meanwhile); 0 or the errno. */
int back_range(Mapping *m, int fd, int punch, Py_ssize_t offset, Py_ssize_t length);
int file_size(int fd, Py_ssize_t *size);
/* The checks every change of the file makes: 0, or -1 with an exception. */
int file_state(RegionObject *self, Py_ssize_t *fsize, int *seals, int *writable);

/* Map the file's pages up to newcap (> capacity): in place, or moved when
 * nothing holds the region where it is. 0, or -1 with an exception. */
int map_growth(RegionObject *self, Py_ssize_t newcap, const char *what);
/* Refresh a mapping of a file the SIGBUS repair watches (limit:
 * the most bytes the region may have, or -1): the new size, or NULL. */
PyObject *file_refresh_region(RegionObject *self, Py_ssize_t limit);

PyObject *shared_resize(PyObject *module, PyObject *const *args, Py_ssize_t nargs);
PyObject *shared_refresh(PyObject *module, PyObject *region);
PyObject *shared_discard(PyObject *module, PyObject *const *args, Py_ssize_t nargs,
                         PyObject *kwnames);

#endif
