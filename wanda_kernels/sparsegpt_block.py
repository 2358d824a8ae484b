"""One SparseGPT column block in one kernel: mask selection, OBS updates and the pruned block, all in registers.

Spec: ``wanda_kernels.reference.sparsegpt_block_torch`` (IST-DASLab/sparsegpt ``fasterprune``'s column loop, one
block). ``w_block`` fp32 [O, B] (any strides; overwritten with the pruned block Q), ``hinv_block`` fp32 [B, B] (the
block's diagonal tile of U, the upper Cholesky factor of H^-1; upper triangle read), and ``mask`` bool [O, B]
(True = prune) or N:M parameters -> ``(err, mask)``: err fp32 [O, B] for the lazy batch update
``W[:, i2:] -= err @ U[i1:i2, i2:]``, and the mask used. Per column ``i``, left to right: (N:M, ``i % m == 0``)
prune each row's ``n`` smallest ``w^2 / U_jj^2`` in ``[i, i + m)`` of the updated weights, stable ties; then
``q = w`` with pruned entries zeroed, ``err = (w - q) / U_ii``, ``W[:, j] -= err * U[i, j]`` for ``j > i``.
fp32, IEEE divisions, no FMA contraction: the reference's roundings. Design notes: docs/kernels.md.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from wanda_kernels._keys import ordered_keys
from wanda_kernels._runtime import check_kernel_device, interpreting, on_input_device
from wanda_kernels._validate import check_sparsegpt_block

MAX_BLOCK_COLS = 512  # widest block (padded to a power of two) whose row tile is held in registers
# One warp per program on a GPU, 16 fp32 per thread per tile (BLOCK_R * BLOCK_C = 512): every per-column
# reduction over a row stays inside the warp. Chosen from ptxas reports, not timings (docs/kernels.md).
TILE_ELEMS_GPU = 512
TILE_ELEMS_INTERPRETER = 8192  # few, large programs under the interpreter (~3 ms per program instance)


@triton.jit
def _sparsegpt_block_kernel(
    w_ptr,
    hinv_ptr,
    mask_ptr,
    err_ptr,
    n_rows,
    n_cols,
    stride_w_row,
    stride_w_col,
    stride_h_row,
    stride_h_col,
    stride_m_row,
    stride_m_col,
    stride_e_row,
    stride_e_col,
    N: tl.constexpr,
    M: tl.constexpr,
    SELECT_NM: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    cols = tl.arange(0, BLOCK_C)
    cols64 = cols.to(tl.int64)
    row_ok = rows < n_rows
    col_ok = cols < n_cols
    tile_ok = row_ok[:, None] & col_ok[None, :]
    w_offs = rows[:, None] * stride_w_row + cols64[None, :] * stride_w_col
    m_offs = rows[:, None] * stride_m_row + cols64[None, :] * stride_m_col
    w = tl.load(w_ptr + w_offs, mask=tile_ok, other=0.0)
    if SELECT_NM:
        prune = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.int32) != 0
        diag = tl.load(hinv_ptr + cols64 * (stride_h_row + stride_h_col), mask=col_ok, other=1.0)
        diag_sq = diag * diag  # exact fp32 product, as the reference's ``hinv_diag ** 2``
    else:
        prune = tl.load(mask_ptr + m_offs, mask=tile_ok, other=0) != 0

    # Row 0 of U and its diagonal entry; each column prefetches the next row before using the current one.
    h_next = tl.load(hinv_ptr + cols64 * stride_h_col, mask=(cols > 0) & col_ok, other=0.0)
    d_next = tl.load(hinv_ptr)
    for g in range(0, n_cols, M):
        if SELECT_NM:
            # Saliency of the whole tile (only group g's columns are used): w^2 / U_jj^2 with an IEEE division.
            keys = ordered_keys(tl.math.div_rn(w * w, diag_sq[None, :]))
            in_group = (cols[None, :] >= g) & (cols[None, :] < g + M)
            rank = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.int32)
            for j in tl.static_range(M):
                key_j = tl.sum(tl.where(cols[None, :] == g + j, keys, 0), axis=1)[:, None]
                # Stable ascending order: member j is ahead of column c if smaller, or equal and to the left.
                rank += ((key_j < keys) | ((key_j == keys) & (g + j < cols[None, :]))).to(tl.int32)
            prune = prune | (in_group & (rank < N))
        for j in tl.static_range(M):
            i = g + j + tl.zeros([], dtype=tl.int64)  # int64 offsets (the interpreter's loop index is an int)
            h = h_next
            d = d_next
            h_next = tl.load(
                hinv_ptr + (i + 1) * stride_h_row + cols64 * stride_h_col, mask=(cols > i + 1) & col_ok, other=0.0
            )
            d_next = tl.load(hinv_ptr + (i + 1) * (stride_h_row + stride_h_col), mask=i + 1 < n_cols, other=1.0)
            is_i = cols[None, :] == i
            q = tl.where(prune, 0.0, w)
            # (w - q) of column i, then one IEEE division: the reference's ``(w - q) / d``.
            err = tl.math.div_rn(tl.sum(tl.where(is_i, w - q, 0.0), axis=1), d)
            tl.store(err_ptr + rows * stride_e_row + i * stride_e_col, err, mask=row_ok)
            w = tl.where(cols[None, :] > i, w - err[:, None] * h[None, :], tl.where(is_i, q, w))
    tl.store(w_ptr + w_offs, w, mask=tile_ok)
    if SELECT_NM:
        tl.store(mask_ptr + m_offs, prune.to(tl.uint8), mask=tile_ok)


@on_input_device
def sparsegpt_block_(
    w_block: torch.Tensor, hinv_block: torch.Tensor, mask: torch.Tensor | None = None, n: int = 0, m: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune one SparseGPT block in place: ``w_block`` fp32 [O, B] becomes Q. Returns ``(err, mask)``.

    ``mask`` bool [O, B] (True = prune) gives the unstructured selection; with ``mask=None``, ``n``/``m``
    choose N:M groups column by column (``B % m == 0``) and the returned mask is new. ``err`` fp32 [O, B]
    (stored column-major: strides (1, O)) is the input to the lazy update ``W[:, i2:] -= err @ U[i1:i2, i2:]``.
    """
    check_sparsegpt_block(w_block, hinv_block, mask, n, m)
    check_kernel_device(w_block, hinv_block, *([] if mask is None else [mask]))
    n_rows, width = w_block.shape
    block_c = triton.next_power_of_2(max(width, 1))
    if block_c > MAX_BLOCK_COLS:
        raise ValueError(f"w_block width ({width}) exceeds {MAX_BLOCK_COLS} columns (the row tile lives in registers)")
    select_nm = mask is None
    if select_nm:
        mask = torch.zeros(n_rows, width, dtype=torch.bool, device=w_block.device)
    # Column-major, so each column's store is contiguous; as [O, B] it is a transposed view.
    err = torch.empty(width, n_rows, dtype=torch.float32, device=w_block.device).t()
    if n_rows == 0 or width == 0:
        return err, mask
    if interpreting():
        block_r = max(1, min(triton.next_power_of_2(n_rows), TILE_ELEMS_INTERPRETER // block_c))
        num_warps = 1
    else:
        block_r = max(1, min(triton.next_power_of_2(n_rows), TILE_ELEMS_GPU // block_c))
        num_warps = 1
    mask_u8 = mask.view(torch.uint8)
    _sparsegpt_block_kernel[(triton.cdiv(n_rows, block_r),)](
        w_block,
        hinv_block,
        mask_u8,
        err,
        n_rows,
        width,
        w_block.stride(0),
        w_block.stride(1),
        hinv_block.stride(0),
        hinv_block.stride(1),
        mask_u8.stride(0),
        mask_u8.stride(1),
        err.stride(0),
        err.stride(1),
        N=n if select_nm else 0,
        M=m if select_nm else 1,
        SELECT_NM=select_nm,
        BLOCK_R=block_r,
        BLOCK_C=block_c,
        num_warps=num_warps,
        enable_fp_fusion=False,  # no FMA: round ``err * u`` before subtracting, as torch's update does
    )
    return err, mask
