"""Tile ops of three-tier / hybrid 2:4 pruning: tile scores, tile tiers, and the in-tile masks.

Spec: ``wanda_kernels.reference_tiers.tile_scores_torch``, ``.tile_tiers_torch``, ``.tier_mask_torch`` (same
signatures, validation and outputs; that module's docstring has the tile layout and the tie rules).
* ``tile_scores(weight, act_sq_norms, block_size)``: fp32 [TR, TC] = sum of ``|W| * sqrt(a)`` (or ``|W|``) over the
  valid entries of each ``b x b`` tile / ``b**2``, one fused pass over W. The fp32 sum runs in another order than
  torch's ``mean``: equal to fp32 rounding (a few ulp), not bit for bit.
* ``tile_tiers(tile_scores, n_dense, n_24, per_band)``: int8 [TR, TC], equal to the reference. Global: two radix
  selects (``select.kth_smallest``) give the boundary scores, ties at each boundary go to the lower row-major tile
  index (a cumsum of equality flags); no sort, no host sync. Per band: one program per tile row sorts composite
  int64 keys (order-preserving score key, then the inverted column) with ``tl.sort``.
* ``tier_mask(weight, tiers, ...)``: (bool mask [O, C], int8 resolved tiers), equal to the reference. One program
  per few tiles of a tile row: the 2:4 rank of each entry against the other members of its group of 4 in the
  tile flattened row-major (members gathered by flat index, so groups may cross tile rows); the k-th largest key
  by bisection over the int32 key space, ties at it in flat order by a cumsum. All ranking is on integer keys
  (``_keys``), so every comparison is exact. hybrid_2_4's keep test ``kept >= score_threshold * total`` sums fp32
  metrics in another order than torch: a tile within rounding of the threshold may resolve differently.
weight [O, C] fp16/bf16/fp32, any strides; act_sq_norms fp32 [C] or None (sqrt taken on the host with torch, as
in ``scores.py``); block_size 1..64. Design notes: docs/kernels.md.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from wanda_kernels._keys import KEY_MIN, load_scores, ordered_keys
from wanda_kernels._runtime import check_kernel_device, interpreting, on_input_device
from wanda_kernels._validate import check_act_sq_norms, check_matrix
from wanda_kernels.reference_tiers import (
    TIER_24,
    TIER_DENSE,
    TIER_TOPK,
    _check_tier_inputs,
    _check_tile_counts,
    band_counts,
    check_block_size,
    tile_grid,
    tile_tiers_torch,
)
from wanda_kernels.select import kth_smallest

# The tiers as constexprs, for the kernels (Triton reads no plain Python globals).
_DENSE, _24, _TOPK = tl.constexpr(TIER_DENSE), tl.constexpr(TIER_24), tl.constexpr(TIER_TOPK)
# Entries one program holds: few programs under the interpreter (~3 ms each), GPU tiles that fill 4-8 warps.
_ELEMS = 4096 if interpreting() else 1024
# Widest band the per-band kernel sorts in registers (16 warps, no spills); wider bands (block_size <= 4 on very
# wide layers) use the reference's torch.sort, which orders exactly the same.
MAX_BAND_TILES = 8192


@triton.jit
def _composite(keys, index):
    """int64 keys ordered by ``keys`` (int32), then by the *lower* ``index`` first in a descending order: the low
    32 bits hold ``2**31 - 1 - index`` (>= 0), the high 32 the key."""
    return (keys.to(tl.int64) << 32) | (2147483647 - index).to(tl.int64)


# --- tile_scores ------------------------------------------------------------------------------------------


@triton.jit
def _tile_scores_kernel(
    weight_ptr,
    norm_ptr,
    out_ptr,
    n_rows,
    n_cols,
    n_tile_cols,
    block_size,
    stride_row,
    stride_col,
    HAS_NORMS: tl.constexpr,
    B_PAD: tl.constexpr,
    TILES: tl.constexpr,
):
    # [rows of the band, tiles, columns of a tile]: each row's TILES * b columns are contiguous in memory.
    r = tl.arange(0, B_PAD)[:, None, None]
    t = tl.arange(0, TILES)[None, :, None]
    c = tl.arange(0, B_PAD)[None, None, :]
    tile_col = tl.program_id(1) * TILES + t
    rows = tl.program_id(0).to(tl.int64) * block_size + r
    cols = tile_col.to(tl.int64) * block_size + c
    valid = (r < block_size) & (c < block_size) & (rows < n_rows) & (cols < n_cols)
    metric = load_scores(
        weight_ptr, norm_ptr, rows * stride_row + cols * stride_col, cols, valid, 2 if HAS_NORMS else 1
    )
    # The zero padding of the reference adds nothing; the mean is over the padded b * b entries. fp32 sum (its
    # order differs from torch's, so the result agrees to rounding).
    total = tl.sum(tl.sum(metric, axis=2), axis=0)
    tile_cols = tl.program_id(1) * TILES + tl.arange(0, TILES)
    out = out_ptr + tl.program_id(0).to(tl.int64) * n_tile_cols + tile_cols
    tl.store(out, total / (block_size * block_size), mask=tile_cols < n_tile_cols)  # b * b <= 4096: exact in fp32


def _act_norms(weight: torch.Tensor, act_sq_norms: torch.Tensor | None) -> torch.Tensor | None:
    if act_sq_norms is None:
        return None
    check_act_sq_norms(act_sq_norms, weight)
    return torch.sqrt(act_sq_norms)  # host-side torch sqrt: the products are torch's bit for bit


@on_input_device
def tile_scores(weight: torch.Tensor, act_sq_norms: torch.Tensor | None, block_size: int) -> torch.Tensor:
    """fp32 [TR, TC]: the mean of ``|W| * sqrt(act_sq_norms)`` (None: ``|W|``) over each zero-padded tile."""
    check_matrix(weight, "weight")
    check_block_size(block_size)
    act_norms = _act_norms(weight, act_sq_norms)
    check_kernel_device(weight, *(() if act_norms is None else (act_norms,)))
    n_tr, n_tc = tile_grid(weight.shape, block_size)
    out = torch.empty(n_tr, n_tc, dtype=torch.float32, device=weight.device)
    if out.numel() == 0:
        return out
    b_pad = triton.next_power_of_2(block_size)
    tiles = max(1, min(_ELEMS // (b_pad * b_pad), triton.next_power_of_2(n_tc)))
    grid = (n_tr, triton.cdiv(n_tc, tiles))
    _tile_scores_kernel[grid](
        weight,
        act_norms if act_norms is not None else weight,
        out,
        weight.shape[0],
        weight.shape[1],
        n_tc,
        block_size,
        weight.stride(0),
        weight.stride(1),
        HAS_NORMS=act_norms is not None,
        B_PAD=b_pad,
        TILES=tiles,
        num_warps=1 if interpreting() else min(8, max(1, b_pad * b_pad * tiles // 256)),
    )
    return out


# --- tile_tiers -------------------------------------------------------------------------------------------


def _torch_keys(x: torch.Tensor) -> torch.Tensor:
    """``_keys.ordered_keys`` in torch for a contiguous fp32 tensor: int32, -0.0 = +0.0, every NaN the maximum."""
    x = x + 0.0  # -0.0 -> +0.0
    bits = x.view(torch.int32)
    keys = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    return torch.where(torch.isnan(x), torch.iinfo(torch.int32).max, keys)


def _first_in_order(scores: torch.Tensor, keys: torch.Tensor, m: int) -> torch.Tensor:
    """Bool flags of the first ``m`` entries of a stable descending sort of the flat ``scores`` (keys: theirs)."""
    total = keys.numel()
    if m == 0:
        return torch.zeros_like(keys, dtype=torch.bool)
    if m == total:
        return torch.ones_like(keys, dtype=torch.bool)
    boundary = _torch_keys(kth_smallest(scores, total - m).reshape(1))  # the m-th largest, as a key
    above = keys > boundary
    tied = keys == boundary
    # The stable sort takes the tied entries in index order: the first (m - #above) of them.
    tied_before = torch.cumsum(tied, dim=0) - tied.to(torch.int64)
    return above | (tied & (tied_before < m - above.sum()))


@triton.jit
def _band_tiers_kernel(scores_ptr, dense_ptr, mid_ptr, tiers_ptr, n_cols, stride_row, stride_col, BLOCK: tl.constexpr):
    band = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    valid = cols < n_cols
    scores = tl.load(scores_ptr + band * stride_row + cols.to(tl.int64) * stride_col, mask=valid, other=0.0)
    # KEY_MIN is below every real key (-inf's is KEY_MIN + 2^23 - 1): padding sorts last.
    keys = tl.where(valid, ordered_keys(scores), KEY_MIN)
    ranked = tl.sort(_composite(keys, cols), descending=True)
    # Low 32 bits (the composite minus its high part) give back the column at each sorted position.
    col = 2147483647 - (ranked - ((ranked >> 32) << 32)).to(tl.int32)
    n_dense = tl.load(dense_ptr + band)
    n_mid = tl.load(mid_ptr + band)
    position = tl.arange(0, BLOCK)
    tier = tl.where(position < n_dense, _DENSE, tl.where(position < n_dense + n_mid, _24, _TOPK))
    tl.store(tiers_ptr + band * n_cols + col, tier.to(tl.int8), mask=position < n_cols)


@on_input_device
def tile_tiers(tile_scores: torch.Tensor, n_dense: int, n_24: int, per_band: bool = False) -> torch.Tensor:
    """int8 [TR, TC]: the ``n_dense`` best tiles 0, the next ``n_24`` 1, the rest 2 (a stable descending order over
    the matrix, or within each tile row with ``reference_tiers.band_counts`` when ``per_band``)."""
    _check_tile_counts(tile_scores, n_dense, n_24)
    check_kernel_device(tile_scores)
    n_bands, n_cols = tile_scores.shape
    if tile_scores.numel() == 0:
        return torch.full_like(tile_scores, TIER_TOPK, dtype=torch.int8)
    if not per_band:
        flat = tile_scores.reshape(-1).contiguous()
        keys = _torch_keys(flat)
        dense = _first_in_order(flat, keys, n_dense)
        dense_or_24 = _first_in_order(flat, keys, n_dense + n_24)
        tiers = TIER_TOPK - dense.to(torch.int8) - dense_or_24.to(torch.int8)  # 0, 1 or 2
        return tiers.reshape(n_bands, n_cols)
    if n_cols > MAX_BAND_TILES:
        return tile_tiers_torch(tile_scores, n_dense, n_24, per_band=True)
    dense, mid = band_counts(tile_scores + 0.0, n_dense, n_24)  # [TR] int64 sums, computed with torch
    tiers = torch.empty(n_bands, n_cols, dtype=torch.int8, device=tile_scores.device)
    block = max(2, triton.next_power_of_2(n_cols))  # tl.sort needs a power of two (and >= 2 on triton 3.6)
    _band_tiers_kernel[(n_bands,)](
        tile_scores,
        dense,
        mid,
        tiers,
        n_cols,
        tile_scores.stride(0),
        tile_scores.stride(1),
        BLOCK=block,
        num_warps=1 if interpreting() else min(16, max(1, block // 256)),
    )
    return tiers


# --- tier_mask --------------------------------------------------------------------------------------------


@triton.jit
def _rank_values(weight_ptr, norm_ptr, rows, cols, stride_row, stride_col, valid, BY_METRIC: tl.constexpr):
    """fp32 ranking values: ``|w|``, or the metric ``|w| * act_norm`` (exactly torch's fp32 product)."""
    return load_scores(weight_ptr, norm_ptr, rows * stride_row + cols * stride_col, cols, valid, 2 if BY_METRIC else 1)


@triton.jit
def _tier_mask_kernel(
    weight_ptr,
    norm_ptr,
    tiers_ptr,
    mask_ptr,
    resolved_ptr,
    n_rows,
    n_cols,
    n_tile_cols,
    block_size,
    topk,
    score_threshold,
    stride_row,
    stride_col,
    stride_tier_row,
    stride_tier_col,
    HAS_NORMS: tl.constexpr,
    RANK_BY_METRIC: tl.constexpr,  # rank by |w| * act_norm (needs HAS_NORMS), else by |w|
    HYBRID: tl.constexpr,
    B_PAD: tl.constexpr,
    TILES: tl.constexpr,
):
    # [TILES, B_PAD * B_PAD]: each tile flattened row-major (entry e = r * B_PAD + c) along the last dimension.
    tile_col = (tl.program_id(1) * TILES + tl.arange(0, TILES))[:, None]
    entry = tl.arange(0, B_PAD * B_PAD)[None, :]
    r = entry // B_PAD
    c = entry % B_PAD
    row0 = tl.program_id(0).to(tl.int64) * block_size
    col0 = tile_col.to(tl.int64) * block_size
    tile_ok = tile_col < n_tile_cols
    height = tl.minimum(n_rows - row0, block_size).to(tl.int32)  # this tile's valid rows and columns
    width = tl.maximum(tl.minimum(n_cols - col0, block_size), 1).to(tl.int32)  # >= 1 beyond the last tile too
    valid = tile_ok & (r < height) & (c < width)
    rows = row0 + r
    cols = col0 + c

    values = _rank_values(weight_ptr, norm_ptr, rows, cols, stride_row, stride_col, valid, RANK_BY_METRIC)
    keys = ordered_keys(values)

    # 2:4 over the tile flattened with stride `width` (three_tier: its own entries) or `block_size` (hybrid: the
    # zero-padded tile); groups of 4 consecutive flat indices, a last group of r < 4 keeps min(2, r). Each entry
    # counts the members of its group that outrank it (larger key, or equal key at a lower flat index).
    if HYBRID:
        stride = tl.full([TILES, 1], 0, tl.int32) + block_size
        n_flat = block_size * block_size
    else:
        stride = width
        n_flat = height * width
    flat = r * stride + c
    group = flat - flat % 4
    outranked = tl.zeros([TILES, B_PAD * B_PAD], dtype=tl.int32)
    for m in tl.static_range(4):
        other = group + m
        other_r = other // stride
        other_c = other % stride
        present = tile_ok & (other < n_flat)
        # hybrid: members in the padding (outside the valid rows/columns) are zeros, key 0 (`other=0.0`).
        loaded = present & (other_r < height) & (other_c < width)
        other_values = _rank_values(
            weight_ptr, norm_ptr, row0 + other_r, col0 + other_c, stride_row, stride_col, loaded, RANK_BY_METRIC
        )
        other_keys = ordered_keys(other_values)
        outranks = (other_keys > keys) | ((other_keys == keys) & (other < flat))
        outranked += (present & outranks).to(tl.int32)
    keep_24 = outranked < 2

    # Top-k: the k-th largest valid key of each tile, by bisection over the int32 key space (a tl.sort of the
    # tile would do too, but runs element by element in Python under the interpreter). Invariant:
    # count(key >= lo) >= k > count(key >= hi); 32 halvings of the 2^32 range leave lo = the k-th largest key.
    lo = tl.full([TILES, 1], -2147483648, tl.int64)
    hi = tl.full([TILES, 1], 2147483648, tl.int64)
    for _ in range(32):
        mid = ((lo + hi) >> 1).to(tl.int32)  # lo <= mid < hi: always an int32, so keys stay int32
        at_least_k = tl.sum((valid & (keys >= mid)).to(tl.int32), axis=1)[:, None] >= topk
        lo = tl.where(at_least_k, mid.to(tl.int64), lo)
        hi = tl.where(at_least_k, hi, mid.to(tl.int64))
    kth = lo.to(tl.int32)
    if HYBRID:
        # Exactly k: the keys above the k-th, then the tied ones in flat (row-major) order, as a stable sort.
        above = valid & (keys > kth)
        tied = (valid & (keys == kth)).to(tl.int32)
        tied_before = tl.cumsum(tied, axis=1) - tied
        n_above = tl.sum(above.to(tl.int32), axis=1)[:, None]
        keep_topk = above | ((tied != 0) & (tied_before < topk - n_above))
    else:
        keep_topk = keys >= kth  # every value >= the k-th largest
    keep_topk = keep_topk | (height * width <= topk)  # a tile of at most k entries stays dense (lo is moot)

    tile_row = tl.program_id(0).to(tl.int64)
    tier = tl.load(tiers_ptr + tile_row * stride_tier_row + tile_col * stride_tier_col, mask=tile_ok)
    tier = tier.to(tl.int32)
    if HYBRID:
        if HAS_NORMS:
            metric = load_scores(weight_ptr, norm_ptr, rows * stride_row + cols * stride_col, cols, valid, 2)
        else:
            metric = values
        total = tl.sum(metric, axis=1)[:, None]
        kept = tl.sum(tl.where(keep_24, metric, 0.0), axis=1)[:, None]
        # fp32 sums in another order than torch's: a tile within rounding of the threshold may resolve otherwise.
        accept = kept >= score_threshold * total
        tier = tl.where((tier == _24) & ~accept, _DENSE, tier)
        tl.store(resolved_ptr + tile_row * n_tile_cols + tile_col, tier.to(tl.int8), mask=tile_ok)
    keep = (tier == _DENSE) | ((tier == _24) & keep_24) | ((tier == _TOPK) & keep_topk)
    tl.store(mask_ptr + rows * n_cols + cols, (~keep).to(tl.uint8), mask=valid)


@on_input_device
def tier_mask(
    weight: torch.Tensor,
    tiers: torch.Tensor,
    block_size: int,
    topk_per_block: int,
    act_sq_norms: torch.Tensor | None = None,
    variant: str = "three_tier",
    rank_by_metric: bool = False,
    score_threshold: float = 0.8,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(bool mask [O, C], True = prune; int8 resolved tiers [TR, TC]) of ``reference_tiers.tier_mask_torch``."""
    _check_tier_inputs(weight, tiers, block_size, topk_per_block, variant)
    act_norms = _act_norms(weight, act_sq_norms)
    check_kernel_device(weight, tiers, *(() if act_norms is None else (act_norms,)))
    n_rows, n_cols = weight.shape
    n_tr, n_tc = tiers.shape
    hybrid = variant == "hybrid_2_4"
    mask = torch.empty(n_rows, n_cols, dtype=torch.bool, device=weight.device)
    resolved = torch.empty_like(tiers, memory_format=torch.contiguous_format) if hybrid else tiers.clone()
    if mask.numel() == 0:
        return mask, resolved
    b_pad = max(2, triton.next_power_of_2(block_size))  # b = 1 too: no block dimension of size 1
    elems = b_pad * b_pad
    tiles = max(1, min(_ELEMS // elems, triton.next_power_of_2(n_tc)))
    grid = (n_tr, triton.cdiv(n_tc, tiles))
    _tier_mask_kernel[grid](
        weight,
        act_norms if act_norms is not None else weight,
        tiers,
        mask.view(torch.uint8),
        resolved,
        n_rows,
        n_cols,
        n_tc,
        block_size,
        topk_per_block,
        float(score_threshold),
        weight.stride(0),
        weight.stride(1),
        tiers.stride(0),
        tiers.stride(1),
        HAS_NORMS=act_norms is not None,
        RANK_BY_METRIC=bool(rank_by_metric) and act_norms is not None,  # without norms the metric is |W|
        HYBRID=hybrid,
        B_PAD=b_pad,
        TILES=tiles,
        num_warps=1 if interpreting() else min(16, max(1, elems * tiles // 128)),  # ~4 entries per thread
    )
    return mask, resolved
