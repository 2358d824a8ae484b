"""Plain-torch references of the tile ops (three-tier and hybrid 2:4 pruning): these functions ARE the spec.

Jiajun-Ji/wanda ``lib/prune.py`` (``compute_block_scores``, ``apply_three_tier_block_pruning``,
``apply_hybrid_block_pruning_with_2_4``), vectorized. A weight [O, C] is cut into ``b x b`` tiles, zero-padded
at ragged edges; tile (i, j) covers rows ``i*b ..`` and columns ``j*b ..``.
* ``tile_scores``: the mean of ``|W| * sqrt(act_sq_norms)`` (or ``|W|``) over each *padded* tile, fp32.
* ``tile_tiers``: tier per tile, 0 dense / 1 2:4 / 2 top-k, by a stable descending order of the tile scores
  (ties: the lower row-major tile index first), either over the whole matrix or within each band of ``b`` rows.
* ``tier_mask``: the in-tile masks. ``variant="three_tier"``: 2:4 over the tile's own elements flattened row-major
  (groups of 4; a remainder group keeps its ``min(2, r)`` largest), top-k prunes ``value < k-th largest`` (ties at
  the k-th value keep more than k; a tile of at most k elements stays dense). ``variant="hybrid_2_4"``: 2:4 over the
  *padded* tile flattened (padding counts as zeros), taken only where it keeps at least ``score_threshold`` of the
  tile's summed metric (else dense); top-k keeps exactly k. Ties inside a group or tile keep the lower flat index.
  The in-tile ranking is by ``|W|`` (the fork), or by the Wanda metric with ``rank_by_metric``.
Masks are bool, True = prune.
"""

from __future__ import annotations

import torch

from wanda_kernels._validate import check_act_sq_norms, check_matrix

TIER_DENSE, TIER_24, TIER_TOPK = 0, 1, 2
VARIANTS = ("three_tier", "hybrid_2_4")
MAX_BLOCK_SIZE = 64  # the kernels hold one padded tile (up to 64 x 64) per program


def check_block_size(block_size: int) -> None:
    if isinstance(block_size, bool) or not isinstance(block_size, int) or not 1 <= block_size <= MAX_BLOCK_SIZE:
        raise ValueError(f"block_size must be an int in [1, {MAX_BLOCK_SIZE}], got {block_size!r}")


def tile_grid(shape: tuple[int, int], block_size: int) -> tuple[int, int]:
    """(tile rows, tile columns) of an [O, C] matrix."""
    return -(-shape[0] // block_size), -(-shape[1] // block_size)


def _metric(weight: torch.Tensor, act_sq_norms: torch.Tensor | None) -> torch.Tensor:
    if act_sq_norms is None:
        return weight.abs().float()
    check_act_sq_norms(act_sq_norms, weight)
    return weight.abs().float() * torch.sqrt(act_sq_norms)[None, :]


def _pad_to_tiles(x: torch.Tensor, block_size: int) -> torch.Tensor:
    rows, cols = tile_grid(x.shape, block_size)
    return torch.nn.functional.pad(x, (0, cols * block_size - x.shape[1], 0, rows * block_size - x.shape[0]))


def _tiles(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """[TR, TC, b, b] view of the padded matrix, ``[i, j, r, c] = x[i*b + r, j*b + c]``."""
    return _pad_to_tiles(x, block_size).unfold(0, block_size, block_size).unfold(1, block_size, block_size)


def tile_scores_torch(weight: torch.Tensor, act_sq_norms: torch.Tensor | None, block_size: int) -> torch.Tensor:
    """fp32 [TR, TC]: the mean of the metric over each zero-padded ``b x b`` tile (``compute_block_scores``)."""
    check_matrix(weight, "weight")
    check_block_size(block_size)
    if weight.numel() == 0:
        return torch.zeros(tile_grid(weight.shape, block_size), dtype=torch.float32, device=weight.device)
    padded = _pad_to_tiles(_metric(weight, act_sq_norms), block_size)
    # The fork's own unfold order, so that the fp32 means are the fork's bit for bit.
    return padded.unfold(1, block_size, block_size).unfold(0, block_size, block_size).mean(dim=(-2, -1))


def _check_tile_counts(tile_scores: torch.Tensor, n_dense: int, n_24: int) -> None:
    if not isinstance(tile_scores, torch.Tensor) or tile_scores.ndim != 2 or tile_scores.dtype != torch.float32:
        raise ValueError("tile_scores must be a 2-D float32 tensor [tile rows, tile columns]")
    total = tile_scores.numel()
    for name, count in (("n_dense", n_dense), ("n_24", n_24)):
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ValueError(f"{name} must be a non-negative int, got {count!r}")
    if n_dense + n_24 > total:
        raise ValueError(f"n_dense + n_24 = {n_dense + n_24} exceeds the {total} tiles")


def band_counts(tile_scores: torch.Tensor, n_dense: int, n_24: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per band (tile row), how many tiles are dense and how many 2:4, summing to ``n_dense`` and ``n_24``:
    ``n // TR`` each, and the remainder one more each to the bands of the largest summed tile score (ties: the
    lower band) among those with room left. int64 [TR] twice."""
    n_bands, n_cols = tile_scores.shape
    if n_bands == 0:
        empty = torch.zeros(0, dtype=torch.int64, device=tile_scores.device)
        return empty, empty.clone()
    band_totals = tile_scores.sum(dim=1)
    counts = []
    used = torch.zeros(n_bands, dtype=torch.int64, device=tile_scores.device)
    for total in (n_dense, n_24):
        base, extra = divmod(total, n_bands)
        count = torch.full((n_bands,), base, dtype=torch.int64, device=tile_scores.device)
        if extra:
            room = (n_cols - used - base) > 0
            # Stable sorts: by score (descending), then bands with room first; the lower band wins ties.
            by_score = torch.sort(band_totals, descending=True, stable=True)[1]
            order = by_score[torch.sort((~room[by_score]).to(torch.int8), stable=True)[1]]
            count[order[:extra]] += 1
        counts.append(count)
        used = used + count
    return counts[0], counts[1]


def tile_tiers_torch(tile_scores: torch.Tensor, n_dense: int, n_24: int, per_band: bool = False) -> torch.Tensor:
    """int8 [TR, TC] tiers: the ``n_dense`` best tiles 0 (dense), the next ``n_24`` 1 (2:4), the rest 2 (top-k), by
    a stable descending sort over the matrix, or within each tile row with :func:`band_counts` (``per_band``)."""
    _check_tile_counts(tile_scores, n_dense, n_24)
    scores = tile_scores + 0.0  # -0.0 == +0.0
    n_bands, n_cols = scores.shape
    tiers = torch.full(scores.shape, TIER_TOPK, dtype=torch.int8, device=scores.device)
    if not per_band:
        order = torch.sort(scores.flatten(), descending=True, stable=True)[1]
        flat = tiers.view(-1)
        flat[order[:n_dense]] = TIER_DENSE
        flat[order[n_dense : n_dense + n_24]] = TIER_24
        return tiers
    dense, mid = band_counts(scores, n_dense, n_24)
    order = torch.sort(scores, dim=1, descending=True, stable=True)[1]
    position = torch.arange(n_cols, device=scores.device)[None, :]
    by_position = torch.where(
        position < dense[:, None], TIER_DENSE, torch.where(position < (dense + mid)[:, None], TIER_24, TIER_TOPK)
    ).to(torch.int8)
    tiers.scatter_(1, order, by_position)
    return tiers


def _keep_24_flat(values: torch.Tensor) -> torch.Tensor:
    """Bool keep-mask of a 1-D tensor: per group of 4 consecutive entries the 2 largest (a last group of r < 4
    keeps ``min(2, r)``), ties to the lower index."""
    n = values.numel()
    padded = torch.cat([values, values.new_full((-n % 4,), float("-inf"))]).reshape(-1, 4)
    order = torch.sort(padded, dim=1, descending=True, stable=True)[1][:, :2]
    keep = torch.zeros_like(padded, dtype=torch.bool).scatter_(1, order, True)
    return keep.reshape(-1)[:n]


def _keep_top_k(values: torch.Tensor, valid: torch.Tensor, k: int, exact: bool) -> torch.Tensor:
    """[..., E] keep-mask per last-dim vector: values ``>=`` the k-th largest valid one (``exact``: exactly the
    k largest, ties to the lower index); a vector of at most k valid entries keeps them all."""
    ranked = values.masked_fill(~valid, float("-inf"))
    order = torch.sort(ranked, dim=-1, descending=True, stable=True)
    if exact:
        keep = torch.zeros_like(valid).scatter_(-1, order[1][..., :k], True)
    else:
        kth = min(k, values.shape[-1]) - 1  # k above the tile size: ``few`` keeps every entry below
        keep = ranked >= order[0][..., kth : kth + 1]
    few = valid.sum(dim=-1, keepdim=True) <= k
    return (keep | few) & valid


def _check_tier_inputs(weight, tiers, block_size, topk_per_block, variant) -> None:
    check_matrix(weight, "weight")
    check_block_size(block_size)
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
    if isinstance(topk_per_block, bool) or not isinstance(topk_per_block, int) or topk_per_block < 1:
        raise ValueError(f"topk_per_block must be a positive int, got {topk_per_block!r}")
    grid = tile_grid(weight.shape, block_size)
    if not isinstance(tiers, torch.Tensor) or tiers.dtype != torch.int8 or tuple(tiers.shape) != grid:
        got = f"{tiers.dtype} {tuple(tiers.shape)}" if isinstance(tiers, torch.Tensor) else type(tiers).__name__
        raise ValueError(f"tiers must be an int8 tensor of the tile grid {grid}, got {got}")
    if tiers.device != weight.device:
        raise ValueError(f"tiers is on {tiers.device} but weight is on {weight.device}")


def tier_mask_torch(
    weight: torch.Tensor,
    tiers: torch.Tensor,
    block_size: int,
    topk_per_block: int,
    act_sq_norms: torch.Tensor | None = None,
    variant: str = "three_tier",
    rank_by_metric: bool = False,
    score_threshold: float = 0.8,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(bool mask [O, C], int8 resolved tiers [TR, TC]) for the given tile tiers (module docstring).

    ``act_sq_norms`` fp32 [C] or None gives the metric ``|W| * sqrt(a)`` (None: ``|W|``): the in-tile ranking uses
    it with ``rank_by_metric``, and hybrid_2_4's keep test always. In hybrid_2_4, tier 1 means "2:4 if it keeps
    ``score_threshold`` of the metric, else dense", and the returned tiers say which.
    """
    _check_tier_inputs(weight, tiers, block_size, topk_per_block, variant)
    if weight.numel() == 0:
        return torch.zeros(weight.shape, dtype=torch.bool, device=weight.device), tiers.clone()
    b = block_size
    n_rows, n_cols = weight.shape
    metric = _metric(weight, act_sq_norms)
    rank_values = metric if rank_by_metric else weight.abs().float()
    valid = _tiles(torch.ones_like(metric, dtype=torch.bool), b)  # [TR, TC, b, b]
    values = _tiles(rank_values, b)
    n_tr, n_tc = tiers.shape
    hybrid = variant == "hybrid_2_4"

    # 2:4 by groups of 4 along each padded tile row when b % 4 == 0: the fork's flattened groups then stay in one
    # row. (In three_tier a ragged tile of width w % 4 != 0 is flattened with stride w: handled below, per tile.)
    if b % 4 == 0:
        groups = values.masked_fill(~valid, 0.0 if hybrid else float("-inf")).reshape(n_tr, n_tc, b, b // 4, 4)
        order = torch.sort(groups, dim=-1, descending=True, stable=True)[1][..., :2]
        keep_24 = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, order, True).reshape(n_tr, n_tc, b, b)
    else:
        keep_24 = torch.zeros_like(valid)
        source = values.masked_fill(~valid, 0.0) if hybrid else values
        for i in range(n_tr):
            for j in range(n_tc):
                tile = source[i, j] if hybrid else source[i, j][valid[i, j]]
                keep = _keep_24_flat(tile.reshape(-1))
                if hybrid:
                    keep_24[i, j] = keep.reshape(b, b)
                else:
                    keep_24[i, j][valid[i, j]] = keep
    if not hybrid and b % 4 == 0:
        width = n_cols - (n_tc - 1) * b  # the last tile column's width; the only one that can be ragged
        if width % 4:
            for i in range(n_tr):
                tile_valid = valid[i, n_tc - 1]
                keep = _keep_24_flat(values[i, n_tc - 1][tile_valid])
                keep_24[i, n_tc - 1] = False
                keep_24[i, n_tc - 1][tile_valid] = keep

    flat_values, flat_valid = values.reshape(n_tr, n_tc, b * b), valid.reshape(n_tr, n_tc, b * b)
    keep_topk = _keep_top_k(flat_values, flat_valid, topk_per_block, exact=hybrid).reshape(n_tr, n_tc, b, b)

    resolved = tiers.clone()
    if hybrid:
        tile_metric = _tiles(metric, b)
        total = tile_metric.sum(dim=(-2, -1))
        kept = (tile_metric * keep_24).sum(dim=(-2, -1))
        accept = kept >= score_threshold * total
        resolved = torch.where((tiers == TIER_24) & ~accept, TIER_DENSE, tiers).to(torch.int8)
    tier = resolved[:, :, None, None]
    keep = (tier == TIER_DENSE) | ((tier == TIER_24) & keep_24) | ((tier == TIER_TOPK) & keep_topk)
    mask = ~keep.permute(0, 2, 1, 3).reshape(n_tr * b, n_tc * b)[:n_rows, :n_cols]
    return mask.contiguous(), resolved
