// CUDA primitives: launchers callable from plain C++ (bindings_cuda.cpp is compiled by the
// host compiler, so this header must not need nvcc — only cuda_runtime_api.h).
//
// Same conventions as cpu/primitives.h, except `scale` is a float and every pointer is a
// device pointer. Launchers enqueue on `stream`, never synchronize, and return
// cudaGetLastError() (launch errors only; faults inside the kernel surface later).
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace ncl {
namespace cuda {

// out[i] = log sum_j exp(scale * S[i*row_stride + j] + g[j]);  g == nullptr means g = 0.
// Returns cudaErrorInvalidValue for an unknown dtype code.
cudaError_t row_lse_cuda(const void* S, int64_t n, int64_t m, int64_t row_stride, int dtype,
                         float scale, const void* g, void* out, cudaStream_t stream);

}  // namespace cuda
}  // namespace ncl
