"""One Linear group of a decoder layer, pruned from its calibration statistics by a :class:`PruneConfig`.

Per Linear: a mask from the method's score (magnitude, Wanda, RIA; SparseGPT chooses its own during the OBS
sweep, ALPS and ADMM theirs by optimization), refined by DSnoT (``refine="dsnot"``), then the weights zeroed, or
updated with the mask fixed by SparseGPT's OBS step (``reconstruction``) or by ADMM (``refine="admm"``); then, with
``refit``, the kept weights refit to their least-squares optimum on the mask (``pruning.methods.refit``). Each
Linear's relative reconstruction error is measured on the way (``reconstruction_error``). With ``permute_channels``
the whole group is pruned in a permuted input order (one permutation per input, from the group's stacked scores),
which ``pruning.permutation`` then folds or carries.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from pruning.config import OPTIMIZERS, PruneConfig
from pruning.errors import OptionError
from pruning.methods import prune_ablate_, prune_magnitude_, prune_sparsegpt_, prune_wanda_, sparsegpt_inverse_hessian
from pruning.methods.admm import admm_gram, prune_admm_
from pruning.methods.alps import alps_gram, prune_alps_
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


@dataclass
class GroupResult:
    """What pruning one group gave: tiles per tier (tile types), and each Linear's relative reconstruction error."""

    tiers: TierCounts | None = None
    errors: dict[str, float] = field(default_factory=dict)
    error_kind: str = "weights"  # hessian (exact), norms (its diagonal, Wanda's proxy) or weights (||dW|| only)


def needs_inverse(config: PruneConfig) -> bool:
    """Whether the group's Hessian is factorized for SparseGPT's OBS (updates, saliency, the refit's damping)."""
    obs = config.method == "sparsegpt" or config.method.startswith("ablate_") or config.reconstruction
    return obs or config.refit or (config.tiered and config.selection.obs_update)


def prune_group_(
    layer: nn.Module, group: list[str], stats: GroupStatistics | None, config: PruneConfig, backend: str
) -> GroupResult:
    """Prune every Linear of ``group`` in place."""
    modules = dict(layer.named_modules())
    perm = None
    if config.permute_channels:
        perm = group_permutation(layer, group, stats, config, backend)
        stats = stats.permuted(perm)
    hessian = hinv = refit_hessian = None
    if stats is not None and stats.hessian is not None:
        hessian, stats.hessian = stats.hessian, None
        if needs_inverse(config):
            # One damped Cholesky factorization per input group (q/k/v share it), in a copy: the Hessian itself
            # measures the reconstruction error and feeds the refit and ADMM.
            hinv = sparsegpt_inverse_hessian(hessian.clone(), config.percdamp, inplace=True)
        if config.refit:
            refit_hessian = hessian.clone()
            refit_hessian.diagonal().add_(hinv.damp)  # the problem SparseGPT solves: H + damp I
    if config.refit:
        _require(stats, "hessian", config, refit_hessian)
    optimizer = optimizer_gram(hessian, config) if config.method in OPTIMIZERS or config.refine == "admm" else None
    result = GroupResult()
    for name in group:
        weight = modules[name].weight.data
        work = weight[:, perm].contiguous() if perm is not None else weight
        dense = work.clone()
        counts = _prune_matrix_(work, stats, config, backend, hinv, refines(config, name), optimizer)
        if refit_hessian is not None:
            refit_on_support_(work, dense, refit_hessian, config.refit_iters)
        result.errors[name], result.error_kind = reconstruction_error(work, dense, hessian, stats)
        del dense
        if perm is not None:
            weight[:, perm] = work
        if counts is not None:
            result.tiers = counts if result.tiers is None else result.tiers + counts
    if perm is not None:
        apply_permutation_(layer, group, perm)
    return result


def optimizer_gram(hessian: torch.Tensor | None, config: PruneConfig):
    """ALPS's normalized Gram and eigendecomposition, or ADMM's damped Gram: once per input group."""
    if hessian is None:
        raise MissingStatisticsError(
            f"{{method}} {config.method} with these options needs the input Hessian, which this run did not collect; "
            "collect statistics with pruning.statistics.collected_for(config)"
        )
    if config.method == "alps":
        return alps_gram(hessian)
    return admm_gram(hessian, config.admm_percdamp)


def reconstruction_error(
    pruned: torch.Tensor, dense: torch.Tensor, hessian: torch.Tensor | None, stats: GroupStatistics | None
) -> tuple[float, str]:
    """(relative error, its kind): ``||X (W - W0)^T||^2 / ||X W0^T||^2`` exactly from the Hessian (undamped, ALPS's
    objective without its ridge); from its diagonal, Wanda's squared norms, where only those were collected; else
    ``||W - W0||^2 / ||W0||^2``."""
    delta = pruned.float() - dense.float()
    reference = dense.float()
    if hessian is not None:
        numerator, denominator = ((delta @ hessian) * delta).sum(), ((reference @ hessian) * reference).sum()
        kind = "hessian"
    elif stats is not None and stats.act_sq_norms is not None:
        numerator, denominator = (delta.pow(2) @ stats.act_sq_norms), (reference.pow(2) @ stats.act_sq_norms)
        numerator, denominator, kind = numerator.sum(), denominator.sum(), "norms"
    else:
        numerator, denominator, kind = delta.pow(2).sum(), reference.pow(2).sum(), "weights"
    denominator = float(denominator)
    return (float(numerator) / denominator if denominator > 0 else 0.0), kind


def _prune_matrix_(
    weight: torch.Tensor, stats: GroupStatistics | None, config: PruneConfig, backend: str, hinv, refine: bool,
    optimizer=None,
) -> TierCounts | None:  # fmt: skip
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
        if config.refine == "admm":
            _admm_update_(weight, mask, optimizer, config)
        else:
            prune_tiers_(weight, mask, hinv, config.blocksize, backend=sparsegpt_backend)
        return counts
    if config.method == "alps":
        prune_alps_(weight, optimizer, config.sparsity_ratio, n, m, config.alps_rho, config.alps_max_iter,
                    config.alps_update_iter, config.alps_switch_iter, config.alps_cg_iters)  # fmt: skip
        return None
    if config.method == "admm":
        gram, scale = optimizer
        prune_admm_(weight, gram, scale, config.sparsity_ratio, n, m, config.admm_iterative_prune, config.admm_iters,
                    config.admm_per_out)  # fmt: skip
        return None
    fixed_mask_update = config.reconstruction or config.refine == "admm"
    if config.method in ("sparsegpt", "magnitude", "wanda") and not refine and not fixed_mask_update:
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
    elif config.refine == "admm":
        _admm_update_(weight, mask, optimizer, config)
    else:
        weight.masked_fill_(mask, 0)
    return None


def _admm_update_(weight: torch.Tensor, mask: torch.Tensor, optimizer, config: PruneConfig) -> None:
    """``--refine admm``: the ADMM weight update with ``mask`` (True = pruned) fixed."""
    gram, scale = optimizer
    prune_admm_(weight, gram, scale, iters=config.admm_iters, mask=mask)


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
    if config.method in ("sparsegpt", *OPTIMIZERS) or config.method.startswith("ablate_"):
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
