"""2:4 compressed format: pack a 2:4-sparse weight into kept values + 2-bit indices, and unpack it.

Spec: ``wanda_kernels.reference.pack_24_torch`` / ``unpack_24_torch``. Per output row of a weight [O, C], C % 8 == 0:
  values [O, C/2]  the model dtype: the two kept entries of each group of 4 columns, lower column first.
  meta   [O, C/8]  uint8: each kept value's column inside its group (0..3) as 2 bits; byte b holds kept
                   values 4b..4b+3 (two groups), value 4b+i in bits [2i, 2i+2). 0.5625x the dense fp16/bf16 size.
A group with more than 2 zeros keeps its lowest-index zero columns (unpacking is exact for any 2:4 weight); more
than 2 non-zeros is not 2:4 (``pack_24`` raises). ``wanda_prune_pack_24``: Wanda's 2:4 selection + packing in one
pass. Design notes: docs/kernels.md; the checkpoint format: docs/sparse24.md.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from wanda_kernels._keys import load_scores, ordered_keys
from wanda_kernels._runtime import check_kernel_device, interpreting, on_input_device
from wanda_kernels._validate import check_act_sq_norms, check_matrix


@triton.jit
def _pack_24_kernel(
    src_ptr,
    norm_ptr,
    values_ptr,
    meta_ptr,
    bad_ptr,
    n_rows,
    n_cols,
    stride_row,
    stride_col,
    SELECT: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_B: tl.constexpr,
):
    # Tile: [BLOCK_R rows, BLOCK_B meta bytes, 8 columns]; one meta byte covers two groups of 4 columns.
    row_ids = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    byte_ids = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    rows = row_ids[:, None, None]
    bytes_ = byte_ids[None, :, None]
    lane = tl.arange(0, 8)[None, None, :]
    cols = bytes_ * 8 + lane
    valid = (rows < n_rows) & (cols < n_cols)
    offs = rows * stride_row + cols.to(tl.int64) * stride_col
    w = tl.load(src_ptr + offs, mask=valid, other=0.0)
    member = lane % 4  # position inside the group of 4
    group_lo = lane < 4  # first or second group of the byte
    if SELECT:
        # Fused Wanda 2:4: keep the 2 largest |w| * sqrt(a) of each group (prune the 2 smallest, stable ties),
        # exactly as nm_mask ranks them.
        keys = ordered_keys(load_scores(src_ptr, norm_ptr, offs, cols, valid, 2))
        rank = tl.zeros([BLOCK_R, BLOCK_B, 8], dtype=tl.int32)
        for i in tl.static_range(8):
            key_i = tl.sum(tl.where(lane == i, keys, 0), axis=2)[:, :, None]
            same_group = (i < 4) == group_lo
            rank += (same_group & ((key_i < keys) | ((key_i == keys) & (i < lane)))).to(tl.int32)
        keep = rank >= 2
    else:
        # Keep the non-zeros; pad with the lowest-index zeros up to 2 per group.
        nonzero = (w != 0).to(tl.int32)
        n_nonzero_lo = tl.sum(tl.where(group_lo, nonzero, 0), axis=2)[:, :, None]
        n_nonzero_hi = tl.sum(tl.where(group_lo, 0, nonzero), axis=2)[:, :, None]
        n_nonzero = tl.where(group_lo, n_nonzero_lo, n_nonzero_hi)
        zero_rank = tl.zeros([BLOCK_R, BLOCK_B, 8], dtype=tl.int32)  # zeros before this lane in its group
        for i in tl.static_range(8):
            is_zero_i = tl.sum(tl.where(lane == i, 1 - nonzero, 0), axis=2)[:, :, None]
            zero_rank += is_zero_i * (((i < 4) == group_lo) & (i < lane)).to(tl.int32)
        keep = (nonzero == 1) | (zero_rank < 2 - n_nonzero)
        too_dense = (n_nonzero > 2) & (member == 0) & valid
        tl.atomic_add(bad_ptr, tl.sum(tl.sum(tl.sum(too_dense.to(tl.int32), axis=2), axis=1), axis=0))
    # Slot of each kept lane among the byte's 4 kept values: 2 per group, in column order. Lanes past the
    # second kept one of a too-dense group (already counted in bad_ptr) are not stored.
    kept = keep.to(tl.int32)
    slot_in_group = tl.zeros([BLOCK_R, BLOCK_B, 8], dtype=tl.int32)
    for i in tl.static_range(8):
        kept_i = tl.sum(tl.where(lane == i, kept, 0), axis=2)[:, :, None]
        slot_in_group += kept_i * (((i < 4) == group_lo) & (i < lane)).to(tl.int32)
    store = keep & valid & (slot_in_group < 2)
    slot = slot_in_group + tl.where(group_lo, 0, 2)
    value_offs = rows * (n_cols // 2) + bytes_.to(tl.int64) * 4 + slot
    tl.store(values_ptr + value_offs, w, mask=store)
    meta_bits = tl.where(store, member << (2 * slot), 0)
    meta = tl.sum(meta_bits, axis=2)
    meta_valid = (row_ids[:, None] < n_rows) & (byte_ids[None, :] * 8 < n_cols)
    meta_offs = row_ids[:, None] * (n_cols // 8) + byte_ids[None, :]
    tl.store(meta_ptr + meta_offs, meta.to(tl.uint8), mask=meta_valid)


@triton.jit
def _unpack_24_kernel(values_ptr, meta_ptr, out_ptr, n_rows, n_cols, BLOCK_R: tl.constexpr, BLOCK_B: tl.constexpr):
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)[:, None, None]
    bytes_ = (tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B))[None, :, None]
    slot = tl.arange(0, 4)[None, None, :]
    valid = (rows < n_rows) & (bytes_ * 8 < n_cols)
    meta = tl.load(meta_ptr + rows * (n_cols // 8) + bytes_, mask=valid, other=0).to(tl.int32)
    member = (meta >> (2 * slot)) & 3
    values = tl.load(values_ptr + rows * (n_cols // 2) + bytes_.to(tl.int64) * 4 + slot, mask=valid, other=0.0)
    cols = bytes_ * 8 + (slot // 2) * 4 + member
    # The output was zero-filled; the 2 kept columns of a group are distinct, so no two stores collide.
    tl.store(out_ptr + rows * n_cols + cols, values, mask=valid)


def _check_packable(weight: torch.Tensor, name: str) -> None:
    check_matrix(weight, name)
    if weight.shape[1] % 8:
        raise ValueError(f"{name} in_features ({weight.shape[1]}) must be a multiple of 8 for the 2:4 packed format")
    check_kernel_device(weight)


def _grid(n_rows: int, n_bytes: int) -> tuple[tuple[int, int], int, int]:
    if interpreting():
        block_b = min(triton.next_power_of_2(n_bytes), 256)
        block_r = max(1, min(triton.next_power_of_2(n_rows), 2048 // block_b))
    else:
        block_b = min(triton.next_power_of_2(n_bytes), 64)
        block_r = 4
    return (triton.cdiv(n_rows, block_r), triton.cdiv(n_bytes, block_b)), block_r, block_b


def _launch_pack(weight: torch.Tensor, act_norms: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, int]:
    n_rows, n_cols = weight.shape
    values = torch.zeros(n_rows, n_cols // 2, dtype=weight.dtype, device=weight.device)
    meta = torch.zeros(n_rows, n_cols // 8, dtype=torch.uint8, device=weight.device)
    bad = torch.zeros(1, dtype=torch.int32, device=weight.device)
    if weight.numel():
        grid, block_r, block_b = _grid(n_rows, n_cols // 8)
        _pack_24_kernel[grid](
            weight, act_norms if act_norms is not None else weight, values, meta, bad, n_rows, n_cols,
            weight.stride(0), weight.stride(1), SELECT=act_norms is not None, BLOCK_R=block_r, BLOCK_B=block_b,
        )  # fmt: skip
    return values, meta, bad


@on_input_device
def pack_24(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(values [O, C/2], meta uint8 [O, C/8]) of a 2:4-sparse weight; ValueError if it is not 2:4."""
    _check_packable(weight, "weight")
    values, meta, bad = _launch_pack(weight, None)
    n_bad = int(bad.item())
    if n_bad:
        raise ValueError(f"weight is not 2:4 sparse: {n_bad} groups of 4 columns hold more than 2 non-zeros")
    return values, meta


@on_input_device
def wanda_prune_pack_24(weight: torch.Tensor, act_sq_norms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused Wanda 2:4 selection + packing of a dense weight: ``pack_24(W * ~wanda 2:4 mask)`` in one pass."""
    _check_packable(weight, "weight")
    check_act_sq_norms(act_sq_norms, weight)
    values, meta, _ = _launch_pack(weight, torch.sqrt(act_sq_norms))
    return values, meta


@on_input_device
def unpack_24(values: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    """Dense [O, C] weight with exact zeros from the packed (values, meta)."""
    check_matrix(values, "values")
    n_rows, half = values.shape
    if meta.dtype != torch.uint8 or meta.shape != (n_rows, half // 4) or half % 4:
        raise ValueError(f"meta must be uint8 [{n_rows}, {half // 4}] for values {tuple(values.shape)}, got "
                         f"{meta.dtype} {tuple(meta.shape)}")  # fmt: skip
    check_kernel_device(values, meta)
    n_cols = 2 * half
    out = torch.zeros(n_rows, n_cols, dtype=values.dtype, device=values.device)
    if out.numel():
        grid, block_r, block_b = _grid(n_rows, n_cols // 8)
        _unpack_24_kernel[grid](
            values.contiguous(), meta.contiguous(), out, n_rows, n_cols, BLOCK_R=block_r, BLOCK_B=block_b
        )
    return out
