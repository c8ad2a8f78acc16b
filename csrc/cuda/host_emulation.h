// host_emulation.h — runs this directory's CUDA kernels on the CPU, for tests only.
//
// Force-included (g++ -include) ahead of the unchanged .cu sources when they are compiled
// as C++ with -DNCL_HOST_EMULATION (tests/test_cuda_emulated.py). A launch runs every block
// of the grid in turn; the threads of a block are fibers (ucontext) on one OS thread, and
// __syncthreads() switches to the next fiber, so a block's threads advance from barrier
// to barrier together, like on the GPU. What that checks on a machine without a GPU:
// the indexing (which thread reads and writes which element, 64-bit offsets, vector and
// tail paths, slab and tile bounds), the merge orders, the shared-memory protocol (a
// barrier that not every thread of the block reaches is an error here) and the launch
// shapes against the hardware limits (block size, gridDim.y <= 65535).
//
// What it cannot check: timing, memory-model races between warps that the barriers do not
// order (use compute-sanitizer racecheck on a GPU: bench/sanitize_cuda.sh), or the
// device's own expf/logf and rounding (the host's libm stands in). The SFU's
// ex2.approx.ftz.f32 (device_utils.cuh's fast_exp) is modelled at its documented error
// bound instead of computed exactly: see ex2_approx_ftz. FMA contraction differs too (the
// host build never contracts, nvcc may), which moves results by rounding only.
#pragma once

// Before the CUDA headers, which define __shared__ as nothing for a host compiler:
// static locals are one copy per kernel instantiation, shared by the threads of the block
// (blocks run one after the other).
#define __shared__ static

#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <stdexcept>
#include <string>
#include <vector>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace ncl_emu {

struct Fiber {
  ucontext_t ctx;
  std::vector<char> stack;
  dim3 tid;
  bool done = false;
};

struct State {
  ucontext_t main;
  std::vector<Fiber> fibers;
  int current = 0;
  dim3 block_idx, grid_dim, block_dim;
  std::function<void()> body;
  uint64_t exchange[1024];  // __shfl_xor_sync slots, one per thread
};

inline State& state() {
  static State s;
  return s;
}

// The device's multiprocessor count as the launchers see it (device_utils.cuh,
// current_sm_count): NCL_EMU_SMS, 2 by default, so that persistent grids are small and
// each block of a test takes several work units.
inline int sm_count() {
  const char* v = std::getenv("NCL_EMU_SMS");
  const int n = v ? std::atoi(v) : 2;
  return n > 0 ? n : 2;
}

// ---------------------------------------------------------------- ex2.approx.ftz.f32
// The device instruction's documented behaviour: 2^x within 2 ulp (the CUDA math
// library's bound for exp2f, which is built from it), subnormal inputs and results
// flushed to zero, and the exact special cases +-0 -> 1, -inf -> +0, +inf -> +inf,
// NaN -> NaN. The error within the bound is modelled, chosen per launch by the
// environment variable NCL_EMU_EX2:
//   "hash" (default)  the correctly rounded value moved by -2..+2 ulp, a fixed function
//                     of the input's bits (errors of both signs, like a table-driven unit)
//   "up" / "down"     always +2 / -2 ulp (the worst bias the bound allows)
//   "exact"           correctly rounded
enum class Ex2Mode { kHash, kUp, kDown, kExact };

inline Ex2Mode& ex2_mode() {
  static Ex2Mode mode = Ex2Mode::kHash;
  return mode;
}

inline void read_ex2_mode() {
  const char* v = std::getenv("NCL_EMU_EX2");
  const std::string s = v ? v : "hash";
  if (s == "hash") ex2_mode() = Ex2Mode::kHash;
  else if (s == "up") ex2_mode() = Ex2Mode::kUp;
  else if (s == "down") ex2_mode() = Ex2Mode::kDown;
  else if (s == "exact") ex2_mode() = Ex2Mode::kExact;
  else throw std::invalid_argument("NCL_EMU_EX2 must be hash, up, down or exact, not " + s);
}

inline float ex2_approx_ftz(float x) {
  uint32_t xb;
  std::memcpy(&xb, &x, sizeof xb);
  if (std::isnan(x)) return x;
  if ((xb & 0x7f800000u) == 0) return 1.0f;  // +-0 and (flushed) subnormals
  if (std::isinf(x)) return x < 0 ? 0.0f : x;
  const float r = float(std::exp2(double(x)));  // correctly rounded (but for ties)
  if (r < 0x1p-126f) return 0.0f;                // subnormal or zero result: flushed
  if (std::isinf(r)) return r;
  int ulps = 0;
  switch (ex2_mode()) {
    case Ex2Mode::kExact: break;
    case Ex2Mode::kUp: ulps = 2; break;
    case Ex2Mode::kDown: ulps = -2; break;
    case Ex2Mode::kHash: {
      uint32_t h = xb * 0x9e3779b1u;  // a fixed mix of the input's bits
      h ^= h >> 15;
      h *= 0x85ebca77u;
      h ^= h >> 13;
      ulps = int(h % 5u) - 2;
      break;
    }
  }
  uint32_t rb;
  std::memcpy(&rb, &r, sizeof rb);
  rb = uint32_t(int64_t(rb) + ulps);  // r > 0: its bits are ordered like its values
  float y;
  std::memcpy(&y, &rb, sizeof y);
  return y < 0x1p-126f ? 0.0f : y;
}

inline void fiber_main() {
  State& s = state();
  s.body();
  s.fibers[s.current].done = true;  // then uc_link returns to the scheduler
}

inline void syncthreads() {
  State& s = state();
  swapcontext(&s.fibers[s.current].ctx, &s.main);
}

// Runs body() as every thread of every block of grid x block. Returns the error a GPU
// launch of that shape would return, or throws std::logic_error on barrier divergence.
inline cudaError_t launch(dim3 grid, dim3 block, std::function<void()> body) {
  const int64_t threads = int64_t(block.x) * block.y * block.z;
  if (threads < 1 || threads > 1024 || grid.x < 1 || grid.y < 1 || grid.z < 1 ||
      grid.y > 65535 || grid.z > 65535 || block.z > 64)
    return cudaErrorInvalidConfiguration;
  read_ex2_mode();
  State& s = state();
  s.body = std::move(body);
  s.grid_dim = grid;
  s.block_dim = block;
  s.fibers.resize(size_t(threads));
  for (auto& f : s.fibers) f.stack.resize(256 * 1024);
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        s.block_idx = dim3(bx, by, bz);
        for (int64_t t = 0; t < threads; ++t) {
          Fiber& f = s.fibers[size_t(t)];
          f.done = false;
          f.tid = dim3(unsigned(t % block.x), unsigned(t / block.x % block.y),
                       unsigned(t / (int64_t(block.x) * block.y)));
          getcontext(&f.ctx);
          f.ctx.uc_stack.ss_sp = f.stack.data();
          f.ctx.uc_stack.ss_size = f.stack.size();
          f.ctx.uc_link = &s.main;
          makecontext(&f.ctx, fiber_main, 0);
        }
        // rounds: every live thread runs to its next barrier (or to its end)
        for (;;) {
          int finished = 0;
          for (int64_t t = 0; t < threads; ++t) {
            if (s.fibers[size_t(t)].done) {
              ++finished;
              continue;
            }
            s.current = int(t);
            swapcontext(&s.main, &s.fibers[size_t(t)].ctx);
            if (s.fibers[size_t(t)].done) ++finished;
          }
          if (finished == threads) break;
          if (finished > 0)
            throw std::logic_error("barrier divergence: " + std::to_string(threads - finished) +
                                   " threads wait at a barrier that " +
                                   std::to_string(finished) + " finished threads never reach");
        }
      }
  return cudaSuccess;
}

inline const dim3& thread_idx() { return state().fibers[state().current].tid; }

// A butterfly exchange among the 32 lanes of a warp. Emulated with two block-wide
// barriers, which is right as long as every thread of the block makes the same sequence
// of shuffles (true for this library's kernels; the divergence check catches the rest).
template <typename T>
T shfl_xor(unsigned mask, T v, int lane_mask) {
  static_assert(sizeof(T) <= sizeof(uint64_t), "shuffle of at most 8 bytes");
  if (mask != 0xffffffffu) throw std::logic_error("emulated shuffles need a full mask");
  State& s = state();
  const int t = s.current;
  std::memcpy(&s.exchange[t], &v, sizeof v);
  syncthreads();
  T r;
  std::memcpy(&r, &s.exchange[(t & ~31) | ((t & 31) ^ lane_mask)], sizeof r);
  syncthreads();
  return r;
}

}  // namespace ncl_emu

#ifndef __launch_bounds__
#define __launch_bounds__(...)
#endif
#define threadIdx (ncl_emu::thread_idx())
#define blockIdx (ncl_emu::state().block_idx)
#define gridDim (ncl_emu::state().grid_dim)
#define blockDim (ncl_emu::state().block_dim)

inline void __syncthreads() { ncl_emu::syncthreads(); }
template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask) {
  return ncl_emu::shfl_xor(mask, v, lane_mask);
}
// Separately rounded products and sums (the host build uses -ffp-contract=off too).
inline float __fmul_rn(float a, float b) { return a * b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline double __dadd_rn(double a, double b) { return a + b; }
