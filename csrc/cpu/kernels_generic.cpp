// The CPU kernels for the generic instruction set: no extra flags: runs on any CPU the compiler targets (SSE2 on x86-64).
// dispatch.cpp chooses among the compiled sets at run time.
#define NCL_ISA generic
#include "cpu/kernels_impl.h"
