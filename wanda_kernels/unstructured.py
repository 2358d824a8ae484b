"""Row-wise unstructured mask: prune the ``k = int(C * sparsity)`` smallest scores of every row.

Spec: ``wanda_kernels.reference.unstructured_mask_torch`` (stable ascending sort per row, scatter the
first k indices). Shapes: scores [O, C] fp16/bf16/fp32, any strides -> bool mask [O, C], True = prune.
Each program bisects one row's int32 keys (``_keys.ordered_keys``) for the k-th smallest, T, then prunes
``keys < T`` plus the first ``k - count(keys < T)`` keys equal to T in column order: the stable sort's tie rule.
Rows up to ``MAX_REGISTER_ROW`` columns stay in registers; longer rows are re-read in chunks of ``CHUNK``. The
same kernel serves the fused Wanda pass (``fused.wanda_prune_``). Design notes: docs/kernels.md.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from wanda_kernels._keys import KEY_MAX, KEY_MIN, load_scores, ordered_keys
from wanda_kernels._runtime import check_kernel_device, interpreting, on_input_device, tuning_configs
from wanda_kernels._validate import check_matrix, check_sparsity

MAX_REGISTER_ROW = 32768  # longest row (padded to a power of two) held in registers
CHUNK = 8192  # chunk length for longer rows


@triton.jit
def _bisect(lo, hi, count_le_mid, mid, n_prune):
    # Keep count(keys <= hi) >= n_prune > count(keys < lo). An exact hit ends the search at mid + 1.
    new_lo = tl.where(count_le_mid > n_prune, lo, mid + 1)
    new_hi = tl.where(count_le_mid > n_prune, mid, tl.where(count_le_mid == n_prune, mid + 1, hi))
    return new_lo, new_hi


@triton.jit
def _row_select_kernel(
    src_ptr,
    norm_ptr,
    mask_ptr,
    n_cols,
    n_prune,
    stride_row,
    stride_col,
    SCORE_MODE: tl.constexpr,
    PRUNE_WEIGHT: tl.constexpr,
    BLOCK_C: tl.constexpr,
    NUM_CHUNKS: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    src_row = src_ptr + row * stride_row
    mask_row = mask_ptr + row * n_cols
    offs = tl.arange(0, BLOCK_C)
    if NUM_CHUNKS == 1:
        valid = offs < n_cols
        keys = ordered_keys(load_scores(src_row, norm_ptr, offs.to(tl.int64) * stride_col, offs, valid, SCORE_MODE))
        lo = tl.min(tl.where(valid, keys, KEY_MAX), axis=0).to(tl.int64)
        hi = tl.max(tl.where(valid, keys, KEY_MIN), axis=0).to(tl.int64)
        while lo < hi:
            mid = lo + (hi - lo) // 2
            count = tl.sum(((keys <= mid.to(tl.int32)) & valid).to(tl.int32), axis=0)
            lo, hi = _bisect(lo, hi, count, mid, n_prune)
        threshold = lo.to(tl.int32)
        below = (keys < threshold) & valid
        at = (keys == threshold) & valid
        n_ties_to_prune = n_prune - tl.sum(below.to(tl.int32), axis=0)
        prune = below | (at & (tl.cumsum(at.to(tl.int32), axis=0) <= n_ties_to_prune))
        tl.store(mask_row + offs, prune.to(tl.uint8), mask=valid)
        if PRUNE_WEIGHT:
            zero = tl.zeros([BLOCK_C], dtype=src_ptr.dtype.element_ty)
            tl.store(src_row + offs.to(tl.int64) * stride_col, zero, mask=prune)
    else:
        lo = tl.full([], KEY_MAX, tl.int64)
        hi = tl.full([], KEY_MIN, tl.int64)
        for chunk in range(NUM_CHUNKS):
            cols = chunk * BLOCK_C + offs
            valid = cols < n_cols
            keys = ordered_keys(load_scores(src_row, norm_ptr, cols.to(tl.int64) * stride_col, cols, valid, SCORE_MODE))
            lo = tl.minimum(lo, tl.min(tl.where(valid, keys, KEY_MAX), axis=0).to(tl.int64))
            hi = tl.maximum(hi, tl.max(tl.where(valid, keys, KEY_MIN), axis=0).to(tl.int64))
        while lo < hi:
            mid = lo + (hi - lo) // 2
            count = tl.zeros([], tl.int32)
            for chunk in range(NUM_CHUNKS):
                cols = chunk * BLOCK_C + offs
                valid = cols < n_cols
                keys = ordered_keys(
                    load_scores(src_row, norm_ptr, cols.to(tl.int64) * stride_col, cols, valid, SCORE_MODE)
                )
                count += tl.sum(((keys <= mid.to(tl.int32)) & valid).to(tl.int32), axis=0)
            lo, hi = _bisect(lo, hi, count, mid, n_prune)
        threshold = lo.to(tl.int32)
        n_below = tl.zeros([], tl.int32)
        for chunk in range(NUM_CHUNKS):
            cols = chunk * BLOCK_C + offs
            valid = cols < n_cols
            keys = ordered_keys(load_scores(src_row, norm_ptr, cols.to(tl.int64) * stride_col, cols, valid, SCORE_MODE))
            n_below += tl.sum(((keys < threshold) & valid).to(tl.int32), axis=0)
        n_ties_to_prune = n_prune - n_below
        ties_seen = tl.zeros([], tl.int32)
        for chunk in range(NUM_CHUNKS):
            cols = chunk * BLOCK_C + offs
            valid = cols < n_cols
            keys = ordered_keys(load_scores(src_row, norm_ptr, cols.to(tl.int64) * stride_col, cols, valid, SCORE_MODE))
            below = (keys < threshold) & valid
            at = (keys == threshold) & valid
            tie_rank = ties_seen + tl.cumsum(at.to(tl.int32), axis=0)
            prune = below | (at & (tie_rank <= n_ties_to_prune))
            ties_seen += tl.sum(at.to(tl.int32), axis=0)
            tl.store(mask_row + cols, prune.to(tl.uint8), mask=valid)
            if PRUNE_WEIGHT:
                zero = tl.zeros([BLOCK_C], dtype=src_ptr.dtype.element_ty)
                tl.store(src_row + cols.to(tl.int64) * stride_col, zero, mask=prune)


# num_warps is the one real tiling choice here (one row per program), measured per row length on first use; the
# weight is restored between trials (in-place kernel). Only 16-128 keys per thread are tried (docs/kernels.md).
KEYS_PER_THREAD = (16, 128)


def _prune_warps(configs, named_args, **kwargs):
    block_c = kwargs.get("BLOCK_C", named_args.get("BLOCK_C"))
    low, high = KEYS_PER_THREAD
    kept = [c for c in configs if low <= block_c // (32 * c.num_warps) <= high]
    return kept or configs[:1]  # short rows: the fewest warps


_row_select_tuned = triton.autotune(
    configs=tuning_configs(
        [triton.Config({}, num_warps=w) for w in (4, 8, 16, 32)],
        triton.Config({}, num_warps=1 if interpreting() else 8),
    ),
    key=["n_cols", "BLOCK_C", "NUM_CHUNKS", "SCORE_MODE", "PRUNE_WEIGHT"],
    restore_value=["src_ptr"],
    prune_configs_by={"early_config_prune": _prune_warps},
)(_row_select_kernel)


def launch_row_select(
    src: torch.Tensor, act_norms: torch.Tensor | None, n_prune: int, score_mode: int, prune_weight: bool
) -> torch.Tensor:
    """Shared launcher for ``unstructured_mask`` and the fused Wanda pass; inputs already validated."""
    n_rows, n_cols = src.shape
    mask = torch.zeros(n_rows, n_cols, dtype=torch.bool, device=src.device)
    if n_prune == 0 or n_rows == 0:
        return mask
    padded = triton.next_power_of_2(n_cols)
    if padded <= MAX_REGISTER_ROW:
        block_c, num_chunks = padded, 1
    else:
        block_c, num_chunks = CHUNK, triton.cdiv(n_cols, CHUNK)
    _row_select_tuned[(n_rows,)](
        src,
        act_norms if act_norms is not None else src,
        mask.view(torch.uint8),
        n_cols,
        n_prune,
        src.stride(0),
        src.stride(1),
        SCORE_MODE=score_mode,
        PRUNE_WEIGHT=prune_weight,
        BLOCK_C=block_c,
        NUM_CHUNKS=num_chunks,
    )
    return mask


@on_input_device
def unstructured_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Bool [O, C], True = prune: per row, the ``int(C * sparsity)`` smallest scores (ties: lower column)."""
    check_matrix(scores, "scores")
    check_sparsity(sparsity)
    check_kernel_device(scores)
    return launch_row_select(scores, None, int(scores.shape[1] * sparsity), score_mode=0, prune_weight=False)
