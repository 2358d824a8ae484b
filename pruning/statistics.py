"""Calibration statistics of a decoder layer's Linear groups, from one pass of the layer over every batch.

What is collected follows the method: Wanda (and OWL's outlier pass), the fp32 sum of squared inputs per input
feature (RIA too); SparseGPT, ALPS, ADMM and Wanda's ablations, the fp32 Hessian ``2/N X^T X``; tile pruning with
the OBS update, the fixed-mask ``reconstruction`` and the weight updates (``refit``, ``refine admm``) both; DSnoT
also each feature's sum and within-sample squared deviations (``accumulate_moments_``, the same pass as the norms).
Inputs shared by q/k/v (or LLaMA's gate/up) are accumulated once per group, by a hook on its first Linear.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from pruning.adapters import UnsupportedModelError
from pruning.config import PruneConfig
from pruning.errors import OptionError
from pruning.layerwise import LayerInputs, StopForward, feed_layer
from pruning.methods import accumulate_ablate_scaler_, accumulate_hessian_, kernel_ops
from pruning.methods.dsnot import ChannelMoments


class UnsupportedModelOptionError(UnsupportedModelError, OptionError):
    """The model cannot be pruned as asked; another option value can."""


def collected_for(config: PruneConfig) -> tuple[str, bool]:
    """(statistic kind: "norms", "hessian" or an ablate method, whether norms too) that ``config`` prunes from;
    whether input means and variances too: :func:`moments_for`."""
    weight_update = config.refit or config.refine == "admm"  # on the mask, from the Hessian
    if config.tiered:
        return ("hessian", True) if config.selection.obs_update or weight_update else ("norms", False)
    if config.method in ("wanda", "magnitude", "ria"):  # magnitude reads activations only for OWL and DSnoT
        return ("hessian", True) if config.reconstruction or weight_update else ("norms", False)
    if config.method in ("alps", "admm"):
        return "hessian", False
    if config.method == "sparsegpt":
        return "hessian", config.refine == "dsnot"  # DSnoT's unstructured swaps prune in Wanda's order
    return config.method, False


def moments_for(config: PruneConfig) -> bool:
    """Whether ``config`` needs each input channel's mean and variance (DSnoT)."""
    return config.refine == "dsnot"


class GroupStatistics:
    """Calibration statistics of one Linear group, fed by a forward hook on the group's first module."""

    def __init__(
        self, kind: str, n_features: int, device: torch.device, backend: str, norms_too: bool = False,
        moments: bool = False,
    ):  # fmt: skip
        self.ops = kernel_ops(backend)
        self.ablate_scaler = None
        self.act_sq_norms = None
        self.hessian = None
        self.sums = self.sq_deviations = None  # DSnoT's moments, accumulated with the norms in one pass
        self.samples = self.tokens = 0
        if moments:
            norms_too = True
            self.sums = torch.zeros(n_features, dtype=torch.float32, device=device)
            self.sq_deviations = torch.zeros(n_features, dtype=torch.float32, device=device)
        self.samples_in_batch = 0  # set per batch: a Linear may see its input flattened to [samples * T, C] (OPT)
        self.inputs_seen = 0  # batches
        if kind == "norms" or norms_too:
            self.act_sq_norms = torch.zeros(n_features, dtype=torch.float32, device=device)
        if kind != "norms":  # SparseGPT and Wanda's ablations of it
            self.hessian = torch.zeros(n_features, n_features, dtype=torch.float32, device=device)
            self.n_seen = 0
            if kind.startswith("ablate_wanda"):
                self.ablate_scaler = torch.zeros(n_features, dtype=torch.float32, device=device)

    def add(self, x: torch.Tensor) -> None:
        self.inputs_seen += 1
        if self.sums is not None:
            samples = self.samples_in_batch if x.ndim == 2 else x.reshape(-1, *x.shape[-2:]).shape[0]
            self.ops.accumulate_moments_(self.act_sq_norms, self.sums, self.sq_deviations, x, max(samples, 1))
            self.samples += max(samples, 1)
            self.tokens += x.numel() // x.shape[-1]
        elif self.act_sq_norms is not None:
            self.ops.accumulate_sq_norms_(self.act_sq_norms, x)
        if self.hessian is None:
            return
        if x.ndim == 2 and self.samples_in_batch > 1:  # count samples as the reference does (one per sequence)
            x = x.reshape(self.samples_in_batch, -1, x.shape[-1])
        if self.ablate_scaler is not None:
            accumulate_ablate_scaler_(self.ablate_scaler, x, self.n_seen)
        self.n_seen = accumulate_hessian_(self.hessian, x, self.n_seen)

    @property
    def moments(self) -> ChannelMoments | None:
        if self.sums is None:
            return None
        return ChannelMoments.from_sums(self.sums, self.sq_deviations, self.samples, self.tokens)

    def permuted(self, perm: torch.Tensor) -> GroupStatistics:
        """These statistics with the input channels in the order ``perm`` (a new object; ``self`` unchanged)."""
        other = object.__new__(GroupStatistics)
        other.__dict__.update(self.__dict__)
        for name in ("act_sq_norms", "sums", "sq_deviations", "ablate_scaler"):
            value = getattr(self, name)
            setattr(other, name, None if value is None else value[perm].contiguous())
        if self.hessian is not None:
            other.hessian = self.hessian[perm][:, perm].contiguous()
        return other


def collect_statistics(
    layer: nn.Module, groups: list[list[str]], inputs: LayerInputs, kind: str, norms_too: bool, backend: str,
    device: torch.device, moments: bool = False,
) -> dict[str, GroupStatistics]:  # fmt: skip
    """One pass of the layer over every batch, with a hook on each group's first Linear; starts from zeros,
    so a pass cut short (out of memory) is simply run again."""
    modules = dict(layer.named_modules())
    stats = {
        group[0]: GroupStatistics(kind, modules[group[0]].in_features, device, backend, norms_too, moments)
        for group in groups
    }
    seen_in_batch: set[str] = set()

    def collect(name: str, _module: nn.Module, args: tuple) -> None:
        stats[name].add(args[0])
        seen_in_batch.add(name)
        # Once every group has its input, the rest of the layer (the last group's own GEMMs, e.g. fc2 /
        # down_proj, a third of a layer's FLOPs) only feeds nothing. Counted, not "at the last group": a Linear
        # the adapter does not list runs wherever the model calls it.
        if len(seen_in_batch) == len(stats):
            raise StopForward

    def start_batch(_layer, args) -> None:
        seen_in_batch.clear()
        for group_stats in stats.values():
            group_stats.samples_in_batch = args[0].shape[0]

    handles = [modules[name].register_forward_pre_hook(functools.partial(collect, name)) for name in stats]
    handles.append(layer.register_forward_pre_hook(start_batch))
    try:
        feed_layer(layer, inputs, device)
    finally:
        for h in handles:
            h.remove()
    unseen = sorted(name for name, group_stats in stats.items() if group_stats.inputs_seen == 0)
    if unseen:  # pruning on empty statistics would zero these weights (SparseGPT) or rank them at random (Wanda)
        raise UnsupportedModelOptionError(
            f"{', '.join(unseen)} received no input when the decoder layer ran on the calibration data, so it "
            "cannot be pruned from activations; this layer's forward skips it (use {method} magnitude)"
        )
    return stats
