"""Calibration statistics: ``acc[c] += sum over all leading dims of x[..., c] ** 2`` in fp32.

Spec: ``wanda_kernels.reference.accumulate_sq_norms_torch``. acc fp32 [C] (updated in place), x [..., C]
fp16/bf16/fp32 with any strides that flatten to [R, C] without a copy. One read of x; no fp32 copy of x.

Column tiles run in parallel; the rows are split over a second grid axis so that a [2048, 4096] batch
still fills the GPU. Each split writes an fp32 partial sum and the partials are added in a fixed order,
so the result is deterministic (no atomics): the same calibration data always gives the same masks.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from wanda_kernels._runtime import check_kernel_device, interpreting, on_input_device, target_programs
from wanda_kernels._validate import FLOAT_DTYPES


@triton.jit
def _sq_norms_partial_kernel(
    x_ptr,
    partial_ptr,
    n_rows,
    n_cols,
    stride_row,
    stride_col,
    rows_per_split,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    split = tl.program_id(1)
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < n_cols
    row_begin = split * rows_per_split
    row_end = tl.minimum(row_begin + rows_per_split, n_rows)
    acc = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    for row0 in range(row_begin, row_end, BLOCK_R):
        rows = row0 + tl.arange(0, BLOCK_R)
        ok = (rows < row_end)[:, None] & col_ok[None, :]
        offs = rows.to(tl.int64)[:, None] * stride_row + cols.to(tl.int64)[None, :] * stride_col
        x = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        acc += x * x
    tl.store(partial_ptr + split.to(tl.int64) * n_cols + cols, tl.sum(acc, axis=0), mask=col_ok)


@on_input_device
def accumulate_sq_norms_(acc: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``acc += (x ** 2).sum(leading dims)`` accumulated in fp32, in place. Returns ``acc``."""
    if not isinstance(acc, torch.Tensor) or acc.ndim != 1 or acc.dtype != torch.float32:
        raise ValueError(f"acc must be a 1-D float32 tensor, got {getattr(acc, 'shape', acc)!r}")
    if not isinstance(x, torch.Tensor) or x.ndim < 1 or x.shape[-1] != acc.shape[0]:
        raise ValueError(f"x must have last dim {acc.shape[0]} (= acc), got shape {tuple(getattr(x, 'shape', ()))}")
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"x must be float16, bfloat16 or float32, got {x.dtype}")
    check_kernel_device(acc, x)
    n_cols = x.shape[-1]
    x2d = x.reshape(-1, n_cols)  # a view for activations laid out [..., C]
    n_rows = x2d.shape[0]
    if n_rows == 0 or n_cols == 0:
        return acc
    if interpreting():
        block_c, block_r = min(triton.next_power_of_2(n_cols), 1024), 64
    else:
        block_c, block_r = min(triton.next_power_of_2(n_cols), 256), 32
    n_col_tiles = triton.cdiv(n_cols, block_c)
    max_splits = triton.cdiv(n_rows, block_r)
    n_splits = max(1, min(max_splits, target_programs(x.device) // n_col_tiles))
    rows_per_split = triton.cdiv(triton.cdiv(n_rows, n_splits), block_r) * block_r
    n_splits = triton.cdiv(n_rows, rows_per_split)
    partial = torch.empty(n_splits, n_cols, dtype=torch.float32, device=x.device)
    _sq_norms_partial_kernel[(n_col_tiles, n_splits)](
        x2d,
        partial,
        n_rows,
        n_cols,
        x2d.stride(0),
        x2d.stride(1),
        rows_per_split,
        BLOCK_R=block_r,
        BLOCK_C=block_c,
        num_warps=1 if interpreting() else 4,
    )
    acc += partial[0] if n_splits == 1 else partial.sum(dim=0)
    return acc
