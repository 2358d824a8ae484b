"""RIA scores: ``(|W| / colsum|W| + |W| / rowsum|W|) * sqrt(act_sq_norms) ** a`` as an fp32 [O, C] matrix.

Spec: ``wanda_kernels.reference_dsnot.ria_scores_torch``. weight [O, C] fp16/bf16/fp32 (any strides),
act_sq_norms fp32 [C] -> fp32 [O, C] contiguous. An all-zero row or column gives NaN, as in the reference.

Two kernels. The first reads W once and writes fp32 partial sums of |W|: per (row split, column) and per
(column tile, row); the partials are added in a fixed order on the host, so the sums are deterministic (no
atomics). The second forms each score with correctly rounded divisions (``div_rn``; ``/`` is approximate on
GPUs) in the reference's order, times ``sqrt(act_sq_norms) ** a`` taken on the host with torch. Only the
summation order differs from torch: scores are bit-identical wherever the sums are exact.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from wanda_kernels._runtime import check_kernel_device, interpreting, on_input_device, target_programs
from wanda_kernels._validate import check_act_sq_norms, check_matrix


@triton.jit
def _abs_sums_partial_kernel(
    weight_ptr,
    col_partial_ptr,
    row_partial_ptr,
    n_rows,
    n_cols,
    stride_row,
    stride_col,
    rows_per_split,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    col_tile = tl.program_id(0)
    split = tl.program_id(1)
    cols = col_tile * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < n_cols
    row_begin = split * rows_per_split
    row_end = tl.minimum(row_begin + rows_per_split, n_rows)
    col_acc = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    for row0 in range(row_begin, row_end, BLOCK_R):
        rows = row0 + tl.arange(0, BLOCK_R)
        row_ok = rows < row_end
        ok = row_ok[:, None] & col_ok[None, :]
        offs = rows.to(tl.int64)[:, None] * stride_row + cols.to(tl.int64)[None, :] * stride_col
        w = tl.abs(tl.load(weight_ptr + offs, mask=ok, other=0.0).to(tl.float32))
        col_acc += w
        # This tile's share of each row's sum; the column tiles' shares are added on the host.
        tl.store(row_partial_ptr + col_tile.to(tl.int64) * n_rows + rows, tl.sum(w, axis=1), mask=row_ok)
    tl.store(col_partial_ptr + split.to(tl.int64) * n_cols + cols, tl.sum(col_acc, axis=0), mask=col_ok)


@triton.jit
def _ria_scores_kernel(
    weight_ptr,
    col_sum_ptr,
    row_sum_ptr,
    act_factor_ptr,
    out_ptr,
    n_rows,
    n_cols,
    stride_row,
    stride_col,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    row_ok = rows < n_rows
    col_ok = cols < n_cols
    ok = row_ok[:, None] & col_ok[None, :]
    offs = rows[:, None] * stride_row + cols.to(tl.int64)[None, :] * stride_col
    w = tl.abs(tl.load(weight_ptr + offs, mask=ok, other=0.0).to(tl.float32))
    col_sum = tl.load(col_sum_ptr + cols, mask=col_ok, other=1.0)[None, :]
    row_sum = tl.load(row_sum_ptr + rows, mask=row_ok, other=1.0)[:, None]
    factor = tl.load(act_factor_ptr + cols, mask=col_ok, other=0.0)[None, :]
    # torch's order and rounding: two correctly rounded quotients, their sum, then the product.
    scores = (tl.math.div_rn(w, col_sum) + tl.math.div_rn(w, row_sum)) * factor
    tl.store(out_ptr + rows[:, None] * n_cols + cols[None, :], scores, mask=ok)


@on_input_device
def ria_scores(weight: torch.Tensor, act_sq_norms: torch.Tensor, a: float = 0.5) -> torch.Tensor:
    """fp32 [O, C] = ``(|W| / colsum|W| + |W| / rowsum|W|) * sqrt(act_sq_norms)[None, :] ** a``."""
    check_matrix(weight, "weight")
    check_act_sq_norms(act_sq_norms, weight)
    check_kernel_device(weight, act_sq_norms)
    n_rows, n_cols = weight.shape
    out = torch.empty(n_rows, n_cols, dtype=torch.float32, device=weight.device)
    if out.numel() == 0:
        return out
    col_sums, row_sums = _abs_sums(weight)
    act_factor = torch.sqrt(act_sq_norms).pow(a)  # the reference's [C] vector, bit for bit
    block_c = min(triton.next_power_of_2(n_cols), 1024 if interpreting() else 256)
    block_r = min(triton.next_power_of_2(n_rows), 64 if interpreting() else 16)
    grid = (triton.cdiv(n_rows, block_r), triton.cdiv(n_cols, block_c))
    _ria_scores_kernel[grid](
        weight,
        col_sums,
        row_sums,
        act_factor,
        out,
        n_rows,
        n_cols,
        weight.stride(0),
        weight.stride(1),
        BLOCK_R=block_r,
        BLOCK_C=block_c,
    )
    return out


def _abs_sums(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 column sums [C] and row sums [O] of |weight|, from one read of it."""
    n_rows, n_cols = weight.shape
    if interpreting():
        block_c, block_r = min(triton.next_power_of_2(n_cols), 1024), min(triton.next_power_of_2(n_rows), 64)
    else:
        block_c, block_r = min(triton.next_power_of_2(n_cols), 256), 32
    n_col_tiles = triton.cdiv(n_cols, block_c)
    max_splits = triton.cdiv(n_rows, block_r)
    n_splits = max(1, min(max_splits, target_programs(weight.device) // n_col_tiles))
    rows_per_split = triton.cdiv(triton.cdiv(n_rows, n_splits), block_r) * block_r
    n_splits = triton.cdiv(n_rows, rows_per_split)
    col_partial = torch.empty(n_splits, n_cols, dtype=torch.float32, device=weight.device)
    row_partial = torch.empty(n_col_tiles, n_rows, dtype=torch.float32, device=weight.device)
    _abs_sums_partial_kernel[(n_col_tiles, n_splits)](
        weight,
        col_partial,
        row_partial,
        n_rows,
        n_cols,
        weight.stride(0),
        weight.stride(1),
        rows_per_split,
        BLOCK_R=block_r,
        BLOCK_C=block_c,
        num_warps=1 if interpreting() else 4,
    )
    col_sums = col_partial[0] if n_splits == 1 else col_partial.sum(dim=0)
    row_sums = row_partial[0] if n_col_tiles == 1 else row_partial.sum(dim=0)
    return col_sums, row_sums
