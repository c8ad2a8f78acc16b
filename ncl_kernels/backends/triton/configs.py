"""The shipped launch configurations of the Triton kernels: a small table, no autotuning.

Keyed on the storage dtype (16-bit or float32) and, for the streaming kernels, a bucket of
the embedding width ``D`` (every ``D`` compiles its own kernel: it is a compile-time
constant). Autotuning per shape would recompile at the first call of every new shape and
cannot be checked without a GPU; these entries are chosen for an H100/H200 (sm_90) from
the kernels' shared-memory and register budgets (``ptxas -v``, checked offline in
``tests/test_triton_sm90.py``), and ``bench/triton_sweep.py`` times the alternatives on a
GPU so that the table can be revised from measurements.

One rule ties the streaming entries together: every kernel that forms score tiles for a
given dtype and ``D`` (row and column LSE passes, the fused Sinkhorn step, the target
logits) uses the same ``(block_n, block_m, block_d)``, so a logit is the same entry of the
same tile computed by the same chain of products in each of them and rounds to the same
bits (the loss subtracts a target logit from the LSE that contains it; a softmax over one
entry must be exactly 1). The gradient kernels form the same chain of products along D
(``block_d`` chunks, or one dot over the whole padded D for 16-bit operands, which the
tensor cores run as the same sequence of k-steps).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton


class StreamTiles(NamedTuple):
    """Score tiles ``(block_n x block_m)`` reduced over D in chunks of ``block_d``."""
    block_n: int
    block_m: int
    block_d: int
    warps: int
    stages: int


class GradTiles(NamedTuple):
    """Gradient kernels: a program owns ``own`` rows (dX) or columns (dY) and streams the
    other side ``stream`` at a time; its accumulator covers ``block_do`` of D. With
    ``resident`` its own ``own x D`` operand block stays on chip for the whole sweep."""
    own: int
    stream: int
    block_d: int
    block_do: int
    resident: bool
    warps: int
    stages: int


class DenseTiles(NamedTuple):
    block_n: int
    block_m: int
    warps: int
    stages: int


def pow2(n: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(max(1, n)))


def _cap(block: int, cap: Optional[int]) -> int:
    return block if cap is None else max(16, min(block, cap))


def wide(dtype: torch.dtype) -> bool:
    """float32 storage: twice the bytes per tile, tf32x3 products (three MMAs each)."""
    return dtype == torch.float32


def stream_tiles(dtype: torch.dtype, d: int, cap: Optional[int] = None) -> StreamTiles:
    """Tiles of the forward kernels (LSE passes, fused step, target logits).

    16-bit: 128 x 128 score tiles, D in chunks of 64, 8 warps (two warpgroups of
    ``wgmma``), 4 stages: (128 + 128) x 64 x 2 B = 32 KB per stage, 128 KB in all.
    float32: 128 x 64 tiles, chunks of 32, 3 stages: 24 KB per stage.
    """
    dp = pow2(d)
    if wide(dtype):
        n, m, k, warps, stages = 128, 64, min(32, dp), 8, 3
    else:
        n, m, k, warps, stages = 128, 128, min(64, dp), 8, 4
    return StreamTiles(_cap(n, cap), _cap(m, cap), _cap(k, cap), warps, stages)


def grad_tiles(dtype: torch.dtype, d: int, cap: Optional[int] = None) -> GradTiles:
    """Tiles of the gradient kernels (dX over row blocks, dY over column blocks).

    16-bit, padded D <= 512 (FlashAttention-2's backward shape): 128 owned x 32 streamed,
    8 warps; the owned 128 x D block resident (128 KB at D = 512), each streamed 32 x D
    block double-buffered with the output block's 32 x 256 beside it: 224 KB at D = 512.
    The 128 x 256 float32 accumulator is 128 registers a thread. Wider D and float32:
    the same 128 x 32 score tiles from ``block_d`` chunks, output blocks of 128.
    """
    dp = pow2(d)
    k = stream_tiles(dtype, d, cap).block_d
    if not wide(dtype) and dp <= 512:
        do = min(256, dp)
        return GradTiles(_cap(128, cap), _cap(32, cap), k, _cap(do, cap), True, 8,
                         2 if dp > 256 else 3)
    return GradTiles(_cap(128, cap), _cap(32, cap), k, _cap(min(128, dp), cap), False, 8, 3)


def row_tiles(dtype: torch.dtype, m: int, cap: Optional[int] = None) -> DenseTiles:
    """Dense row LSE: up to 512 columns x enough rows for 8192 elements a step (16 KB of
    16-bit loads in flight per program; float32: 4096 elements)."""
    bm = min(512, pow2(m))
    bn = max(1, (4096 if wide(dtype) else 8192) // bm)
    return DenseTiles(_cap(bn, cap), _cap(bm, cap), 8, 3)


def col_tiles(dtype: torch.dtype, m: int, cap: Optional[int] = None) -> DenseTiles:
    """Dense column LSE: one column strip per thread (16-byte vectors: 8 x 16-bit or
    4 x float32), so the reduction over rows stays within each thread.

    4 warps x 32 threads x one vector each = 1024 columns (16-bit) or 512 (float32), 16
    rows a step; narrower matrices take more rows a step (16384 elements).
    """
    vec = 4 if wide(dtype) else 8
    bm = min(4 * 32 * vec, pow2(m))
    return DenseTiles(_cap(max(16, 16384 // bm), cap), _cap(bm, cap), 4, 3)


def elementwise_tiles(dtype: torch.dtype, m: int, cap: Optional[int] = None) -> DenseTiles:
    """Gradient pass and bias application: 32 x 256 tiles, 8 warps."""
    return DenseTiles(_cap(32, cap), _cap(min(256, pow2(m)), cap), 8, 2)
