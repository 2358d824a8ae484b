"""RMSNorm of the LLaMA family in one kernel: ``weight * (x * rsqrt(mean(x^2) + eps)).to(x.dtype)``.

Spec: ``wanda_kernels.reference.rms_norm_torch`` (= transformers' ``LlamaRMSNorm.forward``). x [..., D]
fp16/bf16/fp32, weight [D] fp16/bf16/fp32 -> y [..., D] contiguous, of dtype ``promote(weight, x)``.

One program per row: one read of x and one write of y, where the module as written in torch launches six
kernels (cast, square, mean, add + rsqrt, scale, weight product), which at decode sizes are six launches
of almost no work each. Numerics follow the module: the mean of squares in fp32, the normalized row rounded
to x's dtype *before* the weight product, and that product rounded once (exact in fp32 for 16-bit operands,
so it equals torch's). Only the sum's order and rsqrt's last bit can differ from torch: <= 1 ulp of x's dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from wanda_kernels._runtime import check_kernel_device, interpreting
from wanda_kernels._validate import FLOAT_DTYPES


@triton.jit
def _rms_norm_kernel(x_ptr, weight_ptr, y_ptr, stride_x_row, n_cols, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < n_cols
    x = tl.load(x_ptr + row * stride_x_row + cols, mask=ok, other=0.0).to(tl.float32)
    mean_sq = tl.sum(x * x, axis=0) / n_cols
    normed = (x * tl.math.rsqrt(mean_sq + eps)).to(x_ptr.dtype.element_ty)
    weight = tl.load(weight_ptr + cols, mask=ok, other=0.0)
    y = weight.to(tl.float32) * normed.to(tl.float32)
    tl.store(y_ptr + row * n_cols + cols, y.to(y_ptr.dtype.element_ty), mask=ok)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * (x * rsqrt(mean(x^2, -1) + eps)).to(x.dtype)``, the mean in fp32; y contiguous."""
    if not isinstance(x, torch.Tensor) or x.ndim < 1 or x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"x must be a float16/bfloat16/float32 tensor [..., D], got {getattr(x, 'shape', x)!r}")
    n_cols = x.shape[-1]
    if not isinstance(weight, torch.Tensor) or weight.shape != (n_cols,) or weight.dtype not in FLOAT_DTYPES:
        raise ValueError(f"weight must be a float tensor of shape [{n_cols}], got {getattr(weight, 'shape', weight)!r}")
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    check_kernel_device(x, weight)
    x2d = x.reshape(-1, n_cols)
    if n_cols and x2d.stride(1) != 1:
        x2d = x2d.contiguous()
    y = torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    if y.numel() == 0:
        return y
    block = triton.next_power_of_2(n_cols)
    num_warps = 1 if interpreting() else min(16, max(1, block // 512))  # ~16 values per thread
    _rms_norm_kernel[(x2d.shape[0],)](
        x2d, weight.contiguous(), y, x2d.stride(0), n_cols, float(eps), BLOCK=block, num_warps=num_warps
    )
    return y
