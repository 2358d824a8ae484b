"""The layer-sequential pruner (Wanda's semantics, shared by every method).

1. Capture the inputs of decoder layer 0 for all calibration samples (batched).
2. For each layer: run it densely with hooks that collect statistics for every Linear group (inputs
   shared by q/k/v, or LLaMA's gate/up, are accumulated once); prune every Linear from those statistics;
   recompute the layer's outputs with the pruned weights and feed them to the next layer.
   ``true_sequential``: one statistics pass per group, after the earlier groups are pruned.
Magnitude needs no calibration and skips the forward passes.
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from pruning.adapters import UnsupportedModelError
from pruning.config import PruneConfig
from pruning.errors import OptionError
from pruning.layerwise import (
    LayerInputs,
    StopForward,
    capture_layer_inputs,
    feed_layer,
    run_layer,
    with_smaller_batches_on_oom,
)
from pruning.methods import (
    accumulate_ablate_scaler_,
    accumulate_hessian_,
    kernel_ops,
    prune_ablate_,
    prune_magnitude_,
    prune_sparsegpt_,
    prune_wanda_,
    sparsegpt_inverse_hessian,
)
from pruning.placement import compute_device_for, on_device
from pruning.plan import PrunePlan
from pruning.plan import plan as make_plan
from pruning.sparsity import check_sparsity, linear_zero_counts

log = logging.getLogger(__name__)


@dataclass
class LayerReport:
    index: int
    seconds: float
    sparsity: float


@dataclass
class PruneReport:
    method: str
    sparsity_type: str
    sparsity_ratio: float
    backend: str
    nsamples: int
    seqlen: int
    calib_batch_size: int
    streamed_layers: bool  # model in CPU RAM, one layer at a time on the GPU
    actual_sparsity: float = 0.0
    seconds: float = 0.0
    peak_gpu_memory_bytes: int | None = None
    estimated_host_bytes: int = 0  # beyond the loaded model (pruning.plan.estimate_memory)
    estimated_device_bytes: int = 0
    layers: list[LayerReport] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


class _GroupStatistics:
    """Calibration statistics of one Linear group, fed by a forward hook on the group's first module."""

    def __init__(self, method: str, n_features: int, device: torch.device, backend: str):
        self.method = method
        self.ops = kernel_ops(backend)
        self.ablate_scaler = None
        self.samples_in_batch = 0  # set per batch: a Linear may see its input flattened to [samples * T, C] (OPT)
        self.inputs_seen = 0  # batches
        if method == "wanda":
            self.act_sq_norms = torch.zeros(n_features, dtype=torch.float32, device=device)
        else:  # SparseGPT and Wanda's ablations of it
            self.hessian = torch.zeros(n_features, n_features, dtype=torch.float32, device=device)
            self.n_seen = 0
            if method.startswith("ablate_wanda"):
                self.ablate_scaler = torch.zeros(n_features, dtype=torch.float32, device=device)

    def add(self, x: torch.Tensor) -> None:
        self.inputs_seen += 1
        if self.method == "wanda":
            self.ops.accumulate_sq_norms_(self.act_sq_norms, x)
            return
        if x.ndim == 2 and self.samples_in_batch > 1:  # count samples as the reference does (one per sequence)
            x = x.reshape(self.samples_in_batch, -1, x.shape[-1])
        if self.ablate_scaler is not None:
            accumulate_ablate_scaler_(self.ablate_scaler, x, self.n_seen)
        self.n_seen = accumulate_hessian_(self.hessian, x, self.n_seen)


class UnsupportedModelOptionError(UnsupportedModelError, OptionError):
    """The model cannot be pruned as asked; another option value can."""


MAX_TRITON_SPARSEGPT_BLOCK = 512  # the block kernel keeps a row tile of this many columns in registers


def _prune_linear(
    linear: nn.Linear, stats: _GroupStatistics | None, config: PruneConfig, backend: str, hinv=None
) -> None:
    n, m = config.nm
    weight = linear.weight.data
    if config.method == "magnitude":
        prune_magnitude_(weight, config.sparsity_ratio, n, m, backend=backend)
    elif config.method == "wanda":
        prune_wanda_(weight, stats.act_sq_norms, config.sparsity_ratio, n, m, config.use_variant, backend=backend)
    else:
        sparsegpt_backend = backend if config.blocksize <= MAX_TRITON_SPARSEGPT_BLOCK else "torch"
        if config.method == "sparsegpt":
            prune_sparsegpt_(
                weight, None, config.sparsity_ratio, n, m, config.blocksize, hinv=hinv, backend=sparsegpt_backend
            )
        else:
            prune_ablate_(weight, config.method, hinv, stats.ablate_scaler, config.sparsity_ratio, n, m,
                          config.blocksize, backend=sparsegpt_backend)  # fmt: skip


def _collect_statistics(
    layer: nn.Module, groups: list[list[str]], inputs: LayerInputs, config: PruneConfig, backend: str,
    device: torch.device,
) -> dict[str, _GroupStatistics]:  # fmt: skip
    """One pass of the layer over every batch, with a hook on each group's first Linear; starts from zeros,
    so a pass cut short (out of memory) is simply run again."""
    modules = dict(layer.named_modules())
    stats = {
        group[0]: _GroupStatistics(config.method, modules[group[0]].in_features, device, backend) for group in groups
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


def _collect_and_prune(
    layer: nn.Module,
    groups: list[list[str]],
    inputs: LayerInputs,
    config: PruneConfig,
    backend: str,
    device: torch.device,
    what: str,
) -> None:
    modules = dict(layer.named_modules())
    stats = with_smaller_batches_on_oom(
        inputs, lambda: _collect_statistics(layer, groups, inputs, config, backend, device), what
    )
    for group in groups:
        group_stats = stats[group[0]]
        hinv = None
        if config.method != "wanda":  # SparseGPT and its ablations
            # One damped Cholesky factorization per input group (q/k/v share it); the Hessian's storage
            # is its workspace, since nothing reads the Hessian afterwards.
            hinv = sparsegpt_inverse_hessian(group_stats.hessian, config.percdamp, inplace=True)
            group_stats.hessian = None
        for name in group:
            _prune_linear(modules[name], group_stats, config, backend, hinv)
        del hinv
    del stats


def as_config(
    config: PruneConfig | str | None, sparsity_ratio: float | None, sparsity_type: str | None, options: dict
) -> PruneConfig:
    """A :class:`PruneConfig`, given as one or as its fields (``"wanda", 0.5, "2:4"``, keyword options)."""
    if isinstance(config, PruneConfig):
        if sparsity_ratio is not None or sparsity_type is not None or options:
            raise TypeError("pass either a PruneConfig or its fields as options, not both")
        return config
    if config is not None:
        options["method"] = config
    if sparsity_ratio is not None:
        options["sparsity_ratio"] = sparsity_ratio
    if sparsity_type is not None:
        options["sparsity_type"] = sparsity_type
    return PruneConfig.from_options(**options)


@torch.no_grad()
def prune_model(
    model: nn.Module,
    calibration_ids: torch.Tensor | None,
    config: PruneConfig | str | None = None,
    sparsity_ratio: float | None = None,
    sparsity_type: str | None = None,
    *,
    plan: PrunePlan | None = None,
    **options,
) -> PruneReport:
    """Prune every Linear of every decoder layer of ``model`` in place; return a :class:`PruneReport`.

    ``calibration_ids``: LongTensor [nsamples, seqlen] (unused by magnitude). ``config``: a
    :class:`pruning.config.PruneConfig`, or its fields: ``prune_model(model, ids, "wanda", 0.5, "2:4",
    calib_batch_size=4)``. ``plan``: the checks of :func:`pruning.plan.plan`, made already for this config.
    The model is pruned where it sits: on a GPU, across GPUs (``device_map``), or in CPU RAM, in which case
    each decoder layer is streamed to the GPU when there is one.
    """
    config = as_config(config, sparsity_ratio, sparsity_type, options)
    if plan is None:
        plan = make_plan(model, config, calibration_ids)
    else:
        plan.check_for(model, config, calibration_ids)
    report = PruneReport(
        config.method, config.sparsity_type, config.sparsity_ratio, plan.backend, plan.nsamples, plan.seqlen,
        plan.batch_size, plan.streamed, estimated_host_bytes=plan.host_bytes, estimated_device_bytes=plan.device_bytes,
    )  # fmt: skip
    if plan.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(plan.device)
    model.eval()
    start = time.perf_counter()
    if config.sparsity_ratio == 0:
        log.info("sparsity_ratio 0: nothing to prune")
    else:
        _prune_layers(model, plan, calibration_ids, report)
    report.seconds = time.perf_counter() - start
    if not report.layers:  # nothing pruned: measure what the model holds
        report.actual_sparsity = check_sparsity(model, log_layers=False)
    if plan.device.type == "cuda":
        report.peak_gpu_memory_bytes = torch.cuda.max_memory_allocated(plan.device)
    log.info("pruned to %.4f sparsity in %.1f s", report.actual_sparsity, report.seconds)
    return report


def _prune_layers(model: nn.Module, plan: PrunePlan, calibration_ids, report: PruneReport) -> None:
    config, adapter, layers, backend = plan.config, plan.adapter, plan.layers, plan.backend
    inputs = None
    store = None
    if config.method != "magnitude":
        store = plan.store
        inputs = capture_layer_inputs(model, adapter, calibration_ids, plan.batch_size, store)
    zeros = total = 0
    for index, layer in enumerate(tqdm(layers, desc=f"{config.method} {config.sparsity_type}", unit="layer")):
        t0 = time.perf_counter()
        device = compute_device_for(layer)
        with on_device([layer], device):
            groups = adapter.groups_for(layer)
            if config.method == "magnitude":
                modules = dict(layer.named_modules())
                for name in (n for g in groups for n in g):
                    _prune_linear(modules[name], None, config, backend)
            else:
                for stage in [[g] for g in groups] if config.true_sequential else [groups]:
                    what = f"collecting layer {index}'s statistics"
                    _collect_and_prune(layer, stage, inputs, config, backend, device, what)
                recompute = functools.partial(run_layer, layer, inputs, device, store)
                inputs.hidden = with_smaller_batches_on_oom(inputs, recompute, f"recomputing layer {index}'s outputs")
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds = time.perf_counter() - t0
            layer_zeros, layer_total = linear_zero_counts(layer)  # counted where the layer is (GPU if streamed)
        zeros, total = zeros + layer_zeros, total + layer_total
        sparsity = layer_zeros / max(layer_total, 1)
        report.layers.append(LayerReport(index, seconds, sparsity))
        log.info("layer %d: %.2f s, sparsity %.4f", index, seconds, sparsity)
    report.actual_sparsity = zeros / max(total, 1)
    if inputs is not None:
        report.calib_batch_size = inputs.max_batch  # smaller than asked if a batch ran out of memory
