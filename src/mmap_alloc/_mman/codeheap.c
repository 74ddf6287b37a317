/*
 * CodeHeap's kernel: dual-mapped memfd, blocks, pins (issue: JIT code memory).
 */
#include "mman.h"

int
codeheap_init(PyObject *module)
{
    return 0;
}
