/*
 * SharedRegion's kernel: memfd mappings, resize, refresh (issue: shared memory).
 */
#include "mman.h"

int
shared_init(PyObject *module)
{
    return 0;
}
