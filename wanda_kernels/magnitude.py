"""Wanda's magnitude baseline mask.

Spec: ``wanda_kernels.reference.magnitude_mask_torch``. Unstructured: ONE threshold for the whole
matrix, the value at index ``int(numel * sparsity)`` of the ascending sorted |W|, and every ``|w| <=``
that threshold is pruned (ties at the threshold too, as in locuslab/wanda, so slightly more than the
ratio can be pruned). N:M: the N:M kernel ranking |W| inside each group.

The threshold comes from ``select.kth_smallest`` on |W| (a device-wide radix select: four reads of W, same
value and NaN-last order as the reference's full sort) and stays on the device; the compare runs in one
Triton pass that reads the threshold from memory, so nothing syncs with the host.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from wanda_kernels._runtime import check_kernel_device, interpreting, on_input_device
from wanda_kernels._validate import check_matrix, check_nm, check_sparsity
from wanda_kernels.nm import launch_nm_select
from wanda_kernels.select import kth_smallest


@triton.jit
def _threshold_mask_kernel(
    weight_ptr,
    threshold_ptr,
    mask_ptr,
    n_rows,
    n_cols,
    stride_row,
    stride_col,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)[:, None]
    cols = (tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C))[None, :]
    valid = (rows < n_rows) & (cols < n_cols)
    w_abs = tl.abs(tl.load(weight_ptr + rows * stride_row + cols.to(tl.int64) * stride_col, mask=valid, other=0.0))
    threshold = tl.load(threshold_ptr).to(tl.float32)
    # A float compare, like the reference: a NaN threshold prunes nothing, a NaN weight is never pruned.
    prune = w_abs.to(tl.float32) <= threshold
    tl.store(mask_ptr + rows * n_cols + cols, prune.to(tl.uint8), mask=valid)


@on_input_device
def magnitude_mask(weight: torch.Tensor, sparsity: float, n: int = 0, m: int = 0) -> torch.Tensor:
    """Bool [O, C], True = prune. ``n``/``m`` > 0 selects N:M on |W|; else a per-matrix threshold."""
    check_matrix(weight, "weight")
    check_sparsity(sparsity)
    check_kernel_device(weight)
    if n or m:
        check_nm(n, m, weight.shape[1])
        return launch_nm_select(weight, None, n, m, score_mode=1, prune_weight=False)
    n_rows, n_cols = weight.shape
    mask = torch.zeros(n_rows, n_cols, dtype=torch.bool, device=weight.device)
    if sparsity == 0 or weight.numel() == 0:
        return mask
    threshold = kth_smallest(weight, int(weight.numel() * sparsity), absolute=True)
    block_c = min(triton.next_power_of_2(n_cols), 1024 if interpreting() else 256)
    block_r = min(triton.next_power_of_2(n_rows), 64 if interpreting() else 16)
    grid = (triton.cdiv(n_rows, block_r), triton.cdiv(n_cols, block_c))
    _threshold_mask_kernel[grid](
        weight,
        threshold,
        mask.view(torch.uint8),
        n_rows,
        n_cols,
        weight.stride(0),
        weight.stride(1),
        BLOCK_R=block_r,
        BLOCK_C=block_c,
    )
    return mask
