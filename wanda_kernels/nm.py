"""N:M mask: in every group of ``m`` consecutive columns of a row, prune the ``n`` smallest scores.

Spec: ``wanda_kernels.reference.nm_mask_torch`` (stable sort inside each group; ties to the lower
column). Shapes: scores [O, C] fp16/bf16/fp32, any strides, ``C % m == 0`` -> bool mask [O, C].

Each program holds a [BLOCK_R, BLOCK_G, M_PAD] tile of groups in registers and ranks every member
against the other ``m - 1`` of its group on order-preserving int32 keys (``_keys``):
rank_j = #{i : key_i < key_j or (key_i == key_j and i < j)}; prune where rank_j < n. Like the unstructured
kernel, it can score from the weight and zero it in place. Design notes: docs/kernels.md.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from wanda_kernels._keys import load_scores, ordered_keys
from wanda_kernels._runtime import check_kernel_device, interpreting, on_input_device, tuning_configs
from wanda_kernels._validate import check_matrix, check_nm


@triton.jit
def _nm_select_kernel(
    src_ptr,
    norm_ptr,
    mask_ptr,
    n_rows,
    n_groups,
    stride_row,
    stride_col,
    N: tl.constexpr,
    M: tl.constexpr,
    M_PAD: tl.constexpr,
    SCORE_MODE: tl.constexpr,
    PRUNE_WEIGHT: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_G: tl.constexpr,
):
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)[:, None, None]
    groups = (tl.program_id(1) * BLOCK_G + tl.arange(0, BLOCK_G))[None, :, None]
    members = tl.arange(0, M_PAD)[None, None, :]
    cols = groups * M + members
    valid = (rows < n_rows) & (groups < n_groups) & (members < M)
    offs_src = rows * stride_row + cols.to(tl.int64) * stride_col
    keys = ordered_keys(load_scores(src_ptr, norm_ptr, offs_src, cols, valid, SCORE_MODE))
    rank = tl.zeros([BLOCK_R, BLOCK_G, M_PAD], dtype=tl.int32)
    for i in tl.static_range(M):
        # Member i's key, broadcast over its group (a masked sum extracts it exactly from registers).
        key_i = tl.sum(tl.where(members == i, keys, 0), axis=2)[:, :, None]
        rank += ((key_i < keys) | ((key_i == keys) & (i < members))).to(tl.int32)
    prune = valid & (rank < N)
    tl.store(mask_ptr + rows * (n_groups * M) + cols, prune.to(tl.uint8), mask=valid)
    if PRUNE_WEIGHT:
        zero = tl.zeros([BLOCK_R, BLOCK_G, M_PAD], dtype=src_ptr.dtype.element_ty)
        tl.store(src_ptr + offs_src, zero, mask=prune)


# Tile shape (rows x groups per program) and warps, measured per matrix shape on first use on a GPU.
_GPU_TILES = [(8, 64, 4), (4, 128, 4), (2, 256, 4), (4, 256, 8), (8, 128, 8)]  # (BLOCK_R, BLOCK_G, num_warps)
_nm_select_tuned = triton.autotune(
    configs=tuning_configs(
        [triton.Config({"BLOCK_R": r, "BLOCK_G": g}, num_warps=w) for r, g, w in _GPU_TILES],
        triton.Config({"BLOCK_R": 16, "BLOCK_G": 128}, num_warps=1)
        if interpreting()
        else triton.Config({"BLOCK_R": 4, "BLOCK_G": 128}, num_warps=4),
    ),
    key=["n_rows", "n_groups", "M_PAD", "SCORE_MODE", "PRUNE_WEIGHT"],
    restore_value=["src_ptr"],
)(_nm_select_kernel)


def launch_nm_select(
    src: torch.Tensor, act_norms: torch.Tensor | None, n: int, m: int, score_mode: int, prune_weight: bool
) -> torch.Tensor:
    """Shared launcher for ``nm_mask``, magnitude N:M and the fused Wanda pass; inputs already validated."""
    n_rows, n_cols = src.shape
    mask = torch.zeros(n_rows, n_cols, dtype=torch.bool, device=src.device)
    if n == 0 or n_rows == 0:
        return mask
    n_groups = n_cols // m
    m_pad = triton.next_power_of_2(m)

    def grid(meta):
        return triton.cdiv(n_rows, meta["BLOCK_R"]), triton.cdiv(n_groups, meta["BLOCK_G"])

    _nm_select_tuned[grid](
        src,
        act_norms if act_norms is not None else src,
        mask.view(torch.uint8),
        n_rows,
        n_groups,
        src.stride(0),
        src.stride(1),
        N=n,
        M=m,
        M_PAD=m_pad,
        SCORE_MODE=score_mode,
        PRUNE_WEIGHT=prune_weight,
    )
    return mask


@on_input_device
def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Bool [O, C], True = prune: the ``n`` smallest scores of every ``m`` consecutive columns."""
    check_matrix(scores, "scores")
    check_nm(n, m, scores.shape[1])
    check_kernel_device(scores)
    return launch_nm_select(scores, None, n, m, score_mode=0, prune_weight=False)
