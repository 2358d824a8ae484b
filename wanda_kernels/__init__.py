"""Triton kernels for Wanda pruning: calibration statistics, scores, fused mask selection,
the SparseGPT column-block update, the tile ops of three-tier / hybrid 2:4 pruning, the 2:4 packed
format with its sparse GEMV, the one-kernel RMSNorm and rotary embedding that shorten a decode step, and
RIA's score, DSnoT's channel moments and its swap loops.

Every op has a plain-torch reference with the same signature in ``wanda_kernels.reference``
(``<op>_torch``); the reference defines the semantics. Masks are bool, True = prune.
"""

from wanda_kernels.dsnot import dsnot_nm_, dsnot_unstructured_
from wanda_kernels.fused import wanda_prune_
from wanda_kernels.magnitude import magnitude_mask
from wanda_kernels.moments import accumulate_moments_
from wanda_kernels.nm import nm_mask
from wanda_kernels.pack24 import pack_24, unpack_24, wanda_prune_pack_24
from wanda_kernels.ria import ria_scores
from wanda_kernels.rmsnorm import rms_norm
from wanda_kernels.rope import rotary
from wanda_kernels.scores import wanda_scores
from wanda_kernels.select import kth_smallest
from wanda_kernels.sparse24_mm import sparse24_linear
from wanda_kernels.sparsegpt_block import sparsegpt_block_
from wanda_kernels.sq_norms import accumulate_sq_norms_
from wanda_kernels.tiers import tier_mask, tile_scores, tile_tiers
from wanda_kernels.unstructured import unstructured_mask

__all__ = [
    "accumulate_moments_",
    "accumulate_sq_norms_",
    "dsnot_nm_",
    "dsnot_unstructured_",
    "kth_smallest",
    "magnitude_mask",
    "nm_mask",
    "pack_24",
    "ria_scores",
    "rms_norm",
    "rotary",
    "sparse24_linear",
    "sparsegpt_block_",
    "tier_mask",
    "tile_scores",
    "tile_tiers",
    "unpack_24",
    "unstructured_mask",
    "wanda_prune_",
    "wanda_prune_pack_24",
    "wanda_scores",
]
