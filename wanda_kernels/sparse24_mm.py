"""``y = x @ W.T (+ bias)`` with W in the 2:4 packed format, for small M (decode).

Spec: ``wanda_kernels.reference.sparse24_linear_torch`` (= ``F.linear(x, unpack_24(values, meta), bias)``).
x [..., C] and values [O, C/2] share a float dtype; meta uint8 [O, C/8] (format: ``wanda_kernels.pack24``);
bias [O] or None -> y [..., O] contiguous, in x's dtype, accumulated in fp32.

Decode is memory-bound: a dense GEMV reads 16 bits per weight, this kernel reads each kept value once and
2 bits of index (9 bits per original weight), so its ceiling is 16/9 = 1.78x. Each program owns BLOCK_O
output rows; per step it loads BLOCK_K kept values and their indices, turns the indices into input
columns, and gathers the matching x entries (x is small and stays in L1/L2).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from wanda_kernels._runtime import check_kernel_device, interpreting, tuning_configs
from wanda_kernels._validate import FLOAT_DTYPES


@triton.jit
def _sparse24_linear_kernel(
    x_ptr,
    values_ptr,
    meta_ptr,
    bias_ptr,
    y_ptr,
    n_tokens,
    n_out,
    n_cols,
    stride_x,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_O: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    tokens = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    outs = (tl.program_id(0) * BLOCK_O + tl.arange(0, BLOCK_O)).to(tl.int64)
    token_ok = tokens < n_tokens
    out_ok = outs < n_out
    n_kept = n_cols // 2
    acc = tl.zeros([BLOCK_M, BLOCK_O], dtype=tl.float32)
    for k0 in range(0, n_kept, BLOCK_K):
        kept = k0 + tl.arange(0, BLOCK_K)
        ok = out_ok[:, None] & (kept < n_kept)[None, :]
        values = tl.load(values_ptr + outs[:, None] * n_kept + kept[None, :], mask=ok, other=0.0)
        meta = tl.load(meta_ptr + outs[:, None] * (n_cols // 8) + (kept // 4)[None, :], mask=ok, other=0)
        member = (meta.to(tl.int32) >> (2 * (kept % 4))[None, :]) & 3
        cols = (kept // 2 * 4)[None, :] + member  # [BLOCK_O, BLOCK_K] input column of each kept value
        x = tl.load(
            x_ptr + tokens.to(tl.int64)[:, None, None] * stride_x + cols[None, :, :],
            mask=token_ok[:, None, None] & ok[None, :, :],
            other=0.0,
        )
        acc += tl.sum(x.to(tl.float32) * values.to(tl.float32)[None, :, :], axis=2)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + outs, mask=out_ok, other=0.0).to(tl.float32)[None, :]
    y_offs = tokens.to(tl.int64)[:, None] * n_out + outs[None, :]
    tl.store(y_ptr + y_offs, acc.to(y_ptr.dtype.element_ty), mask=token_ok[:, None] & out_ok[None, :])


# Output rows per program x kept values per step x warps, measured per shape on first use on a GPU
# (decode GEMV: enough programs to cover every SM vs. enough bytes in flight per program).
_GPU_TILES = [(8, 128, 2), (16, 128, 4), (16, 256, 4), (32, 128, 4), (32, 256, 8), (64, 64, 4)]
_sparse24_linear_tuned = triton.autotune(
    configs=tuning_configs(
        [triton.Config({"BLOCK_O": o, "BLOCK_K": k}, num_warps=w) for o, k, w in _GPU_TILES],
        triton.Config({"BLOCK_O": 64, "BLOCK_K": 256}, num_warps=1)
        if interpreting()
        else triton.Config({"BLOCK_O": 16, "BLOCK_K": 128}, num_warps=4),
    ),
    key=["n_out", "n_cols", "BLOCK_M", "HAS_BIAS"],
)(_sparse24_linear_kernel)


def sparse24_linear(
    x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``F.linear(x, W, bias)`` for W given as 2:4 packed (values [O, C/2], meta uint8 [O, C/8])."""
    if values.ndim != 2 or values.dtype not in FLOAT_DTYPES:
        raise ValueError(f"values must be a 2-D float tensor [O, C/2], got {tuple(values.shape)} {values.dtype}")
    n_out, n_kept = values.shape
    n_cols = 2 * n_kept
    if meta.dtype != torch.uint8 or meta.shape != (n_out, n_cols // 8):
        raise ValueError(f"meta must be uint8 [{n_out}, {n_cols // 8}], got {meta.dtype} {tuple(meta.shape)}")
    if x.shape[-1] != n_cols or x.dtype != values.dtype:
        raise ValueError(f"x must be [..., {n_cols}] {values.dtype}, got {tuple(x.shape)} {x.dtype}")
    if bias is not None and (bias.shape != (n_out,) or bias.dtype != values.dtype):
        raise ValueError(f"bias must be [{n_out}] {values.dtype}, got {tuple(bias.shape)} {bias.dtype}")
    check_kernel_device(x, values, meta, *([bias] if bias is not None else []))
    x2d = x.reshape(-1, n_cols)
    if x2d.stride(1) != 1:
        x2d = x2d.contiguous()
    n_tokens = x2d.shape[0]
    y = torch.empty(n_tokens, n_out, dtype=x.dtype, device=x.device)
    if y.numel() == 0:
        return y.reshape(*x.shape[:-1], n_out)
    block_m = min(triton.next_power_of_2(n_tokens), 4)

    def grid(meta):
        return triton.cdiv(n_out, meta["BLOCK_O"]), triton.cdiv(n_tokens, block_m)

    _sparse24_linear_tuned[grid](
        x2d, values.contiguous(), meta.contiguous(), bias if bias is not None else values, y,
        n_tokens, n_out, n_cols, x2d.stride(0), HAS_BIAS=bias is not None, BLOCK_M=block_m,
    )  # fmt: skip
    return y.reshape(*x.shape[:-1], n_out)
