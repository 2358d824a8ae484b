"""RMSNorm of the LLaMA family in one kernel: ``weight * (x * rsqrt(mean(x^2) + eps)).to(x.dtype)``; and
``add_rms_norm``, the residual sum that precedes it, in the same kernel.

Spec: ``wanda_kernels.reference.rms_norm_torch`` (= transformers' ``LlamaRMSNorm.forward``). x [..., D]
fp16/bf16/fp32, weight [D] fp16/bf16/fp32 -> y [..., D] contiguous, of dtype ``promote(weight, x)``. One program
per row. Numerics follow the module: the mean of squares in fp32, the normalized row rounded to x's dtype *before*
the weight product, and that product rounded once. Only the sum's order and rsqrt's last bit can differ from
torch: <= 1 ulp of x's dtype. Design notes (vs torch's six kernels): docs/kernels.md.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from wanda_kernels._runtime import check_kernel_device, interpreting, on_input_device
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


@triton.jit
def _add_rms_norm_kernel(
    residual_ptr, delta_ptr, weight_ptr, sum_ptr, y_ptr, stride_residual_row, stride_delta_row, n_cols, eps,
    BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < n_cols
    residual = tl.load(residual_ptr + row * stride_residual_row + cols, mask=ok, other=0.0)
    delta = tl.load(delta_ptr + row * stride_delta_row + cols, mask=ok, other=0.0)
    # The residual sum rounded to the dtype, as torch's ``residual + hidden_states``; then normalized as stored.
    total = (residual.to(tl.float32) + delta.to(tl.float32)).to(residual_ptr.dtype.element_ty)
    tl.store(sum_ptr + row * n_cols + cols, total, mask=ok)
    x = total.to(tl.float32)
    mean_sq = tl.sum(x * x, axis=0) / n_cols
    normed = (x * tl.math.rsqrt(mean_sq + eps)).to(residual_ptr.dtype.element_ty)
    weight = tl.load(weight_ptr + cols, mask=ok, other=0.0)
    y = weight.to(tl.float32) * normed.to(tl.float32)
    tl.store(y_ptr + row * n_cols + cols, y.to(y_ptr.dtype.element_ty), mask=ok)


@on_input_device
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


@on_input_device
def add_rms_norm(
    residual: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``total = residual + delta`` (rounded to their dtype) and ``rms_norm(total, weight, eps)``, in one kernel:
    a decoder layer's residual connection and the norm that follows it (two kernels and six in torch)."""
    for name, t in (("residual", residual), ("delta", delta)):
        if not isinstance(t, torch.Tensor) or t.ndim < 1 or t.dtype not in FLOAT_DTYPES:
            raise ValueError(
                f"{name} must be a float16/bfloat16/float32 tensor [..., D], got {getattr(t, 'shape', t)!r}"
            )
    if delta.shape != residual.shape or delta.dtype != residual.dtype:
        raise ValueError(
            f"residual and delta must share shape and dtype, got {tuple(residual.shape)} {residual.dtype} and "
            f"{tuple(delta.shape)} {delta.dtype}"
        )
    n_cols = residual.shape[-1]
    if not isinstance(weight, torch.Tensor) or weight.shape != (n_cols,) or weight.dtype not in FLOAT_DTYPES:
        raise ValueError(f"weight must be a float tensor of shape [{n_cols}], got {getattr(weight, 'shape', weight)!r}")
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    check_kernel_device(residual, delta, weight)
    residual2d, delta2d = residual.reshape(-1, n_cols), delta.reshape(-1, n_cols)
    if n_cols and (residual2d.stride(1) != 1 or delta2d.stride(1) != 1):
        residual2d, delta2d = residual2d.contiguous(), delta2d.contiguous()
    total = torch.empty(residual.shape, dtype=residual.dtype, device=residual.device)
    y = torch.empty(residual.shape, dtype=torch.promote_types(weight.dtype, residual.dtype), device=residual.device)
    if y.numel() == 0:
        return total, y
    block = triton.next_power_of_2(n_cols)
    num_warps = 1 if interpreting() else min(16, max(1, block // 512))
    _add_rms_norm_kernel[(residual2d.shape[0],)](
        residual2d, delta2d, weight.contiguous(), total, y, residual2d.stride(0), delta2d.stride(0), n_cols,
        float(eps), BLOCK=block, num_warps=num_warps,
    )  # fmt: skip
    return total, y
