"""The fused Wanda pass: scores, mask and in-place zeroing of one weight matrix in one kernel.

Spec: ``wanda_kernels.reference.wanda_prune_torch`` (= ``wanda_scores`` then ``unstructured_mask`` or
``nm_mask``, then ``weight[mask] = 0``). weight [O, C] fp16/bf16/fp32 (any strides; updated in place),
act_sq_norms fp32 [C] -> bool mask [O, C]. The scores never exist in memory: the selection kernels form
``|w| * sqrt(a)`` in registers with the same fp32 operations as ``wanda_scores``, so the mask is
bit-identical to composing the ops. Traffic: read W, write the mask, write zeros where pruned.
"""

from __future__ import annotations

import torch

from wanda_kernels._runtime import check_kernel_device, on_input_device
from wanda_kernels._validate import check_act_sq_norms, check_matrix, check_nm, check_sparsity
from wanda_kernels.nm import launch_nm_select
from wanda_kernels.unstructured import launch_row_select


@on_input_device
def wanda_prune_(
    weight: torch.Tensor, act_sq_norms: torch.Tensor, sparsity: float = 0.5, n: int = 0, m: int = 0
) -> torch.Tensor:
    """Prune ``weight`` in place by Wanda's score; ``n``/``m`` > 0 selects N:M. Returns the mask (True = pruned)."""
    check_matrix(weight, "weight")
    check_act_sq_norms(act_sq_norms, weight)
    check_sparsity(sparsity)
    check_kernel_device(weight, act_sq_norms)
    act_norms = torch.sqrt(act_sq_norms)  # correctly rounded, as in wanda_scores
    if n or m:
        check_nm(n, m, weight.shape[1])
        return launch_nm_select(weight, act_norms, n, m, score_mode=2, prune_weight=True)
    n_prune = int(weight.shape[1] * sparsity)
    return launch_row_select(weight, act_norms, n_prune, score_mode=2, prune_weight=True)
