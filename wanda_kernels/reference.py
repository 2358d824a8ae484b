"""Plain-torch references for every op in ``wanda_kernels``: these functions ARE the spec.

Each ``<op>_torch`` has the signature and return contract of the Triton op ``<op>``, written for clarity (sort,
topk, broadcasting), not speed, with locuslab/wanda's semantics:
* Scores: ``|W| * sqrt(act_sq_norms)`` in fp32 (``prune_wanda``'s ``W_metric``).
* Unstructured: per row, prune the ``int(C * sparsity)`` smallest scores, ties to the lower column (stable sort).
* N:M: in each group of ``m`` consecutive columns prune the ``n`` smallest, ties to the lower index.
* Magnitude: one threshold per matrix, ``|w| <= sort(|W|)[int(numel * sparsity)]``.
* SparseGPT block: the published column loop of one block (OBS updates with U, the upper Cholesky factor of
  H^-1), N:M groups by a stable sort of ``w^2 / U_jj^2`` as the pruning method does.
Tile ops (three_tier, hybrid_2_4): ``wanda_kernels/reference_tiers.py``; RIA, moments and DSnoT:
``wanda_kernels/reference_dsnot.py``; both re-exported here.
Non-finite scores order as in ``torch.sort``: NaN above +inf, so NaN and inf entries are pruned last (why:
docs/kernels.md); ``-0.0`` equals ``+0.0``. ``sparsity == 0`` prunes nothing (locuslab/wanda's ``main.py``).
"""

from __future__ import annotations

import torch

from wanda_kernels._validate import (
    check_act_sq_norms,
    check_matrix,
    check_nm,
    check_sparsegpt_block,
    check_sparsity,
)
from wanda_kernels.reference_dsnot import (  # noqa: F401
    accumulate_moments_torch,
    dsnot_nm_torch,
    dsnot_unstructured_torch,
    ria_scores_torch,
)
from wanda_kernels.reference_tiers import tier_mask_torch, tile_scores_torch, tile_tiers_torch  # noqa: F401


def accumulate_sq_norms_torch(acc: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``acc[c] += sum over leading dims of x[..., c] ** 2``, in fp32. Returns ``acc``."""
    if acc.ndim != 1 or acc.dtype != torch.float32:
        raise ValueError(f"acc must be a 1-D float32 tensor, got shape {tuple(acc.shape)} dtype {acc.dtype}")
    if x.ndim < 1 or x.shape[-1] != acc.shape[0]:
        raise ValueError(f"x must end in dim {acc.shape[0]} (= acc), got shape {tuple(x.shape)}")
    acc += x.reshape(-1, x.shape[-1]).float().pow(2).sum(dim=0)
    return acc


def wanda_scores_torch(weight: torch.Tensor, act_sq_norms: torch.Tensor) -> torch.Tensor:
    """``|W| * sqrt(act_sq_norms)[None, :]`` as fp32 [O, C] (exact fp32 products, correctly rounded sqrt)."""
    check_matrix(weight, "weight")
    check_act_sq_norms(act_sq_norms, weight)
    return weight.abs().float() * torch.sqrt(act_sq_norms)[None, :]


def _canonical_scores(scores: torch.Tensor) -> torch.Tensor:
    # fp32 is exact for fp16/bf16 inputs; +0.0 makes -0.0 compare equal *and* sort as equal.
    return scores.float() + 0.0


def unstructured_mask_torch(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Bool [O, C], True = prune: the ``int(C * sparsity)`` smallest scores of each row (stable ties)."""
    check_matrix(scores, "scores")
    check_sparsity(sparsity)
    n_rows, n_cols = scores.shape
    n_prune = int(n_cols * sparsity)
    mask = torch.zeros(n_rows, n_cols, dtype=torch.bool, device=scores.device)
    if n_prune == 0:
        return mask
    order = torch.sort(_canonical_scores(scores), dim=-1, stable=True)[1]
    mask.scatter_(1, order[:, :n_prune], True)
    return mask


def nm_mask_torch(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Bool [O, C], True = prune: the ``n`` smallest of every ``m`` consecutive columns (stable ties)."""
    check_matrix(scores, "scores")
    check_nm(n, m, scores.shape[1])
    n_rows, n_cols = scores.shape
    groups = _canonical_scores(scores).reshape(n_rows, n_cols // m, m)
    order = torch.sort(groups, dim=-1, stable=True)[1]
    mask = torch.zeros_like(groups, dtype=torch.bool)
    mask.scatter_(2, order[..., :n], True)
    return mask.reshape(n_rows, n_cols)


def magnitude_mask_torch(weight: torch.Tensor, sparsity: float, n: int = 0, m: int = 0) -> torch.Tensor:
    """Wanda's magnitude baseline. Unstructured: one per-matrix threshold; N:M: ``nm_mask`` of ``|W|``."""
    check_matrix(weight, "weight")
    check_sparsity(sparsity)
    if n or m:
        check_nm(n, m, weight.shape[1])
        return nm_mask_torch(weight.abs(), n, m)
    if sparsity == 0:
        return torch.zeros(weight.shape, dtype=torch.bool, device=weight.device)
    w_abs = weight.abs().float()
    threshold = torch.sort(w_abs.flatten())[0][int(weight.numel() * sparsity)]
    return w_abs <= threshold  # ties at the threshold are pruned, as in locuslab/wanda


def wanda_prune_torch(
    weight: torch.Tensor, act_sq_norms: torch.Tensor, sparsity: float = 0.5, n: int = 0, m: int = 0
) -> torch.Tensor:
    """Scores, mask and in-place zeroing in one call. Returns the bool mask (True = pruned)."""
    scores = wanda_scores_torch(weight, act_sq_norms)
    check_sparsity(sparsity)
    if n or m:
        check_nm(n, m, weight.shape[1])
        mask = nm_mask_torch(scores, n, m)
    else:
        mask = unstructured_mask_torch(scores, sparsity)
    weight.masked_fill_(mask, 0)
    return mask


def _pack_kept_24(weight: torch.Tensor, kept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack the columns flagged in ``kept`` (bool, at least 2 per group of 4), then the lowest-index others,
    2 per group in increasing column order: values [O, C/2] and 2-bit indices uint8 [O, C/8]."""
    n_rows, n_cols = weight.shape
    groups = weight.reshape(n_rows, n_cols // 4, 4)
    # A stable sort on "not kept" puts kept columns first, each side in column order.
    order = torch.sort((~kept.reshape(n_rows, n_cols // 4, 4)).to(torch.int8), dim=2, stable=True)[1][..., :2]
    members = torch.sort(order, dim=2)[0]
    values = torch.gather(groups, 2, members).reshape(n_rows, n_cols // 2)
    bits = members.reshape(n_rows, n_cols // 8, 4).to(torch.int32) << torch.arange(0, 8, 2, device=weight.device)
    return values, bits.sum(dim=2).to(torch.uint8)


def pack_24_torch(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """2:4 packed format (see ``wanda_kernels.pack24``): kept values [O, C/2] and 2-bit indices uint8 [O, C/8]."""
    check_matrix(weight, "weight")
    n_rows, n_cols = weight.shape
    if n_cols % 8:
        raise ValueError(f"weight in_features ({n_cols}) must be a multiple of 8 for the 2:4 packed format")
    nonzero = weight != 0
    n_bad = int((nonzero.reshape(n_rows, n_cols // 4, 4).sum(dim=2) > 2).sum())
    if n_bad:
        raise ValueError(f"weight is not 2:4 sparse: {n_bad} groups of 4 columns hold more than 2 non-zeros")
    return _pack_kept_24(weight, nonzero)  # the non-zeros, then the lowest-index zeros


def unpack_24_torch(values: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    """Dense [O, C] weight with exact zeros from the 2:4 packed (values, meta)."""
    n_rows, half = values.shape
    members = (meta.to(torch.int32)[..., None] >> torch.arange(0, 8, 2, device=meta.device)) & 3
    members = members.reshape(n_rows, half // 2, 2).to(torch.int64)
    dense = torch.zeros(n_rows, half // 2, 4, dtype=values.dtype, device=values.device)
    dense.scatter_(2, members, values.reshape(n_rows, half // 2, 2))
    return dense.reshape(n_rows, 2 * half)


def wanda_prune_pack_24_torch(weight: torch.Tensor, act_sq_norms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Wanda 2:4 selection then packing of exactly the selected columns (a kept weight may itself be zero)."""
    if weight.ndim == 2 and weight.shape[1] % 8:
        raise ValueError(f"weight in_features ({weight.shape[1]}) must be a multiple of 8 for the 2:4 packed format")
    mask = nm_mask_torch(wanda_scores_torch(weight, act_sq_norms), 2, 4)
    return _pack_kept_24(weight, ~mask)


def sparse24_linear_torch(
    x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``F.linear(x, unpack_24(values, meta), bias)``: the dense-with-zeros weight, exactly."""
    return torch.nn.functional.linear(x, unpack_24_torch(values, meta), bias)


def sparsegpt_block_torch(
    w_block: torch.Tensor, hinv_block: torch.Tensor, mask: torch.Tensor | None = None, n: int = 0, m: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """One SparseGPT block (IST-DASLab/sparsegpt ``fasterprune``'s column loop). ``w_block`` fp32 [O, B] becomes Q.

    ``hinv_block`` is the block's [B, B] tile of U, the upper Cholesky factor of H^-1. Unstructured: ``mask``
    bool [O, B] is the caller's selection. N:M (``mask=None``): every ``m`` columns, the ``n`` smallest
    ``w^2 / U_jj^2`` of the updated weights (stable sort: ties to the lower column). For each column ``i``:
    ``q = w`` with pruned entries zeroed, ``err = (w - q) / U_ii``, ``W[:, i:] -= err U[i, i:]``.
    Returns ``(err, mask)``, err fp32 [O, B].
    """
    check_sparsegpt_block(w_block, hinv_block, mask, n, m)
    n_rows, width = w_block.shape
    select_nm = mask is None
    if select_nm:
        mask = torch.zeros(n_rows, width, dtype=torch.bool, device=w_block.device)
    work = w_block.clone()
    q_block = torch.zeros_like(work)
    err_block = torch.zeros_like(work)
    hinv_diag = torch.diagonal(hinv_block)
    for i in range(width):
        if select_nm and i % m == 0:
            saliency = work[:, i : i + m] ** 2 / hinv_diag[i : i + m].reshape((1, -1)) ** 2
            mask[:, i : i + m].scatter_(1, torch.sort(saliency, dim=1, stable=True)[1][:, :n], True)
        w = work[:, i]
        q = w.masked_fill(mask[:, i], 0)
        err = (w - q) / hinv_block[i, i]
        work[:, i:] -= err.unsqueeze(1).matmul(hinv_block[i, i:].unsqueeze(0))  # rounded product, then subtract
        q_block[:, i] = q
        err_block[:, i] = err
    w_block.copy_(q_block)
    return err_block, mask


def kth_smallest_torch(x: torch.Tensor, k: int, absolute: bool = False) -> torch.Tensor:
    """fp32 0-d tensor: ``sort(x.flatten())[k]`` (of ``|x|`` when ``absolute``), torch.sort's NaN-last order."""
    values = x.abs() if absolute else x
    return torch.sort(values.flatten().float())[0][k]


def rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' ``LlamaRMSNorm.forward``: the mean of squares in fp32, the normalized row rounded to x's
    dtype, then multiplied by the weight (in their promoted dtype)."""
    normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
    return (weight * normed.to(x.dtype)).contiguous()


def add_rms_norm_torch(
    residual: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """A decoder layer's ``hidden = residual + delta`` and the RMSNorm of it that feeds the next sublayer."""
    total = residual + delta
    return total, rms_norm_torch(total, weight, eps)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotary_torch(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' ``apply_rotary_pos_emb`` (``unsqueeze_dim=1``): q [B, Hq, T, D], k [B, Hk, T, D],
    cos/sin [B or 1, T, D] broadcast over heads."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def write_kv_cache_torch(
    keys: torch.Tensor,
    values: torch.Tensor,
    new_keys: torch.Tensor,
    new_values: torch.Tensor,
    positions: torch.Tensor,
    length: torch.Tensor,
) -> None:
    """A static KV cache update at given positions: keys/values [B, H, L, D] take new_keys/new_values
    [B, H, T, D] at ``positions`` [T] along L, and ``length`` becomes ``positions[-1] + 1``."""
    keys.index_copy_(2, positions, new_keys)
    values.index_copy_(2, positions, new_values)
    length.copy_(positions[-1] + 1)


def silu_mul_torch(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The gated MLP's activation: transformers' ``act_fn(gate_proj(x)) * up_proj(x)`` with SiLU."""
    return (torch.nn.functional.silu(gate) * up).contiguous()
