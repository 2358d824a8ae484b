"""Magnitude pruning, Wanda's baseline (locuslab/wanda ``prune_magnitude``).

Unstructured: one threshold per matrix, ``|w| <= sort(|W|)[int(numel * sparsity)]`` (ties at the threshold
pruned). N:M: the ``n`` smallest ``|w|`` of every ``m`` consecutive input columns (ties to the lower index).
The op itself is ``magnitude_mask`` in ``wanda_kernels``; this module only zeroes the weight.
"""

from __future__ import annotations

import torch

from pruning.methods.ops import kernel_ops


@torch.no_grad()
def prune_magnitude_(
    weight: torch.Tensor, sparsity: float, n: int = 0, m: int = 0, backend: str = "torch"
) -> torch.Tensor:
    """Zero the pruned entries of ``weight`` [out, in] in place; return the bool mask (True = pruned).

    ``n``/``m`` non-zero selects N:M sparsity (``sparsity`` is then ignored).
    """
    mask = kernel_ops(backend).magnitude_mask(weight, sparsity, n, m)
    weight.masked_fill_(mask, 0)
    return mask
