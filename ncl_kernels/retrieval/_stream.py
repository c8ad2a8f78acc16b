"""One pass over the gallery, a chunk of columns at a time: ranks, top-k and argmax.

Memory is O(queries * chunk): one score block of that size is allocated once and reused
for every chunk.

How ``ranks`` stays exact in one pass
-------------------------------------
The rank of positive ``t`` is ``1 + #{j != t : score_j >= score_t}``, which equals
``#{j : score_j >= score_t}`` (the positive counts itself). Comparing against
``score_t`` before the chunk holding ``t`` has been computed needs ``score_t`` up front,
and a tie must be a *bitwise* tie with the value the block holds: a separate dot product
(a different summation order) can round differently and break or invent ties.

So (1) a cheap pre-pass computes every positive's score through the *same scorer* (a
matrix product over the distinct positive items, a few rows of queries at a time: BLAS
computes an element from its row, its column and the shared k-loop, whatever the other
rows and columns are); (2) the single pass counts ``block >= the best positive's value``
(one comparison per score however many positives: see ``_best_threshold``) and gathers
each positive's score from the block it lies in; (3) a query counts as done only
if the gathered value equals the pre-pass value bitwise, in which case its count is
exactly the rank. Any query where the two differ (a BLAS whose kernel depends on the
shape, a GPU library choosing another algorithm) is recounted by the two-pass method on
those rows alone: pass 1 reads each positive's score out of the very blocks that pass 2
counts. The answer is exact either way; only the time differs.
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor
#: elements of one (queries x gallery chunk) score block when ``chunk`` is not given, per
#: device type. CPU: 2**22 float32 = 16 MiB, so the compare that follows the product reads
#: the block from the last-level cache (chunks of 1024 to 16384 columns for 1000 queries
#: measured alike on the development CPU). CUDA: 2**26 = 256 MiB, so each product is a
#: GEMM wide enough for the tensor cores and a pass costs few launches (with the CPU's
#: 16 MiB blocks the GPU run G1 measured ranks 7x slower than the whole score matrix).
BLOCK_ELEMS = {"cpu": 1 << 22, "cuda": 1 << 26}
DEFAULT_BLOCK = 1 << 22
#: the most columns per block: a float32 count of 0/1 values is exact below 2**24
MAX_CHUNK = 1 << 24
#: query rows per step of the positives' pre-pass (its cost is n_queries * this * P * D)
PRE_ROWS = 256
#: the fewest columns of a pre-pass product (see _positive_scores)
PRE_COLS = 64


def default_chunk(n_queries: int, n_items: int, chunk, device: torch.device) -> int:
    """Gallery columns per block: ``chunk``, or the device's block size over the queries."""
    if chunk is None:
        block = BLOCK_ELEMS.get(device.type, DEFAULT_BLOCK)
        chunk = max(1, block // max(1, n_queries))
    return min(chunk, n_items, MAX_CHUNK)


def _spans(n: int, step: int):
    for start in range(0, n, step):
        yield start, min(n, start + step)


class _Buffers:
    """One score block, reused for every chunk (a contiguous view of one allocation)."""

    def __init__(self, rows: int, chunk: int, dtype, device):
        self.rows = rows
        self.scores = torch.empty(rows * chunk, dtype=dtype, device=device)

    def block(self, width: int) -> Tensor:
        return self.scores[: self.rows * width].view(self.rows, width)


def _positive_scores(scorer, T: Tensor) -> Tensor:
    """Scores of ``T`` (Q, P; no -1) through ``scorer``, a few query rows at a time.

    Shapes are kept away from the BLAS small-matrix paths, whose summation order can
    differ from the blocks' (measured with MKL: 1-2 rows or fewer than 64 columns gave
    different bits, 4+ rows and 64+ columns none): the rows are split into nearly equal
    groups and the distinct positives are padded with filler columns up to ``PRE_COLS``.
    """
    n_q = T.shape[0]
    out = torch.empty(T.shape, dtype=scorer.acc, device=T.device)
    groups = -(-n_q // PRE_ROWS)
    step = -(-n_q // groups)
    for start, stop in _spans(n_q, step):
        items, where = torch.unique(T[start:stop], return_inverse=True)
        if items.numel() < PRE_COLS:
            items = torch.cat([items, items.new_zeros(PRE_COLS - items.numel())])
        out[start:stop] = scorer.rows(slice(start, stop))(items).gather(1, where)
    return out


def _count(scorer, T: Tensor, valid: Tensor, threshold: Tensor, chunk: int):
    """``count[i] = #{j : score_ij >= threshold[i]}`` and each positive's own score as the
    blocks hold it (NaN where ``valid`` is False), in one pass over the gallery."""
    n_q = T.shape[0]
    M = scorer.n_items
    buf = _Buffers(n_q, chunk, scorer.acc, T.device)
    count = torch.zeros(n_q, dtype=torch.int64, device=T.device)
    seen = torch.full(T.shape, float("nan"), dtype=scorer.acc, device=T.device)
    for start, stop in _spans(M, chunk):
        width = stop - start
        block = scorer(slice(start, stop), out=buf.block(width))
        inside = valid & (T >= start) & (T < stop)
        seen = torch.where(inside, block.gather(1, (T - start).clamp(0, width - 1)), seen)
        # Then the block becomes its own 0/1 mask, summed in floating point: exact (the
        # partial sums are integers below 2**24) and, unlike a bool mask summed into an
        # integer dtype, free of a conversion copy of the whole block.
        count += block.ge_(threshold[:, None]).sum(1).to(torch.int64)
    return count, seen


def _best_threshold(scores: Tensor, valid: Tensor) -> Tensor:
    """The best positive's score per row. ``count(t) = #{j : score_j >= t}`` does not
    increase with ``t``, so the best rank among several positives, ``min_p count(s_p)``,
    is ``count(max_p s_p)``: one comparison per score, however many positives."""
    return scores.masked_fill(~valid, float("-inf")).amax(1)


def rank_two_pass(scorer, T: Tensor, chunk: int) -> Tensor:
    """The reference method: pass 1 reads the positives' scores from the blocks, pass 2
    recomputes the same blocks (same shapes, so the same bits) and counts."""
    valid = T >= 0
    Tc = T.clamp(min=0)
    nothing = torch.full((T.shape[0],), float("inf"), dtype=scorer.acc, device=T.device)
    _, pos = _count(scorer, Tc, valid, nothing, chunk)      # counts against +inf: unused
    count, _ = _count(scorer, Tc, valid, _best_threshold(pos, valid), chunk)
    return count


def rank_one_pass(scorer, T: Tensor, chunk: int):
    """Ranks (Q,) int64 and how many query rows needed the two-pass recount."""
    valid = T >= 0
    Tc = T.clamp(min=0)
    pre = _positive_scores(scorer, Tc)
    bad = valid & (torch.isnan(pre) | (pre == float("inf")))
    if bool(bad.any()):
        found = "NaN" if bool(torch.isnan(pre[bad]).any()) else "+inf"
        raise ValueError(f"a positive's score is {found} (the scaled product overflowed): "
                         f"check the magnitude of the embeddings, scale and bias")
    count, seen = _count(scorer, Tc, valid, _best_threshold(pre, valid), chunk)
    # every positive's score must be the block's, bit for bit, for the count to be its
    # rank; NaN never equals anything, so a NaN score is recounted too
    same = (seen == pre) | ~valid
    redo = (~same.all(1)).nonzero()[:, 0]
    if redo.numel():
        count[redo] = rank_two_pass(scorer.rows(redo), T[redo], chunk)
    # a positive always counts itself, unless its score is NaN (an overflowed product)
    if bool((count == 0).any()):
        raise ValueError("a positive's score is NaN (the scaled product overflowed): "
                         "check the magnitude of the embeddings, scale and bias")
    return count, int(redo.numel())


def topk(scorer, k: int, chunk: int):
    """``(values, indices)`` of the ``k`` best columns per query, sorted descending."""
    n_q, M = scorer.n_queries, scorer.n_items
    buf = _Buffers(n_q, chunk, scorer.acc, scorer.Q.device)
    best_v = torch.empty(n_q, 0, dtype=scorer.acc, device=scorer.Q.device)
    best_i = torch.empty(n_q, 0, dtype=torch.int64, device=scorer.Q.device)
    for start, stop in _spans(M, chunk):
        block = scorer(slice(start, stop), out=buf.block(stop - start))
        v, i = block.topk(min(k, stop - start), dim=1)
        v, i = torch.cat([best_v, v], 1), torch.cat([best_i, i + start], 1)
        best_v, order = v.topk(min(k, v.shape[1]), dim=1)
        best_i = i.gather(1, order)
    if not bool((torch.isnan(best_v) | (best_v == float("inf"))).logical_not().all()):
        raise ValueError("the scores overflow: scale * <q, y_j> + bias_j is not finite for "
                         "some queries; check the magnitude of the embeddings, scale and "
                         "bias")
    return best_v, best_i


def argmax(scorer, chunk: int) -> Tensor:
    """Index of each query's best column; ties go to the lowest index (``torch.argmax``)."""
    n_q, M = scorer.n_queries, scorer.n_items
    buf = _Buffers(n_q, chunk, scorer.acc, scorer.Q.device)
    best_v = torch.full((n_q,), float("-inf"), dtype=scorer.acc, device=scorer.Q.device)
    best_i = torch.zeros(n_q, dtype=torch.int64, device=scorer.Q.device)
    for start, stop in _spans(M, chunk):
        # torch.max(dim) returns the first maximal index; a later chunk must be strictly
        # better to win, so ties keep the lowest index overall
        v, i = scorer(slice(start, stop), out=buf.block(stop - start)).max(1)
        better = v > best_v
        best_v = torch.where(better, v, best_v)
        best_i = torch.where(better, i + start, best_i)
    return best_i
