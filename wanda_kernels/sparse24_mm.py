"""``y = x @ W.T (+ bias)`` with W in the 2:4 packed format, for small M (decode).

Spec: ``wanda_kernels.reference.sparse24_linear_torch`` (= ``F.linear(x, unpack_24(values, meta), bias)``).
x [..., C] and values [O, C/2] share a float dtype; meta uint8 [O, C/8] (format: ``wanda_kernels.pack24``);
bias [O] or None -> y [..., O] contiguous, in x's dtype, accumulated in fp32.

Decode is memory-bound: a dense GEMV reads 16 bits per weight, this kernel reads each kept value once and
2 bits of index (9 bits per original weight), so its ceiling is 16/9 = 1.78x. Each program owns BLOCK_O
output rows and every token of the call (up to 16), so the packed weight is read from DRAM once. Per step
it takes BLOCK_K kept values along the row, in one of three ways that the autotuner measures per shape:
  * gather: each kept value meets the x entry its 2-bit index names (an [M, O, K] gather, small M only);
  * tile: the [O, 2K] dense-with-zeros tile is rebuilt in registers and multiplied by contiguous x rows;
  * dot: the rebuilt tile goes through tl.dot (tensor cores), the token tile padded to 16 rows.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from wanda_kernels._runtime import check_kernel_device, interpreting, tuning_configs
from wanda_kernels._validate import FLOAT_DTYPES

PATH_GATHER, PATH_TILE, PATH_DOT = 0, 1, 2  # how a program multiplies (see the module docstring)
DOT_ROWS = 16  # tl.dot's smallest M: the tensor-core path pads the token tile to this many rows
_DOT_ROWS = tl.constexpr(DOT_ROWS)


@triton.jit
def _dense_weight_tile(values_ptr, meta_ptr, outs, out_ok, dcols, n_cols, n_kept):
    """The dense-with-zeros weight at rows ``outs`` x dense columns ``dcols`` (whole groups of 4), rebuilt in
    registers from the packed form. Each kept value is loaded for each of its group's 4 columns: the repeats
    are the same addresses, served by L1, so DRAM still sees 9 bits per weight."""
    ok = out_ok[:, None] & (dcols < n_cols)[None, :]
    first = (dcols // 4) * 2  # kept index of the group's first value; the second is first + 1
    row_values = values_ptr + outs[:, None] * n_kept
    v0 = tl.load(row_values + first[None, :], mask=ok, other=0.0)
    v1 = tl.load(row_values + first[None, :] + 1, mask=ok, other=0.0)
    byte = tl.load(meta_ptr + outs[:, None] * (n_cols // 8) + (dcols // 8)[None, :], mask=ok, other=0)
    shift = (2 * (first % 4))[None, :]  # 0 or 4: where the group's two 2-bit indices sit in its byte
    column = (dcols % 4)[None, :]
    byte = byte.to(tl.int32)
    zero = tl.zeros_like(v0)
    return tl.where(((byte >> shift) & 3) == column, v0, tl.where(((byte >> (shift + 2)) & 3) == column, v1, zero))


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
    PATH: tl.constexpr,
):
    # Token tiles vary fastest across programs: the tiles that share a weight block run side by side, so past
    # the first, their reads of it come from L2 (more than 16 tokens; up to 16 there is one tile).
    token0 = tl.program_id(0) * BLOCK_M
    outs = (tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)).to(tl.int64)
    out_ok = outs < n_out
    n_kept = n_cols // 2
    if PATH == 2:  # PATH_DOT
        rows = tl.arange(0, _DOT_ROWS)
        tokens = token0 + rows
        token_ok = (rows < BLOCK_M) & (tokens < n_tokens)
        acc = tl.zeros([_DOT_ROWS, BLOCK_O], dtype=tl.float32)
        for k0 in range(0, n_kept, BLOCK_K):
            dcols = 2 * k0 + tl.arange(0, 2 * BLOCK_K)
            w = _dense_weight_tile(values_ptr, meta_ptr, outs, out_ok, dcols, n_cols, n_kept)
            x = tl.load(
                x_ptr + tokens.to(tl.int64)[:, None] * stride_x + dcols[None, :],
                mask=token_ok[:, None] & (dcols < n_cols)[None, :],
                other=0.0,
            )
            if x_ptr.dtype.element_ty == tl.float32:
                acc = tl.dot(x, tl.trans(w), acc, input_precision="ieee")  # no TF32 rounding
            else:
                acc = tl.dot(x, tl.trans(w), acc)
    else:
        rows = tl.arange(0, BLOCK_M)
        tokens = token0 + rows
        token_ok = tokens < n_tokens
        acc = tl.zeros([BLOCK_M, BLOCK_O], dtype=tl.float32)
        for k0 in range(0, n_kept, BLOCK_K):
            if PATH == 1:  # PATH_TILE: the rebuilt tile times one contiguous x row per token, on CUDA cores
                dcols = 2 * k0 + tl.arange(0, 2 * BLOCK_K)
                w = _dense_weight_tile(values_ptr, meta_ptr, outs, out_ok, dcols, n_cols, n_kept).to(tl.float32)
                for t in tl.static_range(BLOCK_M):
                    row_end = tl.where(token0 + t < n_tokens, n_cols, 0)  # a token past the end loads nothing
                    x_t = tl.load(x_ptr + (token0 + t).to(tl.int64) * stride_x + dcols, mask=dcols < row_end, other=0.0)
                    part = tl.sum(w * x_t.to(tl.float32)[None, :], axis=1)
                    acc += tl.where(rows[:, None] == t, part[None, :], 0.0)
            else:  # PATH_GATHER: each kept value meets the x entry its index names
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


# Candidates, measured per shape and token count on first use on a GPU: (BLOCK_O output rows per program,
# BLOCK_K kept values per step, num_warps). Which path wins (gather vs rebuilt tile vs tensor cores) is left
# to the measurement; ``_prune_configs`` drops the ones that cannot work or would spill registers.
# None of these spills registers on sm_90 at any token count it is offered for (ptxas -v through
# tests/compile_kernels.py); 64-row tiles of the rebuilt weight did, and were dropped.
_GPU_CONFIGS = {
    PATH_GATHER: [(8, 128, 2), (16, 128, 4), (32, 256, 8)],
    PATH_TILE: [(16, 128, 4), (32, 64, 4), (16, 256, 8)],
    PATH_DOT: [(16, 64, 4), (32, 64, 4), (16, 128, 4), (32, 128, 8), (16, 256, 8)],
}
MAX_NON_DOT_ROWS = 4  # gather and tile unroll the token loop; past 4 tokens only tensor cores are offered
GATHER_ELEMENTS_PER_THREAD = 64  # BLOCK_M x BLOCK_O x BLOCK_K gathered products per thread; ptxas spills past it


def _prune_configs(configs, named_args, **kwargs):
    block_m = kwargs.get("BLOCK_M", named_args.get("BLOCK_M"))
    kept = []
    for config in configs:
        path, o, k = config.kwargs["PATH"], config.kwargs["BLOCK_O"], config.kwargs["BLOCK_K"]
        if path != PATH_DOT and block_m > MAX_NON_DOT_ROWS:
            continue
        if path == PATH_GATHER and block_m * o * k > GATHER_ELEMENTS_PER_THREAD * 32 * config.num_warps:
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
    block_m = min(triton.next_power_of_2(n_tokens), DOT_ROWS)  # decode sizes: one token tile, one weight read

    def grid(meta):
        return triton.cdiv(n_tokens, block_m), triton.cdiv(n_out, meta["BLOCK_O"])

    _sparse24_linear_tuned[grid](
        x2d, values.contiguous(), meta.contiguous(), bias if bias is not None else values, y,
        n_tokens, n_out, n_cols, x2d.stride(0), HAS_BIAS=bias is not None, BLOCK_M=block_m,
    )  # fmt: skip
    return y.reshape(*x.shape[:-1], n_out)
