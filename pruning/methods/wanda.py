"""Wanda: prune by ``|W| * ||X_j||_2`` per output row (Sun et al. 2023, locuslab/wanda ``prune_wanda``).

``act_sq_norms[j]`` is the sum over calibration tokens of ``x_j ** 2`` (``accumulate_sq_norms_``). The
reference keeps a running *mean* over sequences (``scaler_row``); the two differ by one positive factor per
matrix, so every per-row ranking, hence every mask, is the same.
* Default: the ``int(C * sparsity)`` smallest scores of each row (stable ties), or N:M over column groups:
  ``wanda_prune_`` in ``wanda_kernels``.
* ``use_variant=True``: the paper's variant (``args.use_variant`` in ``prune_wanda``). Each row prunes its
  smallest scores whose cumulative sum stays within ``alpha`` times the row's total; ``alpha`` is bisected
  (start 0.4 in [0, 0.8]) until the matrix sparsity is within 0.001 of the target or the bracket is narrower
  than 0.001. Unstructured only.
"""

from __future__ import annotations

import logging

import torch

from pruning.methods.ops import kernel_ops
from wanda_kernels._validate import check_sparsity

logger = logging.getLogger(__name__)

VARIANT_TOLERANCE = 0.001  # |sparsity - target| at which the alpha search stops (locuslab/wanda)
VARIANT_ALPHA_START = 0.4
VARIANT_ALPHA_BRACKET = (0.0, 0.8)


@torch.no_grad()
def prune_wanda_(
    weight: torch.Tensor,
    act_sq_norms: torch.Tensor,
    sparsity: float,
    n: int = 0,
    m: int = 0,
    use_variant: bool = False,
    backend: str = "torch",
) -> torch.Tensor:
    """Zero the pruned entries of ``weight`` [out, in] in place; return the bool mask (True = pruned).

    ``act_sq_norms`` is fp32 [in]: per input channel, the sum of squared calibration activations.
    ``n``/``m`` non-zero selects N:M sparsity (``sparsity`` is then ignored).
    """
    ops = kernel_ops(backend)
    if not use_variant:
        return ops.wanda_prune_(weight, act_sq_norms, sparsity, n, m)
    if n or m:
        raise ValueError(f"use_variant is unstructured only; got n={n}, m={m}")
    check_sparsity(sparsity)
    scores = ops.wanda_scores(weight, act_sq_norms)
    if sparsity == 0:  # as locuslab/wanda main.py: ratio 0 prunes nothing (the search would still prune some)
        return torch.zeros(weight.shape, dtype=torch.bool, device=weight.device)
    mask = _variant_mask(scores, sparsity)
    weight.masked_fill_(mask, 0)
    return mask


def _mask_given_alpha(
    scores: torch.Tensor, sorted_scores: torch.Tensor, cumsum: torch.Tensor, row_sums: torch.Tensor, alpha: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``return_given_alpha``: per row prune scores ``<=`` the last sorted score whose cumsum ``<= alpha * sum``."""
    in_budget = cumsum <= (row_sums * alpha)[:, None]  # a prefix of each sorted row: cumsum is non-decreasing
    count = in_budget.sum(dim=1, keepdim=True)
    # The reference gathers index count - 1, which is -1 (an index error) when even the smallest score exceeds
    # the budget; such a row prunes nothing here.
    threshold = torch.gather(sorted_scores, 1, (count - 1).clamp(min=0))
    threshold = torch.where(count > 0, threshold, torch.full_like(threshold, float("-inf")))
    mask = scores <= threshold  # ties with the threshold are pruned too, as in the reference
    # fp32 tensor, like the reference's ``(W_mask==True).sum() / W_mask.numel()``: comparisons match it bit for bit.
    return mask, mask.sum() / mask.numel()


def _variant_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    sorted_scores = torch.sort(scores, dim=-1, stable=True)[0]
    cumsum = torch.cumsum(sorted_scores, dim=1)
    row_sums = scores.sum(dim=1)

    alpha = VARIANT_ALPHA_START
    lo, hi = VARIANT_ALPHA_BRACKET
    mask, cur = _mask_given_alpha(scores, sorted_scores, cumsum, row_sums, alpha)
    while bool(torch.abs(cur - sparsity) > VARIANT_TOLERANCE) and hi - lo >= VARIANT_TOLERANCE:
        if bool(cur > sparsity):
            alpha, hi = (alpha + lo) / 2.0, alpha
        else:
            alpha, lo = (alpha + hi) / 2.0, alpha
        mask, cur = _mask_given_alpha(scores, sorted_scores, cumsum, row_sums, alpha)
    if bool(torch.abs(cur - sparsity) > VARIANT_TOLERANCE):
        logger.warning(
            "wanda variant: alpha search stopped at alpha=%.6f with sparsity %.6f (target %.6f)",
            alpha,
            float(cur),
            sparsity,
        )
    else:
        logger.debug("wanda variant: alpha %.6f gives sparsity %.6f", alpha, float(cur))
    return mask
