// The CPU kernels for the avx512 instruction set: compiled with -mavx512f -mavx512dq -mavx512bw -mavx512vl -mavx2 -mfma -mf16c; run only where the CPU has them.
// dispatch.cpp chooses among the compiled sets at run time.
#define NCL_ISA avx512
#include "cpu/kernels_impl.h"
