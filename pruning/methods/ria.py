"""RIA: relative importance and activations (Zhang et al., ICLR 2024; biomedical-cybernetics/Relative-importance-
and-activation-pruning, ``prune_ria``).

Score ``(|W_ij| / sum_i |W_ij| + |W_ij| / sum_j |W_ij|) * ||X_j|| ** a`` (``a`` = 0.5): ``ria_scores``. Unstructured
(the published default): one threshold per matrix, ``score <= sort(scores)[int(numel * sparsity)]``; N:M: the
``n`` smallest of every ``m`` consecutive columns (ties to the lower index). ``act_sq_norms`` is the sum over
calibration tokens of ``x_j ** 2``; the published running mean differs by one factor per matrix, which changes
no ranking.
"""

from __future__ import annotations

import torch

from pruning.methods.ops import kernel_ops

RIA_A = 0.5  # the published exponent of the activation norm (``--a``)


def ria_mask(scores: torch.Tensor, sparsity: float, n: int = 0, m: int = 0, backend: str = "torch") -> torch.Tensor:
    """RIA's mask (True = prune) from its scores: one threshold per matrix, or N:M."""
    ops = kernel_ops(backend)
    if n or m:
        return ops.nm_mask(scores, n, m)
    return ops.magnitude_mask(scores, sparsity)  # scores >= 0: |scores| is the score, one threshold per matrix


@torch.no_grad()
def prune_ria_(
    weight: torch.Tensor,
    act_sq_norms: torch.Tensor,
    sparsity: float,
    n: int = 0,
    m: int = 0,
    a: float = RIA_A,
    backend: str = "torch",
) -> torch.Tensor:
    """Zero the pruned entries of ``weight`` [out, in] in place; return the bool mask (True = pruned)."""
    mask = ria_mask(kernel_ops(backend).ria_scores(weight, act_sq_norms, a), sparsity, n, m, backend)
    weight.masked_fill_(mask, 0)
    return mask
