"""DSnoT's swap loops: per row, repeatedly regrow one pruned weight and prune one kept weight so that the row's
reconstruction error ``e = sum over pruned j of dsnot_metric_j`` shrinks; ``mask`` (bool [O, C], True = pruned)
is updated in place and returned.

Spec: ``wanda_kernels.reference_dsnot.dsnot_unstructured_torch`` and ``dsnot_nm_torch`` (same signatures, same
checks). Each cycle, per live row: regrow ``regrow_order[hi]`` (e > 0, hi moves down) or ``regrow_order[lo]``
(lo moves up); unstructured, prune ``prune_order[lo]`` (e >= 0) or ``prune_order[hi]`` (e < 0) within the
row's ``prune_counts`` kept columns; N:M, prune the first minimum of ``prune_metric`` in the regrown entry's group
of ``m`` (torch.argmin's choice) and set it to +inf. The swap happens, and the row stays live, only if both
positions are in range, the regrown entry is pruned, the pruned one kept, ``|e| > update_threshold`` (fp32, as
torch compares) and (N:M) ``sign((e + pv) - rv) == sign(e_initial)``; then ``e = (e + pv) - rv`` in fp32, as published.

Rows are independent, so one program walks BLOCK_R rows in lockstep until all are dead or ``max_cycles`` is
reached, gathering at per-row positions and scattering into the mask. Same fp32 operations in the same order
as the reference: the mask (and N:M ``prune_metric``) are exactly torch's. An index outside [0, C) in
``regrow_order`` or ``prune_order`` stops its row here, where the reference raises an IndexError.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from wanda_kernels._runtime import check_kernel_device, interpreting, on_input_device
from wanda_kernels.reference_dsnot import _check_dsnot

INDEX_DTYPES = (torch.int32, torch.int64)


@triton.jit
def _dsnot_unstructured_kernel(
    mask_ptr,
    metric_ptr,
    regrow_ptr,
    prune_ptr,
    counts_ptr,
    error_ptr,
    n_rows,
    n_cols,
    stride_mask_r,
    stride_mask_c,
    stride_metric_r,
    stride_metric_c,
    stride_regrow_r,
    stride_regrow_c,
    stride_prune_r,
    stride_prune_c,
    update_threshold,
    max_cycles,
    BLOCK_R: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    alive = rows < n_rows
    rows = rows.to(tl.int64)
    mask_row = mask_ptr + rows * stride_mask_r
    metric_row = metric_ptr + rows * stride_metric_r
    regrow_row = regrow_ptr + rows * stride_regrow_r
    prune_row = prune_ptr + rows * stride_prune_r
    err = tl.load(error_ptr + rows, mask=alive, other=0.0)
    counts = tl.load(counts_ptr + rows, mask=alive, other=0)
    regrow_lo = tl.zeros([BLOCK_R], dtype=tl.int64)
    regrow_hi = regrow_lo + (n_cols - 1)
    prune_lo = tl.zeros([BLOCK_R], dtype=tl.int64)
    prune_hi = counts - 1
    ones = tl.full([BLOCK_R], 1, dtype=tl.uint8)
    zeros = tl.zeros([BLOCK_R], dtype=tl.uint8)
    cycle = 0
    while (cycle < max_cycles) & (tl.max(alive.to(tl.int32), axis=0) > 0):
        from_end = err > 0
        r_pos = tl.where(from_end, regrow_hi, regrow_lo)
        regrow_hi = tl.where(from_end, regrow_hi - 1, regrow_hi)
        regrow_lo = tl.where(from_end, regrow_lo, regrow_lo + 1)
        from_kept_end = err < 0
        p_pos = tl.where(from_kept_end, prune_hi, prune_lo)
        prune_hi = tl.where(from_kept_end, prune_hi - 1, prune_hi)
        prune_lo = tl.where(from_kept_end, prune_lo, prune_lo + 1)
        live = alive & (r_pos >= 0) & (r_pos < n_cols) & (p_pos >= 0) & (p_pos < counts)
        # The reference clamps the gather position: prune_counts > C reads prune_order's last column.
        p_pos = tl.minimum(p_pos, n_cols - 1)
        r = tl.load(regrow_row + r_pos * stride_regrow_c, mask=live, other=0).to(tl.int64)
        p = tl.load(prune_row + p_pos * stride_prune_c, mask=live, other=0).to(tl.int64)
        live = live & (r >= 0) & (r < n_cols) & (p >= 0) & (p < n_cols) & (r != p)
        r_pruned = tl.load(mask_row + r * stride_mask_c, mask=live, other=0) != 0
        p_kept = tl.load(mask_row + p * stride_mask_c, mask=live, other=1) == 0
        swap = live & r_pruned & p_kept & (tl.abs(err) > update_threshold)
        r_metric = tl.load(metric_row + r * stride_metric_c, mask=swap, other=0.0)
        p_metric = tl.load(metric_row + p * stride_metric_c, mask=swap, other=0.0)
        err = (err + tl.where(swap, p_metric, 0.0)) - tl.where(swap, r_metric, 0.0)
        tl.store(mask_row + p * stride_mask_c, ones, mask=swap)
        tl.store(mask_row + r * stride_mask_c, zeros, mask=swap)
        alive = swap
        cycle += 1
        # Next cycle's gathers may read what another thread of this program stored.
        tl.debug_barrier()


@triton.jit
def _dsnot_nm_kernel(
    mask_ptr,
    metric_ptr,
    prune_metric_ptr,
    regrow_ptr,
    error_ptr,
    n_rows,
    n_cols,
    m,
    stride_mask_r,
    stride_mask_c,
    stride_metric_r,
    stride_metric_c,
    stride_prune_metric_r,
    stride_prune_metric_c,
    stride_regrow_r,
    stride_regrow_c,
    update_threshold,
    max_cycles,
    BLOCK_R: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    alive = rows < n_rows
    rows = rows.to(tl.int64)
    mask_row = mask_ptr + rows * stride_mask_r
    metric_row = metric_ptr + rows * stride_metric_r
    prune_metric_row = prune_metric_ptr + rows * stride_prune_metric_r
    regrow_row = regrow_ptr + rows * stride_regrow_r
    err = tl.load(error_ptr + rows, mask=alive, other=0.0)
    # torch.sign as (x > 0) - (x < 0): NaN has sign 0, as in torch.
    sign0 = (err > 0).to(tl.int32) - (err < 0).to(tl.int32)
    regrow_lo = tl.zeros([BLOCK_R], dtype=tl.int64)
    regrow_hi = regrow_lo + (n_cols - 1)
    ones = tl.full([BLOCK_R], 1, dtype=tl.uint8)
    zeros = tl.zeros([BLOCK_R], dtype=tl.uint8)
    infs = tl.full([BLOCK_R], float("inf"), dtype=tl.float32)
    cycle = 0
    while (cycle < max_cycles) & (tl.max(alive.to(tl.int32), axis=0) > 0):
        from_end = err > 0
        r_pos = tl.where(from_end, regrow_hi, regrow_lo)
        regrow_hi = tl.where(from_end, regrow_hi - 1, regrow_hi)
        regrow_lo = tl.where(from_end, regrow_lo, regrow_lo + 1)
        live = alive & (r_pos >= 0) & (r_pos < n_cols)
        r = tl.load(regrow_row + r_pos * stride_regrow_c, mask=live, other=0).to(tl.int64)
        live = live & (r >= 0) & (r < n_cols)
        group = prune_metric_row + (r - r % m) * stride_prune_metric_c
        # torch.argmin over the group: the first minimum, strict <; a NaN counts as the minimum (first NaN wins).
        best = tl.load(group, mask=live, other=0.0)
        best_j = tl.zeros([BLOCK_R], dtype=tl.int32)
        for j in range(1, m):
            value = tl.load(group + j * stride_prune_metric_c, mask=live, other=0.0)
            take = (value < best) | ((value != value) & (best == best))
            best = tl.where(take, value, best)
            best_j = tl.where(take, j, best_j)
        p = r - r % m + best_j
        r_pruned = tl.load(mask_row + r * stride_mask_c, mask=live, other=0) != 0
        p_kept = tl.load(mask_row + p * stride_mask_c, mask=live, other=1) == 0
        r_metric = tl.load(metric_row + r * stride_metric_c, mask=live, other=0.0)
        p_metric = tl.load(metric_row + p * stride_metric_c, mask=live, other=0.0)
        after = err + p_metric - r_metric  # the reference's (err + pv) - rv, rounded as written
        sign_after = (after > 0).to(tl.int32) - (after < 0).to(tl.int32)
        swap = live & r_pruned & p_kept & (tl.abs(err) > update_threshold) & (sign_after == sign0)
        err = (err + tl.where(swap, p_metric, 0.0)) - tl.where(swap, r_metric, 0.0)
        tl.store(prune_metric_row + p * stride_prune_metric_c, infs, mask=swap)
        tl.store(mask_row + p * stride_mask_c, ones, mask=swap)
        tl.store(mask_row + r * stride_mask_c, zeros, mask=swap)
        alive = swap
        cycle += 1
        tl.debug_barrier()  # as in the unstructured kernel


@on_input_device
def dsnot_unstructured_(
    mask: torch.Tensor,
    dsnot_metric: torch.Tensor,
    regrow_order: torch.Tensor,
    prune_order: torch.Tensor,
    prune_counts: torch.Tensor,
    error: torch.Tensor,
    update_threshold: float,
    max_cycles: int,
) -> torch.Tensor:
    """DSnoT's unstructured swaps on ``mask`` (bool [O, C], True = pruned), in place; returns ``mask``."""
    n_rows, n_cols = _check_dsnot(mask, dsnot_metric, regrow_order, error, max_cycles)
    if prune_order.shape != mask.shape or prune_counts.shape != (n_rows,):
        raise ValueError("prune_order must be [O, C] and prune_counts [O], like mask")
    if prune_order.dtype not in INDEX_DTYPES:
        raise ValueError(f"prune_order must be int64 or int32 (column indices), got {prune_order.dtype}")
    if prune_counts.dtype.is_floating_point or prune_counts.dtype.is_complex:
        raise ValueError(f"prune_counts must be an integer tensor, got {prune_counts.dtype}")
    threshold = _fp32_threshold(update_threshold)
    check_kernel_device(mask, dsnot_metric, regrow_order, prune_order, prune_counts, error)
    if n_rows == 0 or n_cols == 0 or max_cycles == 0:
        return mask
    block_r = _block_rows(n_rows)
    _dsnot_unstructured_kernel[(triton.cdiv(n_rows, block_r),)](
        mask.view(torch.uint8),
        dsnot_metric,
        regrow_order,
        prune_order,
        prune_counts.to(torch.int64).contiguous(),
        error.to(torch.float32).contiguous(),
        n_rows,
        n_cols,
        *mask.stride(),
        *dsnot_metric.stride(),
        *regrow_order.stride(),
        *prune_order.stride(),
        threshold,
        max_cycles,
        BLOCK_R=block_r,
        num_warps=1,
    )
    return mask


@on_input_device
def dsnot_nm_(
    mask: torch.Tensor,
    dsnot_metric: torch.Tensor,
    prune_metric: torch.Tensor,
    regrow_order: torch.Tensor,
    error: torch.Tensor,
    m: int,
    update_threshold: float,
    max_cycles: int,
) -> torch.Tensor:
    """DSnoT's N:M swaps on ``mask``, in place (``prune_metric`` is overwritten); returns ``mask``."""
    n_rows, n_cols = _check_dsnot(mask, dsnot_metric, regrow_order, error, max_cycles)
    if prune_metric.shape != mask.shape or prune_metric.dtype != torch.float32:
        raise ValueError("prune_metric must be float32 [O, C], like mask")
    if not isinstance(m, int) or m <= 0 or n_cols % m:
        raise ValueError(f"in_features ({n_cols}) must be a multiple of m ({m})")
    threshold = _fp32_threshold(update_threshold)
    check_kernel_device(mask, dsnot_metric, prune_metric, regrow_order, error)
    if n_rows == 0 or n_cols == 0 or max_cycles == 0:
        return mask
    block_r = _block_rows(n_rows)
    _dsnot_nm_kernel[(triton.cdiv(n_rows, block_r),)](
        mask.view(torch.uint8),
        dsnot_metric,
        prune_metric,
        regrow_order,
        error.to(torch.float32).contiguous(),
        n_rows,
        n_cols,
        int(m),
        *mask.stride(),
        *dsnot_metric.stride(),
        *prune_metric.stride(),
        *regrow_order.stride(),
        threshold,
        max_cycles,
        BLOCK_R=block_r,
        num_warps=1,
    )
    return mask


def _fp32_threshold(update_threshold: float) -> float:
    """The threshold as torch compares it with an fp32 error: rounded to fp32 (0.1 -> 0.10000000149...)."""
    if isinstance(update_threshold, bool) or not isinstance(update_threshold, (int, float)):
        raise ValueError(f"update_threshold must be a number, got {update_threshold!r}")
    return torch.tensor(float(update_threshold), dtype=torch.float32).item()


def _block_rows(n_rows: int) -> int:
    # One warp, one row per thread on a GPU; wider under the interpreter, whose cost is per program step.
    return min(triton.next_power_of_2(n_rows), 64 if interpreting() else 32)
