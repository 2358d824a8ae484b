"""DSnoT: training-free prune-and-grow refinement of a mask (Zhang et al., ICLR 2024; zyxxmu/DSnoT ``prune_DSnoT``).

Per output row, the reconstruction error is ``e = sum over pruned j of W_j * mean_j`` (the shift of the row's
mean output). Each cycle regrows the pruned weight whose ``W_j * mean_j / var_j ** p`` pushes ``e`` most toward 0
and prunes a kept weight: unstructured, the kept weight of smallest Wanda score with the sign that helps;
N:M, the kept weight of smallest initial score in the regrown weight's group. A row stops when ``|e|`` is at most
``update_threshold``, after ``max_cycles``, or (N:M) when the swap would flip the error's sign. ``mean_j`` is the
per-sample sum of ``x_j`` averaged over samples and ``var_j`` the within-sample variance averaged over tokens, as
the published ``WrappedGPT`` keeps them. The swap loops are ``dsnot_unstructured_`` / ``dsnot_nm_``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pruning.methods.ops import kernel_ops

UPDATE_THRESHOLD = 0.1  # the published defaults (--update_threshold, --max_cycle_time, --pow_of_var_regrowing)
MAX_CYCLES = 50
POW_OF_VAR_REGROWING = 1.0
SKIP_LAYERS = ("mlp", "self_attn", "no_skip")  # --skip_layer: the published default mlp refines attention only


@dataclass(frozen=True)
class ChannelMoments:
    """Per input channel: ``mean`` (sum over a sample's tokens, averaged over samples) and ``var`` (within-sample
    variance, averaged over tokens), fp32 [C]."""

    mean: torch.Tensor
    var: torch.Tensor

    @classmethod
    def from_sums(cls, sums: torch.Tensor, sq_deviations: torch.Tensor, samples: int, tokens: int) -> ChannelMoments:
        return cls(sums / samples, sq_deviations / tokens)

    def permuted(self, perm: torch.Tensor) -> ChannelMoments:
        return ChannelMoments(self.mean[perm], self.var[perm])


@torch.no_grad()
def dsnot_mask(
    weight: torch.Tensor,
    mask: torch.Tensor,
    initial_scores: torch.Tensor,
    act_sq_norms: torch.Tensor,
    moments: ChannelMoments,
    n: int = 0,
    m: int = 0,
    update_threshold: float = UPDATE_THRESHOLD,
    max_cycles: int = MAX_CYCLES,
    pow_of_var_regrowing: float = POW_OF_VAR_REGROWING,
    backend: str = "torch",
) -> torch.Tensor:
    """The refined mask (a new bool [O, C], True = pruned) of ``mask``, which any method chose for ``weight``.

    ``initial_scores``: that method's score (N:M: a swap prunes the smallest kept score in the group).
    ``act_sq_norms``: Wanda's statistic (unstructured: kept weights are pruned in the order of Wanda's score).
    Swaps keep each row's pruned count, and N:M groups."""
    ops = kernel_ops(backend)
    mask = mask.clone()
    dsnot_metric = weight.float() * moments.mean[None, :]
    pruned_metric = dsnot_metric.masked_fill(~mask, 0.0)
    error = pruned_metric.sum(dim=1)
    regrow_metric = (
        pruned_metric / moments.var[None, :].pow(pow_of_var_regrowing) if pow_of_var_regrowing else pruned_metric
    )
    regrow_order = torch.sort(regrow_metric, dim=1, stable=True)[1]
    if n or m:
        prune_metric = initial_scores.float().masked_fill(mask, float("inf"))
        return ops.dsnot_nm_(mask, dsnot_metric, prune_metric, regrow_order, error, m, update_threshold, max_cycles)
    prune_order, prune_counts = _prune_order(weight, mask, dsnot_metric, act_sq_norms, ops)
    return ops.dsnot_unstructured_(
        mask, dsnot_metric, regrow_order, prune_order, prune_counts, error, update_threshold, max_cycles
    )


def _prune_order(weight, mask, dsnot_metric, act_sq_norms, ops) -> tuple[torch.Tensor, torch.Tensor]:
    """Kept columns by ascending Wanda score, then regrouped (published ``return_reorder_indice``): negative
    ``dsnot_metric`` first in that order, positive last in reverse; pruned columns after ``prune_counts``."""
    n_cols = mask.shape[1]
    wanda = ops.wanda_scores(weight, act_sq_norms).masked_fill(mask, float("inf"))
    by_score = torch.sort(wanda, dim=1, stable=True)[1]
    counts = (~mask).sum(dim=1)
    position = torch.arange(n_cols, device=mask.device).expand_as(by_score)
    metric = dsnot_metric.gather(1, by_score)
    kept = position < counts[:, None]
    # Sort keys: negatives (0), zeros (1: DSnoT's reorder mishandles them; here they sit between), positives
    # (2, reversed), pruned columns last (3).
    kind = torch.where(metric < 0, 0, torch.where(metric > 0, 2, 1))
    kind = torch.where(kept, kind, 3)
    within = torch.where(kind == 2, n_cols - position, position)
    key = kind * (n_cols + 1) + within
    order = torch.sort(key, dim=1, stable=True)[1]
    return by_score.gather(1, order), counts
