/*
 * SecretBuffer's kernel: secret mappings, canary, wipe (issue: secret memory).
 */
#include "mman.h"

int
secret_init(PyObject *module)
{
    return 0;
}
