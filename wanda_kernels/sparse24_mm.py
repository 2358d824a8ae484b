"""``y = x @ W.T (+ bias)`` with W in the 2:4 packed format, for small M (decode).

Spec: ``wanda_kernels.reference.sparse24_linear_torch`` (= ``F.linear(x, unpack_24(values, meta), bias)``).
x [..., C] and values [O, C/2] share a float dtype; meta uint8 [O, C/8] (format: ``wanda_kernels.pack24``);
bias [O] or None -> y [..., O] contiguous, in x's dtype, accumulated in fp32.
Each program owns BLOCK_O output rows and every token of the call (up to 16), so the packed weight is read once;
the autotuner picks per shape how it multiplies (``PATH_*``: gather, gather-reduce, select for one token, or dot
on tensor cores with the token tile padded to 16 rows).
Design notes (the 16/9 ceiling, each path, compiler statistics): docs/kernels.md.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from wanda_kernels._runtime import check_kernel_device, interpreting, on_input_device, tuning_configs
from wanda_kernels._validate import FLOAT_DTYPES

PATH_GATHER, PATH_DOT, PATH_GATHER_REDUCE, PATH_SELECT = 0, 1, 2, 3  # how a program multiplies (module docstring)
DOT_ROWS = 16  # tl.dot's smallest M: the tensor-core path pads the token tile to this many rows
_DOT_ROWS = tl.constexpr(DOT_ROWS)


@triton.jit
def _dense_weight_tile(values_ptr, meta_ptr, outs, out_ok, g0, n_groups, n_kept, meta_stride, BLOCK_G: tl.constexpr):
    """The dense-with-zeros weight [BLOCK_O, 4 * BLOCK_G] of groups g0.. (4 columns each), rebuilt in registers."""
    groups = g0 + tl.arange(0, BLOCK_G)
    ok = out_ok[:, None] & (groups < n_groups)[None, :]
    byte = tl.load(meta_ptr + outs[:, None] * meta_stride + (groups >> 1)[None, :], mask=ok, other=0).to(tl.int32)
    positions = byte >> ((groups & 1) * 4)[None, :]  # this group's nibble: first position, then second
    p0 = positions & 3
    p1 = (positions >> 2) & 3
    if values_ptr.dtype.element_ty.primitive_bitwidth == 16:
        # A group's kept pair is one 32-bit word w = v0 | v1 << 16, and its dense columns are two words:
        # (d0, d1) and (d2, d3). With p0 < p1 (format) each is w, one half of w moved, or zero.
        words = values_ptr.to(tl.pointer_type(tl.int32))
        w = tl.load(words + outs[:, None] * (n_kept // 2) + groups[None, :], mask=ok, other=0)
        low = tl.where(p0 == 0, tl.where(p1 == 1, w, w & 0xFFFF), tl.where(p0 == 1, w << 16, 0))
        high = tl.where(p1 == 3, tl.where(p0 == 2, w, w & -65536), tl.where(p1 == 2, (w >> 16) & 0xFFFF, 0))
        dtype = values_ptr.dtype.element_ty
        d0 = low.to(tl.int16).to(dtype, bitcast=True)
        d1 = (low >> 16).to(tl.int16).to(dtype, bitcast=True)
        d2 = high.to(tl.int16).to(dtype, bitcast=True)
        d3 = (high >> 16).to(tl.int16).to(dtype, bitcast=True)
    else:
        kept = 2 * groups[:, None] + tl.arange(0, 2)[None, :]  # [G, 2]
        pair = tl.load(values_ptr + outs[:, None, None] * n_kept + kept[None, :, :], mask=ok[:, :, None], other=0.0)
        v0, v1 = tl.split(pair)
        zero = tl.zeros_like(v0)
        # The format keeps a group's two positions in increasing order (p0 < p1), so column 0 can only hold the
        # first kept value and column 3 only the second.
        d0 = tl.where(p0 == 0, v0, zero)
        d1 = tl.where(p0 == 1, v0, tl.where(p1 == 1, v1, zero))
        d2 = tl.where(p0 == 2, v0, tl.where(p1 == 2, v1, zero))
        d3 = tl.where(p1 == 3, v1, zero)
    # join(join(d0, d2), join(d1, d3))[..., q, p] = d_{2q+p}: row-major over (q, p) is column order 0..3
    quad = tl.join(tl.join(d0, d2), tl.join(d1, d3))
    return tl.reshape(quad, [quad.shape[0], 4 * BLOCK_G])


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
    n_kept,
    meta_stride,
    stride_x,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_O: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PATH: tl.constexpr,
):
    # n_kept and meta_stride are arguments so that the launcher sees they divide by 16 (vectorized row loads);
    # the index arithmetic is unsigned. Token tiles vary fastest: tiles sharing a weight block reuse it from L2.
    # Why (SASS lengths under triton 3.6 and 3.9): docs/kernels.md.
    token0 = tl.program_id(0) * BLOCK_M
    outs = (tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)).to(tl.int64)
    out_ok = outs < n_out
    if PATH == 1:  # PATH_DOT
        rows = tl.arange(0, _DOT_ROWS)
        tokens = token0 + rows
        token_ok = (rows < BLOCK_M) & (tokens < n_tokens)
        x_rows = x_ptr + tokens.to(tl.int64)[:, None] * stride_x
        acc = tl.zeros([_DOT_ROWS, BLOCK_O], dtype=tl.float32)
        for k0 in range(0, n_kept, BLOCK_K):
            w = _dense_weight_tile(values_ptr, meta_ptr, outs, out_ok, k0 >> 1, n_kept // 2, n_kept, meta_stride,
                                   BLOCK_K // 2)  # fmt: skip
            dcols = 2 * k0 + tl.arange(0, 2 * BLOCK_K)
            x = tl.load(x_rows + dcols[None, :], mask=token_ok[:, None] & (dcols < n_cols)[None, :], other=0.0)
            if x_ptr.dtype.element_ty == tl.float32:
                acc = tl.dot(x, tl.trans(w), acc, input_precision="ieee")  # no TF32 rounding
            else:
                acc = tl.dot(x, tl.trans(w), acc)
    elif PATH == 3:  # PATH_SELECT, one token: the group's 4 x entries are loaded once per step for all rows
        rows = tl.arange(0, BLOCK_M)
        tokens = token0 + rows
        token_ok = tokens < n_tokens
        x_row = x_ptr + token0.to(tl.int64) * stride_x
        n_groups = n_kept // 2
        partial = tl.zeros([BLOCK_O, BLOCK_K // 2], dtype=tl.float32)
        for g0 in range(0, n_groups, BLOCK_K // 2):
            groups = g0 + tl.arange(0, BLOCK_K // 2)
            group_ok = groups < n_groups
            ok = out_ok[:, None] & group_ok[None, :]
            kept = 2 * groups[:, None] + tl.arange(0, 2)[None, :]  # [G, 2]
            pair = tl.load(values_ptr + outs[:, None, None] * n_kept + kept[None, :, :], mask=ok[:, :, None], other=0.0)
            v0, v1 = tl.split(pair)
            byte = tl.load(meta_ptr + outs[:, None] * meta_stride + (groups >> 1)[None, :], mask=ok, other=0)
            positions = byte.to(tl.int32) >> ((groups & 1) * 4)[None, :]
            p0 = positions & 3
            p1 = (positions >> 2) & 3
            quad = 4 * groups[:, None] + tl.arange(0, 4)[None, :]  # [G, 4]: the group's x entries, one load
            xq = tl.load(x_row + quad, mask=group_ok[:, None], other=0.0).to(tl.float32)
            x_even, x_odd = tl.split(tl.reshape(xq, [BLOCK_K // 2, 2, 2]))  # [g, i] = xq[g, 2i] / xq[g, 2i + 1]
            x0, x2 = tl.split(x_even)
            x1, x3 = tl.split(x_odd)
            # p0 < p1 (format): the first kept value sits in column 0-2, the second in 1-3.
            x_first = tl.where(p0 == 0, x0[None, :], tl.where(p0 == 1, x1[None, :], x2[None, :]))
            x_second = tl.where(p1 == 3, x3[None, :], tl.where(p1 == 2, x2[None, :], x1[None, :]))
            partial += v0.to(tl.float32) * x_first
            partial += v1.to(tl.float32) * x_second
        acc = tl.sum(partial, axis=1)[None, :]
    else:  # PATH_GATHER, PATH_GATHER_REDUCE: each kept value meets the x entry its index names
        rows = tl.arange(0, BLOCK_M)
        tokens = token0 + rows
        token_ok = tokens < n_tokens
        x_rows = x_ptr + tokens.to(tl.int64)[:, None, None] * stride_x
        # PATH_GATHER reduces over K once, after the loop; PATH_GATHER_REDUCE every step (fewer registers).
        # Which costs less depends on the compiler (docs/kernels.md), so both are offered.
        acc = tl.zeros([BLOCK_M, BLOCK_O], dtype=tl.float32)
        partial = tl.zeros([BLOCK_M, BLOCK_O, BLOCK_K if PATH == 0 else 1], dtype=tl.float32)
        for k0 in range(0, n_kept, BLOCK_K):
            kept = k0 + tl.arange(0, BLOCK_K)
            ok = out_ok[:, None] & (kept < n_kept)[None, :]
            values = tl.load(values_ptr + outs[:, None] * n_kept + kept[None, :], mask=ok, other=0.0)
            meta_col = kept.to(tl.uint32) // 4  # byte of each kept value's position
            meta = tl.load(meta_ptr + outs[:, None] * meta_stride + meta_col[None, :], mask=ok, other=0)
            member = (meta.to(tl.int32) >> ((kept & 3) * 2)[None, :]) & 3
            cols = ((kept >> 1) << 2)[None, :] + member  # [BLOCK_O, BLOCK_K] input column of each kept value
            x = tl.load(x_rows + cols[None, :, :], mask=token_ok[:, None, None] & ok[None, :, :], other=0.0)
            products = x.to(tl.float32) * values.to(tl.float32)[None, :, :]
            if PATH == 0:
                partial += products
            else:
                acc += tl.sum(products, axis=2)
        if PATH == 0:
            acc = tl.sum(partial, axis=2)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + outs, mask=out_ok, other=0.0).to(tl.float32)[None, :]
    y_offs = tokens.to(tl.int64)[:, None] * n_out + outs[None, :]
    tl.store(y_ptr + y_offs, acc.to(y_ptr.dtype.element_ty), mask=token_ok[:, None] & out_ok[None, :])


# Candidates, measured per shape and token count on first use on a GPU: (BLOCK_O output rows per program,
# BLOCK_K kept values per step, num_warps); ``_prune_configs`` drops those that cannot work or would spill.
# Spills, tile trade-offs and static costs: docs/kernels.md.
_GPU_CONFIGS = {
    PATH_GATHER: [(8, 128, 2), (16, 128, 4), (32, 256, 8)],
    PATH_GATHER_REDUCE: [(64, 64, 4), (32, 128, 4)],
    PATH_DOT: [(16, 64, 4), (32, 64, 4), (16, 128, 4), (32, 128, 8), (64, 32, 4), (64, 64, 4)],
    # The fewest instructions per dense weight of any path at one token (docs/kernels.md).
    PATH_SELECT: [(64, 64, 4), (32, 128, 4), (16, 256, 4), (8, 128, 2)],
}
MAX_GATHER_ROWS = 4  # the gather's work grows with the token count; past 4 tokens only tensor cores are offered
GATHER_PRODUCTS_PER_THREAD = 64  # BLOCK_M x BLOCK_O x BLOCK_K products per thread; ptxas spills past it


def _prune_configs(configs, named_args, **kwargs):
    block_m = kwargs.get("BLOCK_M", named_args.get("BLOCK_M"))
    kept = []
    for config in configs:
        if config.kwargs["PATH"] == PATH_SELECT and block_m != 1:
            continue  # written for one token
        if config.kwargs["PATH"] != PATH_DOT:
            products = block_m * config.kwargs["BLOCK_O"] * config.kwargs["BLOCK_K"]
            if block_m > MAX_GATHER_ROWS or products > GATHER_PRODUCTS_PER_THREAD * 32 * config.num_warps:
                continue
        kept.append(config)
    return kept or configs[:1]


_sparse24_linear_tuned = triton.autotune(
    configs=tuning_configs(
        [
            triton.Config({"BLOCK_O": o, "BLOCK_K": k, "PATH": path}, num_warps=w)
            for path, tiles in _GPU_CONFIGS.items()
            for o, k, w in tiles
        ],
        triton.Config({"BLOCK_O": 64, "BLOCK_K": 256, "PATH": PATH_GATHER}, num_warps=1)
        if interpreting()
        else triton.Config({"BLOCK_O": 32, "BLOCK_K": 64, "PATH": PATH_DOT}, num_warps=4),
    ),
    key=["n_out", "n_cols", "BLOCK_M", "HAS_BIAS"],
    prune_configs_by={"early_config_prune": _prune_configs},
)(_sparse24_linear_kernel)


def last_tuned_config() -> str | None:
    """The path and tile the autotuner chose for the most recent shape it measured (for benchmark records)."""
    config = getattr(_sparse24_linear_tuned, "best_config", None)
    return None if config is None else str(config)


@on_input_device
def sparse24_linear(
    x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``F.linear(x, W, bias)`` for W given as 2:4 packed (values [O, C/2], meta uint8 [O, C/8])."""
    if values.ndim != 2 or values.dtype not in FLOAT_DTYPES:
        raise ValueError(f"values must be a 2-D float tensor [O, C/2], got {tuple(values.shape)} {values.dtype}")
    n_out, n_kept = values.shape
    n_cols = 2 * n_kept
    if n_kept == 0 or n_kept % 4:  # one meta byte holds the indices of 4 kept values (2 groups of 4 columns)
        raise ValueError(f"values must be [O, C/2] with C a positive multiple of 8, got {tuple(values.shape)}")
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
    block_m = min(triton.next_power_of_2(n_tokens), DOT_ROWS)  # decode sizes: one token tile, one weight read

    def grid(meta):
        return triton.cdiv(n_tokens, block_m), triton.cdiv(n_out, meta["BLOCK_O"])

    _sparse24_linear_tuned[grid](
        x2d, values.contiguous(), meta.contiguous(), values if bias is None else bias.contiguous(), y,
        n_tokens, n_out, n_cols, n_kept, n_cols // 8, x2d.stride(0), HAS_BIAS=bias is not None, BLOCK_M=block_m,
    )  # fmt: skip
    return y.reshape(*x.shape[:-1], n_out)
