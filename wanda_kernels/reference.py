"""Plain-torch references for every op in ``wanda_kernels``: these functions ARE the spec.

Each ``<op>_torch`` has the same signature and return contract as the Triton op ``<op>``. They are
written for clarity (sort, topk, broadcasting), not speed, and follow locuslab/wanda's semantics:

* Scores: ``|W| * sqrt(act_sq_norms)`` in fp32 (``prune_wanda``'s ``W_metric``).
* Unstructured: per output row, prune the ``int(C * sparsity)`` smallest scores; among equal scores the
  lower column index is pruned first (a stable ascending sort, ``torch.sort(..., stable=True)``).
* N:M: in each group of ``m`` consecutive columns prune the ``n`` smallest, ties to the lower index.
* Magnitude: one threshold per matrix, ``|w| <= sort(|W|)[int(numel * sparsity)]``.

Ordering of non-finite scores follows ``torch.sort``: NaN ranks above +inf, so NaN and inf entries are
pruned last (a NaN weight is never silently hidden by pruning it first). ``-0.0`` ranks equal to ``+0.0``.
``sparsity == 0`` prunes nothing, as locuslab/wanda's ``main.py`` skips pruning at ratio 0.
"""

from __future__ import annotations

import torch

from wanda_kernels._validate import (
    check_act_sq_norms,
    check_matrix,
    check_nm,
    check_sparsity,
)


def accumulate_sq_norms_torch(acc: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``acc[c] += sum over leading dims of x[..., c] ** 2``, in fp32. Returns ``acc``."""
    if acc.ndim != 1 or acc.dtype != torch.float32:
        raise ValueError(f"acc must be a 1-D float32 tensor, got shape {tuple(acc.shape)} dtype {acc.dtype}")
    if x.ndim < 1 or x.shape[-1] != acc.shape[0]:
        raise ValueError(f"x must end in dim {acc.shape[0]} (= acc), got shape {tuple(x.shape)}")
    acc += x.reshape(-1, x.shape[-1]).float().pow(2).sum(dim=0)
    return acc


def wanda_scores_torch(weight: torch.Tensor, act_sq_norms: torch.Tensor) -> torch.Tensor:
    """``|W| * sqrt(act_sq_norms)[None, :]`` as fp32 [O, C] (exact fp32 products, correctly rounded sqrt)."""
    check_matrix(weight, "weight")
    check_act_sq_norms(act_sq_norms, weight)
    return weight.abs().float() * torch.sqrt(act_sq_norms)[None, :]


def _canonical_scores(scores: torch.Tensor) -> torch.Tensor:
    # fp32 is exact for fp16/bf16 inputs; +0.0 makes -0.0 compare equal *and* sort as equal.
    return scores.float() + 0.0


def unstructured_mask_torch(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Bool [O, C], True = prune: the ``int(C * sparsity)`` smallest scores of each row (stable ties)."""
    check_matrix(scores, "scores")
    check_sparsity(sparsity)
    n_rows, n_cols = scores.shape
    n_prune = int(n_cols * sparsity)
    mask = torch.zeros(n_rows, n_cols, dtype=torch.bool, device=scores.device)
    if n_prune == 0:
        return mask
    order = torch.sort(_canonical_scores(scores), dim=-1, stable=True)[1]
    mask.scatter_(1, order[:, :n_prune], True)
    return mask


def nm_mask_torch(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Bool [O, C], True = prune: the ``n`` smallest of every ``m`` consecutive columns (stable ties)."""
    check_matrix(scores, "scores")
    check_nm(n, m, scores.shape[1])
    n_rows, n_cols = scores.shape
    groups = _canonical_scores(scores).reshape(n_rows, n_cols // m, m)
    order = torch.sort(groups, dim=-1, stable=True)[1]
    mask = torch.zeros_like(groups, dtype=torch.bool)
    mask.scatter_(2, order[..., :n], True)
    return mask.reshape(n_rows, n_cols)


def magnitude_mask_torch(weight: torch.Tensor, sparsity: float, n: int = 0, m: int = 0) -> torch.Tensor:
    """Wanda's magnitude baseline. Unstructured: one per-matrix threshold; N:M: ``nm_mask`` of ``|W|``."""
    check_matrix(weight, "weight")
    check_sparsity(sparsity)
    if n or m:
        check_nm(n, m, weight.shape[1])
        return nm_mask_torch(weight.abs(), n, m)
    if sparsity == 0:
        return torch.zeros(weight.shape, dtype=torch.bool, device=weight.device)
    w_abs = weight.abs().float()
    threshold = torch.sort(w_abs.flatten())[0][int(weight.numel() * sparsity)]
    return w_abs <= threshold  # ties at the threshold are pruned, as in locuslab/wanda


def wanda_prune_torch(
    weight: torch.Tensor, act_sq_norms: torch.Tensor, sparsity: float = 0.5, n: int = 0, m: int = 0
) -> torch.Tensor:
    """Scores, mask and in-place zeroing in one call. Returns the bool mask (True = pruned)."""
    scores = wanda_scores_torch(weight, act_sq_norms)
    check_sparsity(sparsity)
    if n or m:
        check_nm(n, m, weight.shape[1])
        mask = nm_mask_torch(scores, n, m)
    else:
        mask = unstructured_mask_torch(scores, sparsity)
    weight.masked_fill_(mask, 0)
    return mask
