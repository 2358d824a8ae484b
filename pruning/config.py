"""Typed pruning configuration: what to prune and how (library code takes this, never an argparse Namespace)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, fields

from pruning.errors import OptionError, quote
from pruning.methods.ablate import ABLATE_METHODS
from pruning.methods.dsnot import SKIP_LAYERS
from pruning.methods.owl import ALLOCATIONS
from pruning.methods.tiers import TIER_TYPES, TierSelection, expected_three_tier_sparsity
from wanda_kernels.policy import BACKENDS
from wanda_kernels.reference_tiers import MAX_BLOCK_SIZE

METHODS = (
    "magnitude", "wanda", "sparsegpt", "ria", "alps", "admm",
    # locuslab/wanda's ablations: SparseGPT's updates, the mask chosen by Wanda's or the magnitude metric
    "ablate_mag_seq", "ablate_wanda_seq", "ablate_mag_iter", "ablate_wanda_iter",
)  # fmt: skip
REFINES = ("none", "dsnot", "admm")
OPTIMIZERS = ("alps", "admm")  # methods that solve the layer problem on XᵀX by ADMM (pruning.methods.alps, .admm)


def parse_sparsity_type(sparsity_type: str) -> tuple[int, int]:
    """'unstructured' (and the tile types three_tier, hybrid_2_4) -> (0, 0); 'N:M' -> (N, M) with 0 < N < M."""
    if sparsity_type == "unstructured" or sparsity_type in TIER_TYPES:
        return 0, 0
    match = re.fullmatch(r"(\d+):(\d+)", sparsity_type or "")
    if not match:
        raise ValueError(
            f"sparsity_type must be 'unstructured', 'N:M' such as '2:4' or '4:8', 'three_tier' or 'hybrid_2_4'; "
            f"got {sparsity_type!r}"
        )
    n, m = int(match.group(1)), int(match.group(2))
    if not 0 < n < m:
        raise ValueError(f"sparsity_type {sparsity_type!r} needs 0 < N < M")
    return n, m


@dataclass
class PruneConfig:
    method: str = "wanda"
    sparsity_ratio: float = 0.5
    sparsity_type: str = "unstructured"
    use_variant: bool = False  # Wanda's per-row cumulative-alpha variant (unstructured only)
    true_sequential: bool = False  # statistics for later sublayers after earlier ones are pruned
    backend: str = "auto"  # triton on CUDA, torch on CPU
    calib_batch_size: int | None = None  # calibration samples per forward; None = from a memory budget
    blocksize: int = 128  # SparseGPT
    percdamp: float = 0.01  # SparseGPT
    # Tile pruning (sparsity_type three_tier / hybrid_2_4; Jiajun-Ji/wanda's names and defaults)
    block_size: int = 16
    top_dense_ratio: float = 0.4
    mid_2_4_ratio: float = 0.4
    bottom_topk_ratio: float = 0.2
    topk_per_block: int = 10
    top_blocks_ratio: float = 0.6  # hybrid_2_4
    score_threshold: float = 0.8  # hybrid_2_4
    tier_selection: str = "fork"  # three_tier: fork, balanced, or ingredients joined by '+'
    # Better masks: RIA's exponent (--a), DSnoT (zyxxmu/DSnoT's defaults), channel permutation for N:M (RIA's
    # reallocation, lsa its refinement) and the OBS update with the final mask fixed (RIA's --reconstruction)
    ria_a: float = 0.5
    refine: str = "none"  # none | dsnot (mask) | admm (weights on the mask)
    dsnot_update_threshold: float = 0.1
    dsnot_max_cycles: int = 50
    dsnot_pow_of_var_regrowing: float = 1.0
    dsnot_skip_layer: str = "mlp"  # mlp (refine attention only, published) | self_attn | no_skip
    permute_channels: bool = False
    lsa: bool = False
    reconstruction: bool = False
    refit: bool = False  # least-squares refit of the kept weights on their support (pruning.methods.refit)
    refit_iters: int = 10
    # ALPS (mazumder-lab/ALPS's ALPS_admm defaults) and the ADMM weight update (fmfi-compbio/admm-pruning's)
    alps_rho: float = 0.1
    alps_max_iter: int = 300
    alps_update_iter: int = 3
    alps_switch_iter: int = 30
    alps_cg_iters: int = 10
    admm_iters: int = 20
    admm_iterative_prune: int = 15  # steps that choose the mask again (not with --refine admm: the mask is given)
    admm_percdamp: float = 0.1
    admm_per_out: bool = False  # unstructured: per output row instead of over the whole matrix
    # Layer allocation (luuyin/OWL's names: Hyper_m, Lamda)
    allocation: str = "uniform"
    owl_m: float = 5.0
    owl_lambda: float = 0.08

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise OptionError(f"{{method}} must be one of {', '.join(METHODS)}, got {quote(repr(self.method))}")
        if self.backend not in BACKENDS:
            raise OptionError(f"{{backend}} must be one of {', '.join(BACKENDS)}, got {quote(repr(self.backend))}")
        if isinstance(self.sparsity_ratio, bool) or not isinstance(self.sparsity_ratio, (int, float)):
            raise ValueError(f"sparsity_ratio must be a number in [0, 1), got {self.sparsity_ratio!r}")
        if not 0.0 <= self.sparsity_ratio < 1.0:
            raise ValueError(f"sparsity_ratio must be in [0, 1), got {self.sparsity_ratio}")
        n, m = parse_sparsity_type(self.sparsity_type)  # ValueError naming the choices
        if m and abs(self.sparsity_ratio - n / m) > 1e-9:
            raise OptionError(
                f"sparsity_type {self.sparsity_type} prunes exactly {n}/{m} = {n / m:g} of the weights; "
                f"use {{sparsity_ratio}} {n / m:g} (got {self.sparsity_ratio})"
            )
        if self.use_variant and (self.method != "wanda" or m or self.tiered):
            raise OptionError("{use_variant} is Wanda's unstructured variant: use it with {method} wanda, unstructured")
        if self.calib_batch_size is not None and self.calib_batch_size <= 0:
            raise ValueError(f"calib_batch_size must be positive, got {self.calib_batch_size}")
        if self.blocksize <= 0 or not 0 < self.percdamp:
            raise ValueError("SparseGPT needs blocksize > 0 and percdamp > 0")
        self._check_tiers()
        self._check_allocation()
        self._check_masks()
        self._check_optimizers()

    def _check_optimizers(self) -> None:
        for name in ("alps_max_iter", "alps_update_iter", "alps_cg_iters", "admm_iters"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise OptionError(f"{{{name}}} must be a positive integer, got {value!r}")
        for name in ("alps_switch_iter", "admm_iterative_prune"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise OptionError(f"{{{name}}} must be a non-negative integer, got {value!r}")
        for name in ("alps_rho", "admm_percdamp"):
            value = getattr(self, name)
            if not (_finite(value) and value > 0):
                raise OptionError(f"{{{name}}} must be a positive number, got {value!r}")
        if self.method == "admm" and self.admm_iterative_prune > self.admm_iters:
            raise OptionError(
                f"{{admm_iterative_prune}} ({self.admm_iterative_prune}) chooses the mask during the first steps of "
                f"{{admm_iters}} ({self.admm_iters}): it cannot be larger (the mask would end short of the sparsity)"
            )
        if self.admm_per_out and (self.method != "admm" or self.nm[1]):
            raise OptionError("{admm_per_out} is {method} admm's unstructured per-row sparsity: drop it here")
        if self.refine == "admm":
            if self.reconstruction:
                raise OptionError("{refine} admm and {reconstruction} both update the kept weights: choose one")
            if self.tiered and self.selection.obs_update:
                raise OptionError(
                    "{refine} admm and {tier_selection}'s obs both update the kept weights: drop obs or the refine"
                )

    def _check_masks(self) -> None:
        n, m = self.nm
        if not (_finite(self.ria_a) and self.ria_a >= 0):
            raise OptionError(f"{{ria_a}} must be a non-negative number (RIA's a, default 0.5), got {self.ria_a}")
        if self.refine not in REFINES:
            raise OptionError(f"{{refine}} must be one of {', '.join(REFINES)}, got {quote(repr(self.refine))}")
        if self.dsnot_skip_layer not in SKIP_LAYERS:
            raise OptionError(
                f"{{dsnot_skip_layer}} must be one of {', '.join(SKIP_LAYERS)}, "
                f"got {quote(repr(self.dsnot_skip_layer))}"
            )
        if not (_finite(self.dsnot_update_threshold) and self.dsnot_update_threshold >= 0):
            raise OptionError(
                f"{{dsnot_update_threshold}} must be a non-negative number, got {self.dsnot_update_threshold}"
            )
        if (
            isinstance(self.dsnot_max_cycles, bool)
            or not isinstance(self.dsnot_max_cycles, int)
            or self.dsnot_max_cycles < 0
        ):
            raise OptionError(f"{{dsnot_max_cycles}} must be a non-negative integer, got {self.dsnot_max_cycles!r}")
        if not (_finite(self.dsnot_pow_of_var_regrowing) and self.dsnot_pow_of_var_regrowing >= 0):
            raise OptionError(
                f"{{dsnot_pow_of_var_regrowing}} must be a non-negative number, got {self.dsnot_pow_of_var_regrowing}"
            )
        mask_methods = ("wanda", "ria", "magnitude", "sparsegpt")
        if self.method == "ria" and self.tiered:
            raise OptionError("{method} ria prunes unstructured or N:M: tile types rank by Wanda's metric (use wanda)")
        if self.refine == "admm":
            if self.method not in mask_methods:
                raise OptionError(
                    "{refine} admm updates the weights on the mask of {method} wanda, ria, magnitude or sparsegpt "
                    "(or a tile type's); {method} admm chooses its own mask"
                )
            if self.use_variant:
                raise OptionError("{refine} admm starts from Wanda's per-row mask: drop {use_variant}")
        elif self.refine != "none":
            if self.method not in mask_methods or self.tiered:
                raise OptionError(
                    "{refine} dsnot refines the mask of {method} wanda, ria, magnitude or sparsegpt "
                    "(unstructured or N:M)"
                )
            if self.use_variant:
                raise OptionError("{refine} dsnot starts from Wanda's per-row mask: drop {use_variant}")
        if self.permute_channels:
            if not m:
                raise OptionError(
                    "{permute_channels} reorders input channels so that N:M groups keep more: use an N:M "
                    f"{{sparsity_type}} such as 2:4 (got {self.sparsity_type})"
                )
            if self.method not in ("wanda", "ria", "sparsegpt", *OPTIMIZERS, *ABLATE_METHODS):
                raise OptionError(
                    "{permute_channels} is for {method} wanda, ria, sparsegpt, alps, admm or an ablate_* method"
                )
        if self.lsa and not self.permute_channels:
            raise OptionError("{lsa} refines the channel permutation: add {permute_channels}")
        if self.reconstruction and (self.method not in mask_methods or self.tiered):
            raise OptionError("{reconstruction} updates the weights of {method} wanda, ria or magnitude masks")
        if isinstance(self.refit_iters, bool) or not isinstance(self.refit_iters, int) or self.refit_iters < 1:
            raise OptionError(f"{{refit_iters}} must be a positive integer, got {self.refit_iters!r}")
        if self.reconstruction and self.method == "sparsegpt" and self.refine == "none":
            raise OptionError(
                "{method} sparsegpt already updates the weights as it prunes; {reconstruction} is for a fixed mask "
                "(wanda, ria, magnitude, or sparsegpt with {refine} dsnot)"
            )

    def _check_tiers(self) -> None:
        selection = TierSelection.parse(self.tier_selection)  # ValueError naming the choices
        if not self.tiered:
            return
        if self.method in OPTIMIZERS:
            raise OptionError(
                f"{{method}} {self.method} solves for an unstructured or N:M pattern; for {self.sparsity_type} use "
                "{method} wanda with {refine} admm (the ADMM weight update on the tile mask)"
            )
        if self.method not in ("wanda", "magnitude"):
            raise OptionError(
                f"{{sparsity_type}} {self.sparsity_type} ranks tiles by Wanda's metric or by |W|: use {{method}} wanda "
                "or magnitude (SparseGPT's update is the 'obs' part of {tier_selection} balanced)"
            )
        if not (isinstance(self.block_size, int) and 1 <= self.block_size <= MAX_BLOCK_SIZE):
            raise OptionError(f"{{block_size}} must be an integer in [1, {MAX_BLOCK_SIZE}], got {self.block_size!r}")
        if isinstance(self.topk_per_block, bool) or not isinstance(self.topk_per_block, int) or self.topk_per_block < 1:
            raise OptionError(f"{{topk_per_block}} must be a positive integer, got {self.topk_per_block!r}")
        ratios = (self.top_dense_ratio, self.mid_2_4_ratio, self.bottom_topk_ratio)
        if any(not _finite(r) or r < 0 for r in ratios) or sum(ratios) <= 0:
            raise OptionError(
                "{top_dense_ratio}, {mid_2_4_ratio} and {bottom_topk_ratio} must be non-negative with a positive sum "
                f"(they are normalized to 1), got {', '.join(map(str, ratios))}"
            )
        if not (_finite(self.top_blocks_ratio) and 0 <= self.top_blocks_ratio <= 1):
            raise OptionError(f"{{top_blocks_ratio}} must be in [0, 1], got {self.top_blocks_ratio}")
        if not (_finite(self.score_threshold) and self.score_threshold >= 0):
            raise OptionError(f"{{score_threshold}} must be a non-negative number, got {self.score_threshold}")
        if self.tier_selection != "fork" and self.sparsity_type != "three_tier":
            raise OptionError("{tier_selection} chooses three_tier's tiers; hybrid_2_4 runs as the fork does (fork)")
        if self.method == "magnitude" and (selection.rank_by_metric or selection.obs_update):
            raise OptionError(
                f"{{tier_selection}} {self.tier_selection} needs calibration activations (metric, obs), which "
                "magnitude does not use: use {method} wanda, or {tier_selection} bands"
            )

    def _check_allocation(self) -> None:
        if self.allocation not in ALLOCATIONS:
            raise OptionError(
                f"{{allocation}} must be one of {', '.join(ALLOCATIONS)}, got {quote(repr(self.allocation))}"
            )
        if self.allocation == "uniform":
            return
        if self.method not in ("wanda", "magnitude", "sparsegpt", "ria", *OPTIMIZERS):
            raise OptionError("{allocation} owl is for {method} wanda, ria, magnitude, sparsegpt, alps or admm")
        if self.sparsity_type not in ("unstructured", "three_tier"):
            raise OptionError(
                "{allocation} owl gives each layer its own sparsity, which N:M and hybrid_2_4 cannot take (2:4 "
                "hardware needs exactly 2 of 4 in every layer): use {sparsity_type} unstructured or three_tier"
            )
        if self.sparsity_type == "unstructured" and self.sparsity_ratio <= 0:
            raise OptionError("{allocation} owl spreads {sparsity_ratio} over the layers: give it a value above 0")
        if not (_finite(self.owl_m) and self.owl_m > 0):
            raise OptionError(f"{{owl_m}} must be a positive number (OWL's M, default 5), got {self.owl_m}")
        if not (_finite(self.owl_lambda) and self.owl_lambda >= 0):
            raise OptionError(f"{{owl_lambda}} must be a non-negative number (OWL's lambda), got {self.owl_lambda}")
        if self.owl_mean_sparsity + 2 * self.owl_lambda >= 1:
            raise OptionError(
                f"{{owl_lambda}} {self.owl_lambda} lets a layer's sparsity reach the mean {self.owl_mean_sparsity:g} "
                f"+ 2 * lambda = {self.owl_mean_sparsity + 2 * self.owl_lambda:g} >= 1: use a smaller {{owl_lambda}}"
            )

    @property
    def owl_mean_sparsity(self) -> float:
        """The mean sparsity OWL spreads over the layers: ``sparsity_ratio``, or three_tier's full-tile sparsity."""
        if self.sparsity_type == "three_tier":
            return expected_three_tier_sparsity(
                self.block_size, self.top_dense_ratio, self.mid_2_4_ratio, self.bottom_topk_ratio, self.topk_per_block
            )
        return self.sparsity_ratio

    @property
    def tiered(self) -> bool:
        """three_tier or hybrid_2_4: the tiers set the sparsity, and ``sparsity_ratio`` is not used."""
        return self.sparsity_type in TIER_TYPES

    @property
    def prunes(self) -> bool:
        """Whether anything is pruned: ``sparsity_ratio > 0``, or a tile type (whose tiers set the sparsity)."""
        return self.tiered or self.sparsity_ratio > 0

    @property
    def selection(self) -> TierSelection:
        return TierSelection.parse(self.tier_selection)

    @property
    def nm(self) -> tuple[int, int]:
        return parse_sparsity_type(self.sparsity_type)

    @property
    def needs_calibration(self) -> bool:
        """Whether pruning reads activations: every method but magnitude (which does with OWL, DSnoT or the
        reconstruction), unless nothing is pruned."""
        return (self.layer_statistics or self.allocation == "owl") and self.prunes

    @property
    def layer_statistics(self) -> bool:
        """Whether each layer is pruned from calibration statistics (all but plain magnitude)."""
        return self.method != "magnitude" or self.refine != "none" or self.reconstruction or self.refit

    @classmethod
    def from_options(cls, **options) -> PruneConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise TypeError(f"unknown pruning option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**options)


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
