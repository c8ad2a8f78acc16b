"""The storage dtypes and the accumulation-dtype policy (docs/math.md section 1).

A leaf module: the validation layer, the ops, the backends and retrieval all import the
policy from here, so that it is written once and nothing imports "upward".
"""

from __future__ import annotations

import torch

#: storage dtypes every public function accepts
STORAGE_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
#: the low-precision-or-float32 storage dtypes the GPU kernels target
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype for a storage dtype: float64 for float64, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32
