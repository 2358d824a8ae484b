"""OWL, outlier-weighted layer sparsity (Yin et al., ICML 2024; luuyin/OWL ``lib/prune_all.py``).

A layer's outlier ratio ``D_l`` is the percentage of its Wanda scores ``|W| * sqrt(a)``, over all its Linears
together, above ``m`` times their mean (``check_outlier_mean``), measured on the dense model. Then
``D = (D - min D) / (max D - min D) * 2 lambda``, ``D = D - mean(D) + (1 - S)`` and layer ``l`` is pruned to
``S_l = 1 - D_l``: layers with more outliers keep more weights, the mean sparsity stays ``S``. A layer whose
``S_l`` falls to 0 or below is pruned to 0.01, as OWL's Wanda does. All layers equal (or one layer): ``S`` each.
"""

from __future__ import annotations

import torch

ALLOCATIONS: tuple[str, ...] = ("uniform", "owl")
OWL_MIN_SPARSITY = 0.01  # prune_wanda_outlier: ``if layer_sparsity_ratio <= 0: layer_sparsity_ratio = 0.01``


class OutlierCounter:
    """Accumulates one layer's outlier ratio over its score matrices, in two passes (no concatenation): first
    every matrix's sum (:meth:`add_sum`), then every matrix's count above ``m * mean`` (:meth:`add_count`)."""

    def __init__(self, m: float):
        self.m = m
        self.total = 0.0
        self.numel = 0
        self.above = 0

    def add_sum(self, scores: torch.Tensor) -> None:
        self.total += float(scores.sum(dtype=torch.float64))
        self.numel += scores.numel()

    @property
    def threshold(self) -> float:
        return self.m * self.total / max(self.numel, 1)

    def add_count(self, scores: torch.Tensor) -> None:
        self.above += int((scores > self.threshold).sum())

    @property
    def ratio(self) -> float:
        """Percent of scores above ``m`` times the mean."""
        return self.above / max(self.numel, 1) * 100


def owl_layer_sparsities(outlier_ratios: list[float], sparsity: float, owl_lambda: float) -> list[float]:
    """Per layer, the sparsity OWL gives it from the layers' outlier ratios (percent), for mean ``sparsity``."""
    low, high = min(outlier_ratios), max(outlier_ratios)
    if high == low:  # OWL would divide by zero here
        return [sparsity] * len(outlier_ratios)
    scaled = [(d - low) * (1 / (high - low) * owl_lambda * 2) for d in outlier_ratios]
    mean = sum(scaled) / len(scaled)
    density = [d - mean + (1 - sparsity) for d in scaled]
    return [OWL_MIN_SPARSITY if 1 - d <= 0 else 1 - d for d in density]
