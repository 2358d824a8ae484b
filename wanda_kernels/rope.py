"""Rotary position embedding of queries and keys in one kernel (transformers' ``apply_rotary_pos_emb``).

Spec: ``wanda_kernels.reference.rotary_torch``: ``x * cos + rotate_half(x) * sin`` for x = q and x = k, where
``rotate_half(x) = cat(-x[..., D/2:], x[..., :D/2])``. q [B, Hq, T, D], k [B, Hk, T, D] (any strides, as the
attention's transposed projections are), cos and sin [B or 1, T, D], all one float dtype; returns
(q_rot, k_rot) with the strides of q and k. Bit-identical to the torch expression: each product rounded to the
input dtype, then their sum rounded, no FMA contraction. One program per (batch, position), all heads.
Design notes (vs torch's ten kernels): docs/kernels.md.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from wanda_kernels._runtime import check_kernel_device, interpreting, on_input_device
from wanda_kernels._validate import FLOAT_DTYPES


@triton.jit
def _rotate_heads(src_ptr, dst_ptr, s_b, s_h, s_t, d_b, d_h, d_t, b, t, n_heads, cos, sin, dims, partner, sign,
                  dim_ok, BLOCK_H: tl.constexpr):  # fmt: skip
    for h0 in range(0, n_heads, BLOCK_H):
        heads = (h0 + tl.arange(0, BLOCK_H)).to(tl.int64)
        ok = (heads < n_heads)[:, None] & dim_ok[None, :]
        row = src_ptr + b * s_b + t * s_t + heads[:, None] * s_h
        x = tl.load(row + dims[None, :], mask=ok, other=0.0)
        dtype = x.dtype
        # rotate_half: the partner element, negated in the first half (exact). All arithmetic is in fp32 (the
        # interpreter cannot multiply bf16), each product rounded to the tensor dtype, then the sum: torch's.
        rotated = tl.load(row + partner[None, :], mask=ok, other=0.0).to(tl.float32) * sign[None, :]
        x_cos = (x.to(tl.float32) * cos[None, :].to(tl.float32)).to(dtype)
        rotated_sin = (rotated * sin[None, :].to(tl.float32)).to(dtype)
        out = (x_cos.to(tl.float32) + rotated_sin.to(tl.float32)).to(dtype)
        tl.store(dst_ptr + b * d_b + t * d_t + heads[:, None] * d_h + dims[None, :], out, mask=ok)


@triton.jit
def _rotary_kernel(
    q_ptr, k_ptr, cos_ptr, sin_ptr, q_out_ptr, k_out_ptr,
    n_pos, n_q_heads, n_k_heads, head_dim,
    sq_b, sq_h, sq_t, sk_b, sk_h, sk_t, sqo_b, sqo_h, sqo_t, sko_b, sko_h, sko_t, sc_b, sc_t,
    BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    b = (pid // n_pos).to(tl.int64)
    t = (pid % n_pos).to(tl.int64)
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < head_dim
    half = head_dim // 2
    partner = tl.where(dims < half, dims + half, dims - half)
    sign = tl.where(dims < half, -1.0, 1.0)
    cos = tl.load(cos_ptr + b * sc_b + t * sc_t + dims, mask=dim_ok, other=0.0)
    sin = tl.load(sin_ptr + b * sc_b + t * sc_t + dims, mask=dim_ok, other=0.0)
    _rotate_heads(q_ptr, q_out_ptr, sq_b, sq_h, sq_t, sqo_b, sqo_h, sqo_t, b, t, n_q_heads, cos, sin, dims, partner,
                  sign, dim_ok, BLOCK_H)  # fmt: skip
    _rotate_heads(k_ptr, k_out_ptr, sk_b, sk_h, sk_t, sko_b, sko_h, sko_t, b, t, n_k_heads, cos, sin, dims, partner,
                  sign, dim_ok, BLOCK_H)  # fmt: skip


def _check(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    for name, t in (("q", q), ("k", k)):
        if not isinstance(t, torch.Tensor) or t.ndim != 4:
            shape = getattr(t, "shape", t)
            raise ValueError(f"{name} must be a 4-D tensor [batch, heads, positions, head_dim], got {shape!r}")
    batch, _, n_pos, head_dim = q.shape
    if k.shape[0] != batch or k.shape[2:] != q.shape[2:]:
        raise ValueError(f"k must be [{batch}, heads, {n_pos}, {head_dim}] like q, got {tuple(k.shape)}")
    if head_dim % 2:
        raise ValueError(f"head_dim must be even (rotate_half splits it), got {head_dim}")
    for name, t in (("cos", cos), ("sin", sin)):
        ok = isinstance(t, torch.Tensor) and t.ndim == 3 and t.shape[0] in (1, batch)
        if not ok or t.shape[1:] != (n_pos, head_dim):
            raise ValueError(f"{name} must be [{batch} or 1, {n_pos}, {head_dim}], got {getattr(t, 'shape', t)!r}")
    dtypes = (q.dtype, k.dtype, cos.dtype, sin.dtype)
    if q.dtype not in FLOAT_DTYPES or len(set(dtypes)) != 1:
        raise ValueError(f"q, k, cos and sin must share one float dtype, got {', '.join(map(str, dtypes))}")


@on_input_device
def rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin)``, cos/sin broadcast over heads."""
    _check(q, k, cos, sin)
    check_kernel_device(q, k, cos, sin)
    batch, n_q_heads, n_pos, head_dim = q.shape
    q_out, k_out = torch.empty_like(q), torch.empty_like(k)
    if q.numel() == 0 and k.numel() == 0:
        return q_out, k_out
    if q.stride(3) != 1 or k.stride(3) != 1 or q_out.stride(3) != 1 or k_out.stride(3) != 1:
        q, k = q.contiguous(), k.contiguous()
        q_out, k_out = torch.empty_like(q), torch.empty_like(k)
    cos, sin = cos.expand(batch, n_pos, head_dim), sin.expand(batch, n_pos, head_dim)  # stride 0 where broadcast
    if cos.stride() != sin.stride() or cos.stride(2) != 1:
        cos, sin = cos.contiguous(), sin.contiguous()
    block_d = triton.next_power_of_2(head_dim)
    block_h = min(triton.next_power_of_2(max(n_q_heads, k.shape[1])), max(1, 4096 // block_d))
    _rotary_kernel[(batch * n_pos,)](
        q, k, cos, sin, q_out, k_out, n_pos, n_q_heads, k.shape[1], head_dim,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        q_out.stride(0), q_out.stride(1), q_out.stride(2), k_out.stride(0), k_out.stride(1), k_out.stride(2),
        cos.stride(0), cos.stride(1),
        BLOCK_D=block_d, BLOCK_H=block_h, num_warps=1 if interpreting() else 4,
        enable_fp_fusion=False,  # fp32: round x * cos before adding, as torch does
    )  # fmt: skip
    return q_out, k_out
