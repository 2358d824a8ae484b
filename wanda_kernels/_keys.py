"""Order-preserving int32 keys for fp32 scores, shared by the selection kernels.

Ranking on integer keys instead of floats makes every comparison exact and total: the signed order of
the keys is ``torch.sort``'s order on the fp32 values, with -0.0 equal to +0.0 and every NaN above +inf
(all NaNs get one key, so NaN ties fall back to the column index like any other tie).
"""

from __future__ import annotations

import triton
import triton.language as tl

KEY_MAX = tl.constexpr(2147483647)  # int32 max: the canonical NaN key, and the neutral element for min
KEY_MIN = tl.constexpr(-2147483648)


@triton.jit
def ordered_keys(scores):
    scores = tl.where(scores == 0.0, 0.0, scores)  # -0.0 -> +0.0
    bits = scores.to(tl.int32, bitcast=True)
    # Negative floats order backwards in their magnitude bits: flip them (sign bit stays set).
    keys = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    return tl.where(scores != scores, 0x7FFFFFFF, keys)


@triton.jit
def load_scores(src_ptr, norm_ptr, offs_src, offs_col, valid, SCORE_MODE: tl.constexpr):
    """fp32 scores: SCORE_MODE 0 = the values, 1 = |w|, 2 = |w| * act_norm[col] (Wanda)."""
    x = tl.load(src_ptr + offs_src, mask=valid, other=0.0).to(tl.float32)
    if SCORE_MODE >= 1:
        x = tl.abs(x)
    if SCORE_MODE == 2:
        # act_norm = sqrt(act_sq_norms) is taken on the host with torch, so the product is exactly the
        # fp32 product torch forms in the reference (tl.sqrt is approximate on GPUs).
        x = x * tl.load(norm_ptr + offs_col, mask=valid, other=0.0)
    return x
