"""Channel moments for DSnoT, in place in three fp32 [C] accumulators, with x [..., C] viewed as [samples, T, C]:
``sq_norms += sum x**2``, ``sums += sum x``, ``sq_deviations += sum_s sum_t (x[s, t] - mean_t x[s, :])**2``.

Spec: ``wanda_kernels.reference_dsnot.accumulate_moments_torch`` (returns None). x fp16/bf16/fp32 with any strides
that flatten to [R, C] without a copy; no fp32 copy of x. All sums in fp32.

One program per (column tile, sample, row split). Two passes over each sample's rows, as torch's variance does:
sums first, then squared deviations from the sample's mean (no cancellation from ``E[x^2] - E[x]^2``). With
one split per sample both passes run in one program; when a sample's rows are split to fill the GPU, one
launch writes the sums, the host forms the means, and a second launch writes the deviations. Every program
writes fp32 partials, added in a fixed order on the host: deterministic, no atomics.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from wanda_kernels._runtime import check_kernel_device, interpreting, on_input_device, target_programs
from wanda_kernels._validate import FLOAT_DTYPES
from wanda_kernels.reference_dsnot import _check_moments


@triton.jit
def _moments_partial_kernel(
    x_ptr,
    mean_ptr,
    sq_partial_ptr,
    sum_partial_ptr,
    dev_partial_ptr,
    n_cols,
    rows_per_sample,
    stride_row,
    stride_col,
    rows_per_split,
    SUMS: tl.constexpr,
    DEVIATIONS: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    sample = tl.program_id(1)
    split = tl.program_id(2)
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < n_cols
    col_offs = cols.to(tl.int64)[None, :] * stride_col
    row_begin = split * rows_per_split
    row_end = tl.minimum(row_begin + rows_per_split, rows_per_sample)
    first_row = sample.to(tl.int64) * rows_per_sample
    partial = (sample.to(tl.int64) * tl.num_programs(2) + split) * n_cols + cols
    if SUMS:
        sq_acc = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
        sum_acc = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
        for row0 in range(row_begin, row_end, BLOCK_R):
            rows = row0 + tl.arange(0, BLOCK_R)
            ok = (rows < row_end)[:, None] & col_ok[None, :]
            offs = (first_row + rows)[:, None] * stride_row + col_offs
            x = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32)
            sq_acc += x * x
            sum_acc += x
        total = tl.sum(sum_acc, axis=0)
        tl.store(sq_partial_ptr + partial, tl.sum(sq_acc, axis=0), mask=col_ok)
        tl.store(sum_partial_ptr + partial, total, mask=col_ok)
    if DEVIATIONS:
        if SUMS:  # the whole sample is in this program
            count = tl.zeros([BLOCK_C], dtype=tl.float32) + rows_per_sample  # may be a constexpr 1
            mean = tl.math.div_rn(total, count)
        else:
            mean = tl.load(mean_ptr + sample.to(tl.int64) * n_cols + cols, mask=col_ok, other=0.0)
        dev_acc = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
        for row0 in range(row_begin, row_end, BLOCK_R):
            rows = row0 + tl.arange(0, BLOCK_R)
            ok = (rows < row_end)[:, None] & col_ok[None, :]
            offs = (first_row + rows)[:, None] * stride_row + col_offs
            x = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32)
            d = tl.where(ok, x - mean[None, :], 0.0)  # padding would add mean**2
            dev_acc += d * d
        tl.store(dev_partial_ptr + partial, tl.sum(dev_acc, axis=0), mask=col_ok)


@on_input_device
def accumulate_moments_(
    sq_norms: torch.Tensor, sums: torch.Tensor, sq_deviations: torch.Tensor, x: torch.Tensor, samples: int
) -> None:
    """Add x's per-channel sum of squares, sum and within-sample squared deviations to the fp32 accumulators."""
    _check_moments(sq_norms, sums, sq_deviations, x, samples)
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"x must be float16, bfloat16 or float32, got {x.dtype}")
    check_kernel_device(sq_norms, sums, sq_deviations, x)
    n_cols = x.shape[-1]
    if x.numel() == 0:
        return
    x2d = x.reshape(-1, n_cols)  # a view for activations laid out [..., C]
    rows_per_sample = x2d.shape[0] // samples
    if interpreting():
        block_c, block_r = min(triton.next_power_of_2(n_cols), 1024), 64
    else:
        block_c, block_r = min(triton.next_power_of_2(n_cols), 256), 32
    n_col_tiles = triton.cdiv(n_cols, block_c)
    max_splits = triton.cdiv(rows_per_sample, block_r)
    n_splits = max(1, min(max_splits, target_programs(x.device) // (n_col_tiles * samples)))
    rows_per_split = triton.cdiv(triton.cdiv(rows_per_sample, n_splits), block_r) * block_r
    n_splits = triton.cdiv(rows_per_sample, rows_per_split)
    sq_partial, sum_partial, dev_partial = (
        torch.empty(samples * n_splits, n_cols, dtype=torch.float32, device=x.device) for _ in range(3)
    )

    def launch(mean: torch.Tensor, sums_pass: bool, deviations_pass: bool) -> None:
        _moments_partial_kernel[(n_col_tiles, samples, n_splits)](
            x2d,
            mean,
            sq_partial,
            sum_partial,
            dev_partial,
            n_cols,
            rows_per_sample,
            x2d.stride(0),
            x2d.stride(1),
            rows_per_split,
            SUMS=sums_pass,
            DEVIATIONS=deviations_pass,
            BLOCK_R=block_r,
            BLOCK_C=block_c,
            num_warps=1 if interpreting() else 4,
        )

    if n_splits == 1:
        launch(sum_partial, True, True)  # mean_ptr unused
    else:
        launch(sum_partial, True, False)
        mean = sum_partial.view(samples, n_splits, n_cols).sum(dim=1) / rows_per_sample
        launch(mean, False, True)
    sq_norms += sq_partial.sum(dim=0)
    sums += sum_partial.sum(dim=0)
    sq_deviations += dev_partial.sum(dim=0)
