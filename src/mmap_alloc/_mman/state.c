/*
 * The process-wide state of the kernel (see KernelState in mman.h): one
 * struct, defined here, so that every piece of it has one home.
 */
#include "mman.h"

KernelState kernel = {.page = 4096};
