"""ncl_kernels: Normalized Contrastive Learning kernels for cross-modal retrieval.

The public names (docs/api.md). Compiled backends are imported lazily, so this
package imports (and its PyTorch backend works) without them; :func:`backends` says what is
usable here and why not.
"""

from . import distributed, ops, retrieval
from .backends import backends
from .clip import NCLClipLoss
from .loss import apply_biases_, ncl_loss, ncl_loss_embeddings
from .nn import NCLLoss
from .sinkhorn import (
    SinkhornConvergenceError,
    SinkhornConvergenceWarning,
    SinkhornResult,
    sinkhorn,
    sinkhorn_embeddings,
)

__version__ = "0.2.0"

__all__ = [
    "NCLClipLoss",
    "NCLLoss",
    "SinkhornConvergenceError",
    "SinkhornConvergenceWarning",
    "SinkhornResult",
    "apply_biases_",
    "backends",
    "distributed",
    "ops",
    "ncl_loss",
    "ncl_loss_embeddings",
    "retrieval",
    "sinkhorn",
    "sinkhorn_embeddings",
]
