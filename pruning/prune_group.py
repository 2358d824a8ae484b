"""One Linear group of a decoder layer, pruned from its calibration statistics by a :class:`PruneConfig`.

Per Linear: a mask from the method's score (magnitude, Wanda, RIA; SparseGPT chooses its own during the OBS
sweep), refined by DSnoT (``refine="dsnot"``), then the weights zeroed, or updated by SparseGPT's OBS step with
the mask fixed (``reconstruction``); then, with ``refit``, the kept weights refit to their least-squares optimum on
the mask (``pruning.methods.refit``). With ``permute_channels`` the whole group is pruned in a permuted input order
(one permutation per input, from the group's stacked scores), which ``pruning.permutation`` then folds or carries.
"""

from __future__ import annotations

import torch
from torch import nn

from pruning.config import PruneConfig
from pruning.errors import OptionError
from pruning.methods import prune_ablate_, prune_magnitude_, prune_sparsegpt_, prune_wanda_, sparsegpt_inverse_hessian
from pruning.methods.dsnot import dsnot_mask
from pruning.methods.ops import kernel_ops
from pruning.methods.permute import head_permutation, lsa_refine, reallocation_permutation
from pruning.methods.refit import refit_on_support_
from pruning.methods.ria import ria_mask
from pruning.methods.tiers import TierCounts, hybrid_24_mask, prune_tiers_, three_tier_mask
from pruning.permutation import HEAD_STRUCTURED, apply_permutation_, attention_shape, is_folded
from pruning.statistics import GroupStatistics

MAX_TRITON_SPARSEGPT_BLOCK = 512  # the block kernel keeps a row tile of this many columns in registers
ATTENTION_PREFIX = "self_attn."


class MissingStatisticsError(OptionError):
    """A mask method needs calibration statistics that were not collected for it."""


def refines(config: PruneConfig, name: str) -> bool:
    """Whether DSnoT refines Linear ``name``: ``dsnot_skip_layer`` mlp skips all but attention (published default)."""
    if config.refine != "dsnot":
        return False
    attention = name.startswith(ATTENTION_PREFIX)
    return not (
        (config.dsnot_skip_layer == "mlp" and not attention) or (config.dsnot_skip_layer == "self_attn" and attention)
    )


def prune_group_(
    layer: nn.Module, group: list[str], stats: GroupStatistics | None, config: PruneConfig, backend: str
) -> TierCounts | None:
    """Prune every Linear of ``group`` in place; the tiles per tier (tile types), else None."""
    modules = dict(layer.named_modules())
    perm = None
    if config.permute_channels:
        perm = group_permutation(layer, group, stats, config, backend)
        stats = stats.permuted(perm)
    hinv = refit_hessian = None
    if stats is not None and stats.hessian is not None:
        if config.refit:
            refit_hessian = stats.hessian.clone()
        # One damped Cholesky factorization per input group (q/k/v share it); the Hessian's storage is its
        # workspace, since nothing else reads the Hessian afterwards.
        hinv = sparsegpt_inverse_hessian(stats.hessian, config.percdamp, inplace=True)
        stats.hessian = None
        if refit_hessian is not None:
            refit_hessian.diagonal().add_(hinv.damp)  # the problem SparseGPT solves: H + damp I
    if config.refit:
        _require(stats, "hessian", config, refit_hessian)
    tiers = None
    for name in group:
        weight = modules[name].weight.data
        work = weight[:, perm].contiguous() if perm is not None else weight
        dense = work.clone() if config.refit else None
        counts = _prune_matrix_(work, stats, config, backend, hinv, refines(config, name))
        if dense is not None:
            refit_on_support_(work, dense, refit_hessian, config.refit_iters)
            del dense
        if perm is not None:
            weight[:, perm] = work
        if counts is not None:
            tiers = counts if tiers is None else tiers + counts
    if perm is not None:
        apply_permutation_(layer, group, perm)
    return tiers


def _prune_matrix_(
    weight: torch.Tensor, stats: GroupStatistics | None, config: PruneConfig, backend: str, hinv, refine: bool
) -> TierCounts | None:
    n, m = config.nm
    sparsegpt_backend = backend if config.blocksize <= MAX_TRITON_SPARSEGPT_BLOCK else "torch"
    if config.tiered:
        norms = stats.act_sq_norms if stats is not None else None
        if config.sparsity_type == "three_tier":
            mask, counts = three_tier_mask(
                weight, norms, config.block_size, config.top_dense_ratio, config.mid_2_4_ratio,
                config.bottom_topk_ratio, config.topk_per_block, config.selection, backend=backend,
            )  # fmt: skip
        else:
            mask, counts = hybrid_24_mask(
                weight, norms, config.block_size, config.topk_per_block, config.top_blocks_ratio,
                config.score_threshold, backend=backend,
            )  # fmt: skip
        prune_tiers_(weight, mask, hinv, config.blocksize, backend=sparsegpt_backend)
        return counts
    if config.method in ("sparsegpt", "magnitude", "wanda") and not refine and not config.reconstruction:
        if config.method == "magnitude":  # the published methods, unchanged
            prune_magnitude_(weight, config.sparsity_ratio, n, m, backend=backend)
        elif config.method == "wanda":
            _require(stats, "act_sq_norms", config)
            prune_wanda_(weight, stats.act_sq_norms, config.sparsity_ratio, n, m, config.use_variant, backend=backend)
        else:
            prune_sparsegpt_(weight, None, config.sparsity_ratio, n, m, config.blocksize, hinv=hinv,
                             backend=sparsegpt_backend)  # fmt: skip
        return None
    if config.method.startswith("ablate_"):
        prune_ablate_(weight, config.method, hinv, stats.ablate_scaler, config.sparsity_ratio, n, m,
                      config.blocksize, backend=sparsegpt_backend)  # fmt: skip
        return None
    scores, mask = initial_mask(weight, stats, config, hinv, backend)
    if refine:
        _require(stats, "moments", config)
        _require(stats, "act_sq_norms", config)
        mask = dsnot_mask(
            weight, mask, scores, stats.act_sq_norms, stats.moments, n, m, config.dsnot_update_threshold,
            config.dsnot_max_cycles, config.dsnot_pow_of_var_regrowing, backend=backend,
        )  # fmt: skip
    if config.reconstruction:
        _require(stats, "hinv", config, hinv)
        prune_tiers_(weight, mask, hinv, config.blocksize, backend=sparsegpt_backend)
    else:
        weight.masked_fill_(mask, 0)
    return None


def initial_mask(
    weight: torch.Tensor, stats: GroupStatistics | None, config: PruneConfig, hinv, backend: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(the method's fp32 score, its mask): what DSnoT and the reconstruction start from. SparseGPT's score is
    its OBS saliency ``w^2 / U_jj^2`` without the updates, as DSnoT's ``initial_method sparsegpt``."""
    ops = kernel_ops(backend)
    n, m = config.nm
    if config.method == "magnitude":
        return weight.abs().float(), ops.magnitude_mask(weight, config.sparsity_ratio, n, m)
    if config.method == "sparsegpt":
        _require(stats, "hinv", config, hinv)
        w = weight.float().masked_fill(hinv.dead[None, :], 0.0)
        scores = w.pow(2) / torch.diagonal(hinv.hinv).pow(2)[None, :]
    else:
        _require(stats, "act_sq_norms", config)
        if config.method == "ria":
            scores = ops.ria_scores(weight, stats.act_sq_norms, config.ria_a)
            return scores, ria_mask(scores, config.sparsity_ratio, n, m, backend)
        scores = ops.wanda_scores(weight, stats.act_sq_norms)
    mask = ops.nm_mask(scores, n, m) if n else ops.unstructured_mask(scores, config.sparsity_ratio)
    return scores, mask


def group_scores(weight: torch.Tensor, stats: GroupStatistics, config: PruneConfig, backend: str) -> torch.Tensor:
    """The score that orders a Linear's input channels for the permutation: the method's own (RIA, Wanda), and
    for SparseGPT (and its ablations) Wanda's with ``||X_j||^2`` read from the Hessian's diagonal."""
    ops = kernel_ops(backend)
    if config.method == "ria":
        return ops.ria_scores(weight, stats.act_sq_norms, config.ria_a)
    if config.method == "sparsegpt" or config.method.startswith("ablate_"):
        _require(stats, "hessian", config, stats.hessian)
        return ops.wanda_scores(weight, torch.diagonal(stats.hessian).clamp(min=0).contiguous())
    _require(stats, "act_sq_norms", config)
    return ops.wanda_scores(weight, stats.act_sq_norms)


def group_permutation(
    layer: nn.Module, group: list[str], stats: GroupStatistics, config: PruneConfig, backend: str
) -> torch.Tensor:
    """One input permutation for ``group`` (its Linears share the input): channel reallocation of the stacked
    scores, refined by linear sum assignment (``lsa``); inside each head for an attention output projection."""
    n, m = config.nm
    scores = torch.cat([group_scores(layer.get_submodule(name).weight.data, stats, config, backend) for name in group])
    if is_folded(layer, group) and group[0] in HEAD_STRUCTURED:
        head_dim, kv_heads = attention_shape(layer, group[0])
        if head_dim % m:
            raise OptionError(f"{{permute_channels}} needs the head size ({head_dim}) of {group[0]} divisible by {m}")
        return head_permutation(scores.sum(dim=0), head_dim, kv_heads, m)
    perm = reallocation_permutation(scores.sum(dim=0), m)
    if config.lsa:
        perm = lsa_refine(scores, perm, n, m)
    return perm


def _require(stats: GroupStatistics | None, what: str, config: PruneConfig, value=None) -> None:
    present = value if what in ("hinv", "hessian") else getattr(stats, what, None) if stats is not None else None
    if present is None:
        needs = {
            "act_sq_norms": "the squared input norms (Wanda's statistic)",
            "moments": "the input means and variances (DSnoT's statistics)",
            "hinv": "the input Hessian (SparseGPT's statistic)",
            "hessian": "the input Hessian (SparseGPT's statistic)",
        }[what]
        raise MissingStatisticsError(
            f"{{method}} {config.method} with these options needs {needs}, which this run did not collect; "
            "collect statistics with pruning.statistics.collected_for(config)"
        )
