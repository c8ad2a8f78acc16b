"""The end-to-end demo: ``python -m ncl_kernels.train`` (see ``--help``).

Trains two small towers, MLP projection heads over precomputed text and video features,
once with CLIP's symmetric InfoNCE and once with :class:`ncl_kernels.NCLLoss` (queue on),
with the same seed, batches and budget, and evaluates held-out retrieval both ways under
three test-time methods: ``none`` (the plain logits), ``ncl_bank`` (NCL's gallery bias from
a bank of training queries) and ``qbnorm`` (QB-Norm's inverted softmax), docs/math.md section 4.

Normalization error (docs/math.md sections 1, 2, 4): for the held-out captions (Q queries) and
videos (M items), ``P_ij = softmax_j(s * <q_i, y_j> + b_j)`` with the model's scale ``s``
and the gallery bias ``b`` of the scores the run ranks with (CLIP: none, ``b = 0``; NCL:
``ncl_bank``); the summed retrieval probability of video ``j`` is ``(M / Q) sum_i P_ij``
(1 for every item when retrieval probability is spread as NCL's marginals ask); the error
is ``mean_j |summed_j - 1|``.

Modules: ``data`` (synthetic, digits, npz; the split by video), ``model`` (towers, losses,
training loop), ``evaluate`` (metrics, summed probability), ``plots``, ``cli``.
"""

from .cli import main

__all__ = ["main"]
