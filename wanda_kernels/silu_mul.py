"""The gated MLP's activation, ``silu(gate) * up``, in one kernel (LLaMA's ``act_fn(gate_proj(x)) * up_proj(x)``).

Spec: ``wanda_kernels.reference.silu_mul_torch``. gate and up [..., I] of one float dtype and shape, rows of
any stride with contiguous features (the two halves of a fused gate/up product are such views); returns a
contiguous [..., I] tensor of that dtype.

torch launches two kernels (silu, then the product). Numerics follow them: silu computed in fp32 as
``x / (1 + exp(-x))`` (torch's CUDA formula) and rounded to the dtype, then the product computed in fp32 and
rounded. Triton's exp is not torch's ``expf`` to the last bit (on a GPU it is the fast ``ex2.approx``), so an
fp16/bf16 result can differ from torch's by 1 ulp, rarely, and an fp32 one by a few fp32 ulps.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from wanda_kernels._runtime import check_kernel_device, interpreting, on_input_device
from wanda_kernels._validate import FLOAT_DTYPES


@triton.jit
def _silu_mul_kernel(
    gate_ptr, up_ptr, out_ptr, n_cols, stride_gate_row, stride_up_row, stride_out_row, BLOCK: tl.constexpr
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < n_cols
    gate = tl.load(gate_ptr + row * stride_gate_row + cols, mask=ok, other=0.0)
    up = tl.load(up_ptr + row * stride_up_row + cols, mask=ok, other=0.0)
    dtype = gate.dtype
    g = gate.to(tl.float32)
    activated = (g / (1.0 + tl.exp(-g))).to(dtype)  # torch's formula, rounded as its silu output is
    out = (activated.to(tl.float32) * up.to(tl.float32)).to(dtype)
    tl.store(out_ptr + row * stride_out_row + cols, out, mask=ok)


@on_input_device
def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``F.silu(gate) * up`` in one kernel."""
    if not isinstance(gate, torch.Tensor) or not isinstance(up, torch.Tensor) or gate.shape != up.shape:
        raise ValueError(
            f"gate and up must be tensors of one shape, got {getattr(gate, 'shape', gate)!r} and "
            f"{getattr(up, 'shape', up)!r}"
        )
    if gate.dtype not in FLOAT_DTYPES or up.dtype != gate.dtype:
        raise ValueError(f"gate and up must share one float dtype, got {gate.dtype} and {up.dtype}")
    if gate.ndim == 0:
        raise ValueError("gate and up must have a feature dimension")
    check_kernel_device(gate, up)
    n_cols = gate.shape[-1]
    out = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    if out.numel() == 0:
        return out
    gate2d, up2d = _rows(gate), _rows(up)
    block = min(triton.next_power_of_2(n_cols), 4096)
    grid = (gate2d.shape[0], triton.cdiv(n_cols, block))
    _silu_mul_kernel[grid](
        gate2d, up2d, out, n_cols, gate2d.stride(0), up2d.stride(0), n_cols,
        BLOCK=block, num_warps=1 if interpreting() else 4,
    )  # fmt: skip
    return out


def _rows(x: torch.Tensor) -> torch.Tensor:
    """[rows, features] with contiguous features, as a view where the strides allow (no copy of a fused half)."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    try:
        return x.view(-1, x.shape[-1])
    except RuntimeError:  # rows not evenly strided
        return x.reshape(-1, x.shape[-1]).contiguous()
