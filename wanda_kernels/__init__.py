"""Triton kernels for Wanda pruning: calibration statistics, scores, fused mask selection,
and the SparseGPT column-block update.

Every op has a plain-torch reference with the same signature in ``wanda_kernels.reference``
(``<op>_torch``); the reference defines the semantics. Masks are bool, True = prune.
"""

from wanda_kernels.fused import wanda_prune_
from wanda_kernels.magnitude import magnitude_mask
from wanda_kernels.nm import nm_mask
from wanda_kernels.scores import wanda_scores
from wanda_kernels.sparsegpt_block import sparsegpt_block_
from wanda_kernels.sq_norms import accumulate_sq_norms_
from wanda_kernels.unstructured import unstructured_mask

__all__ = [
    "accumulate_sq_norms_",
    "magnitude_mask",
    "nm_mask",
    "sparsegpt_block_",
    "unstructured_mask",
    "wanda_prune_",
    "wanda_scores",
]
