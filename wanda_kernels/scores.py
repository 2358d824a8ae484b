"""Wanda scores: ``|W| * sqrt(act_sq_norms)[None, :]`` as an fp32 [O, C] matrix.

Spec: ``wanda_kernels.reference.wanda_scores_torch``. weight [O, C] fp16/bf16/fp32 (any strides),
act_sq_norms fp32 [C] -> fp32 [O, C] contiguous. The sqrt is taken once on the host with torch (a [C]
vector), so each score is exactly fp32(|w|) times the correctly rounded fp32 sqrt, bit-identical to torch.
The pruning path does not need this matrix: ``wanda_prune_`` forms the same products in registers.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from wanda_kernels._keys import load_scores
from wanda_kernels._runtime import check_kernel_device, interpreting, on_input_device
from wanda_kernels._validate import check_act_sq_norms, check_matrix


@triton.jit
def _wanda_scores_kernel(
    weight_ptr, norm_ptr, out_ptr, n_rows, n_cols, stride_row, stride_col, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr
):
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)[:, None]
    cols = (tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C))[None, :]
    valid = (rows < n_rows) & (cols < n_cols)
    scores = load_scores(weight_ptr, norm_ptr, rows * stride_row + cols.to(tl.int64) * stride_col, cols, valid, 2)
    tl.store(out_ptr + rows * n_cols + cols, scores, mask=valid)


@on_input_device
def wanda_scores(weight: torch.Tensor, act_sq_norms: torch.Tensor) -> torch.Tensor:
    """fp32 [O, C] = ``|W| * sqrt(act_sq_norms)[None, :]``."""
    check_matrix(weight, "weight")
    check_act_sq_norms(act_sq_norms, weight)
    check_kernel_device(weight, act_sq_norms)
    n_rows, n_cols = weight.shape
    out = torch.empty(n_rows, n_cols, dtype=torch.float32, device=weight.device)
    if out.numel() == 0:
        return out
    act_norms = torch.sqrt(act_sq_norms)
    block_c = min(triton.next_power_of_2(n_cols), 1024 if interpreting() else 256)
    block_r = min(triton.next_power_of_2(n_rows), 64 if interpreting() else 16)
    grid = (triton.cdiv(n_rows, block_r), triton.cdiv(n_cols, block_c))
    _wanda_scores_kernel[grid](
        weight, act_norms, out, n_rows, n_cols, weight.stride(0), weight.stride(1), BLOCK_R=block_r, BLOCK_C=block_c
    )
    return out
