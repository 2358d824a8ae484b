"""Tile pruning: three-tier and hybrid 2:4 (Jiajun-Ji/wanda, "Wanda Hybrid Pruning"), and our balanced selection.

A weight [O, C] is cut into ``b x b`` tiles scored by the mean of Wanda's metric ``|W| * sqrt(a)`` (magnitude:
``|W|``) over each zero-padded tile. ``three_tier``: the best ``int(T * top_dense_ratio)`` tiles stay dense, the
next ``int(T * mid_2_4_ratio)`` get 2:4 inside the tile, the rest keep their ``topk_per_block`` largest entries
(ratios that do not sum to 1 are normalized, as the fork does). ``hybrid_2_4``: the top ``top_blocks_ratio`` of
tiles get 2:4 where it keeps ``score_threshold`` of the tile's metric and stay dense otherwise; the rest top-k.
Tier selection (three_tier): ``fork`` is the published code bit for bit (ranking in tiles by ``|W|``, tiles ranked
over the whole matrix, no update). Ingredients on top of it, alone or joined by ``+``: ``metric`` ranks inside
tiles by the Wanda metric, ``bands`` ranks tiles within each band of ``b`` rows (same tier counts),
``obs`` runs SparseGPT's OBS update with the tier mask fixed, ``cost`` assigns tiers by the squared metric each
would prune; ``balanced`` is all four (the best measured, docs/pruning.md). The ops are
``tile_scores``, ``tile_tiers`` and ``tier_mask`` in ``wanda_kernels``. Measurements: docs/pruning.md.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

import torch

from pruning.methods.ops import kernel_ops
from pruning.methods.sparsegpt import InverseHessian, prune_sparsegpt_

logger = logging.getLogger(__name__)

TIER_TYPES: tuple[str, ...] = ("three_tier", "hybrid_2_4")
TIER_INGREDIENTS: tuple[str, ...] = ("metric", "bands", "obs", "cost")
TIER_SELECTION_NAMES: tuple[str, ...] = ("fork", "balanced")
RATIO_TOLERANCE = 1e-6  # the fork's: ratios summing to 1 within this are used as given


@dataclass(frozen=True)
class TierSelection:
    """How three_tier chooses: in-tile ranking by the metric, tiers per row band, OBS update with the mask fixed."""

    rank_by_metric: bool = False
    per_band: bool = False
    obs_update: bool = False
    by_cost: bool = False

    @classmethod
    def parse(cls, text: str) -> TierSelection:
        """``fork``, ``balanced``, or ingredients joined by ``+`` (``metric+bands``)."""
        if text == "fork":
            return cls()
        if text == "balanced":
            return cls(True, True, True, True)
        parts = text.split("+") if isinstance(text, str) else [text]
        unknown = [p for p in parts if p not in TIER_INGREDIENTS]
        if unknown or len(set(parts)) != len(parts):
            raise ValueError(
                f"tier selection must be fork, balanced, or ingredients joined by '+' from "
                f"{', '.join(TIER_INGREDIENTS)} (e.g. metric+bands); got {text!r}"
            )
        return cls("metric" in parts, "bands" in parts, "obs" in parts, "cost" in parts)


@dataclass
class TierCounts:
    """Tiles per tier (hybrid_2_4: after its keep test)."""

    dense: int = 0
    sparse_24: int = 0
    topk: int = 0

    def __add__(self, other: TierCounts) -> TierCounts:
        return TierCounts(self.dense + other.dense, self.sparse_24 + other.sparse_24, self.topk + other.topk)

    @classmethod
    def of(cls, tiers: torch.Tensor) -> TierCounts:
        counts = torch.bincount(tiers.flatten().to(torch.int64), minlength=3).tolist()
        return cls(*counts[:3])

    def to_dict(self) -> dict[str, int]:
        return {"dense": self.dense, "2:4": self.sparse_24, "topk": self.topk}


def normalized_tier_ratios(top: float, mid: float, bottom: float) -> tuple[float, float, float]:
    """The fork's normalization: divided by their sum unless it is 1 within 1e-6 (with a warning)."""
    total = top + mid + bottom
    if total <= 0:
        raise ValueError(f"tier ratios must have a positive sum, got {top}, {mid}, {bottom}")
    if abs(total - 1.0) <= RATIO_TOLERANCE:
        return top, mid, bottom
    warnings.warn(f"tier ratios sum to {total:.4f}, not 1.0: normalizing", stacklevel=2)
    return top / total, mid / total, bottom / total


def three_tier_counts(n_tiles: int, top: float, mid: float, bottom: float) -> tuple[int, int]:
    """(dense tiles, 2:4 tiles) of a matrix of ``n_tiles`` tiles: ``int(T * ratio)`` of the normalized ratios."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # warned once per run by the caller, not per matrix
        top, mid, _ = normalized_tier_ratios(top, mid, bottom)
    return int(n_tiles * top), int(n_tiles * mid)


def expected_three_tier_sparsity(block_size: int, top: float, mid: float, bottom: float, k: int) -> float:
    """Sparsity of full tiles without ties: ``mid / 2 + bottom * (1 - k / b^2)`` (normalized ratios)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, mid, bottom = normalized_tier_ratios(top, mid, bottom)
    return mid / 2 + bottom * max(0.0, 1 - k / block_size**2)


def three_tier_ratios_for(
    sparsity: float, block_size: int, top: float, mid: float, bottom: float, k: int
) -> tuple[float, float, float]:
    """Tier ratios with the 2:4 share kept and tiles moved between dense and top-k so that full tiles give
    ``sparsity`` (OWL's per-layer target); clamped to the reachable range ``[mid/2, mid/2 + (1-mid)(1-k/b^2)]``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, mid, _ = normalized_tier_ratios(top, mid, bottom)
    topk_sparsity = max(0.0, 1 - k / block_size**2)
    bottom = (sparsity - mid / 2) / topk_sparsity if topk_sparsity else 0.0
    bottom = min(max(bottom, 0.0), 1 - mid)
    return 1 - mid - bottom, mid, bottom


def three_tier_mask(
    weight: torch.Tensor,
    act_sq_norms: torch.Tensor | None,
    block_size: int = 16,
    top_dense_ratio: float = 0.4,
    mid_2_4_ratio: float = 0.4,
    bottom_topk_ratio: float = 0.2,
    topk_per_block: int = 10,
    selection: TierSelection = TierSelection(),
    backend: str = "torch",
) -> tuple[torch.Tensor, TierCounts]:
    """(bool mask [O, C], True = prune; tiles per tier) of ``apply_three_tier_block_pruning`` (``selection``:
    the fork's by default). ``act_sq_norms`` fp32 [C], or None for magnitude (the score is ``|W|``)."""
    ops = kernel_ops(backend)
    scores = ops.tile_scores(weight, act_sq_norms, block_size)
    n_dense, n_24 = three_tier_counts(scores.numel(), top_dense_ratio, mid_2_4_ratio, bottom_topk_ratio)
    by_metric = selection.rank_by_metric and act_sq_norms is not None
    if selection.by_cost:
        tiers = _tiers_by_cost(ops, weight, act_sq_norms, block_size, topk_per_block, n_dense, n_24, selection)
    else:
        tiers = ops.tile_tiers(scores, n_dense, n_24, per_band=selection.per_band)
    mask, tiers = ops.tier_mask(
        weight, tiers, block_size, topk_per_block, act_sq_norms, variant="three_tier", rank_by_metric=by_metric
    )
    return mask, TierCounts.of(tiers)


def _tiers_by_cost(ops, weight, act_sq_norms, block_size, k, n_dense, n_24, selection: TierSelection) -> torch.Tensor:
    """Tiers from what each would prune: per tile, ``c_24`` and ``c_k``, the squared metric that 2:4 and top-k
    would remove (the output error energy, inputs taken as uncorrelated). Top-k goes to the tiles where it costs
    least over 2:4 (smallest ``c_k - c_24``; per band with ``bands``), then dense to the remaining tiles where
    2:4 would cost most (over the matrix). Same counts as the fork."""
    by_metric = selection.rank_by_metric and act_sq_norms is not None
    metric = ops.wanda_scores(weight, act_sq_norms) if act_sq_norms is not None else weight.abs().float()
    energy = metric * metric
    grid = tuple(-(-d // block_size) for d in weight.shape)
    costs = []
    for tier in (1, 2):  # 2:4 everywhere, then top-k everywhere
        tiers = torch.full(grid, tier, dtype=torch.int8, device=weight.device)
        pruned, _ = ops.tier_mask(weight, tiers, block_size, k, act_sq_norms, "three_tier", by_metric)
        costs.append(ops.tile_scores(energy * pruned, None, block_size))  # a tile mean: the sum up to b^2
    cost_24, cost_topk = costs
    kept = ops.tile_tiers(cost_topk - cost_24, n_dense + n_24, 0, per_band=selection.per_band)  # 0 = not top-k
    candidates = torch.where(kept == 0, cost_24, torch.full_like(cost_24, float("-inf")))
    dense = ops.tile_tiers(candidates, n_dense, 0)  # 0 = dense
    return torch.where(kept != 0, 2, torch.where(dense == 0, 0, 1)).to(torch.int8)


def hybrid_24_mask(
    weight: torch.Tensor,
    act_sq_norms: torch.Tensor | None,
    block_size: int = 16,
    topk_per_block: int = 10,
    top_blocks_ratio: float = 0.6,
    score_threshold: float = 0.8,
    backend: str = "torch",
) -> tuple[torch.Tensor, TierCounts]:
    """(bool mask, tiles per tier) of ``apply_hybrid_block_pruning_with_2_4``: the tiles scoring at least the
    ``int(T * top_blocks_ratio)``-th best score (ties included; every tile when that count is 0 or T, as in the
    fork) try 2:4, the others keep exactly ``topk_per_block`` entries."""
    ops = kernel_ops(backend)
    scores = ops.tile_scores(weight, act_sq_norms, block_size)
    n_tiles = scores.numel()
    n_top = int(n_tiles * top_blocks_ratio)
    if 0 < n_top < n_tiles:
        threshold = ops.kth_smallest(scores, n_tiles - n_top)  # the n_top-th largest
        top = scores >= threshold
    else:
        top = torch.ones_like(scores, dtype=torch.bool)
    tiers = torch.where(top, 1, 2).to(torch.int8)
    mask, tiers = ops.tier_mask(
        weight, tiers, block_size, topk_per_block, act_sq_norms, variant="hybrid_2_4", score_threshold=score_threshold
    )
    return mask, TierCounts.of(tiers)


@torch.no_grad()
def prune_tiers_(
    weight: torch.Tensor,
    mask: torch.Tensor,
    hinv: InverseHessian | None = None,
    blocksize: int = 128,
    backend: str = "torch",
) -> torch.Tensor:
    """Zero ``mask`` in ``weight``; with ``hinv`` (the input's factorised Hessian), run SparseGPT's OBS update with
    the mask fixed instead, so the kept weights compensate the pruned ones. Returns the mask."""
    if hinv is None:
        weight.masked_fill_(mask, 0)
        return mask
    return prune_sparsegpt_(weight, None, 0.5, 0, 0, blocksize, hinv=hinv, mask=mask, backend=backend)
