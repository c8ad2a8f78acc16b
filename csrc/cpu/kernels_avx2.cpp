// The CPU kernels for the avx2 instruction set: compiled with -mavx2 -mfma -mf16c (CMakeLists.txt); run only where the CPU has them.
// dispatch.cpp chooses among the compiled sets at run time.
#define NCL_ISA avx2
#include "cpu/kernels_impl.h"
