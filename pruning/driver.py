"""The layer-sequential pruner (Wanda's semantics, shared by every method).

1. Capture the inputs of decoder layer 0 for all calibration samples (batched).
2. For each layer: run it densely with hooks that collect statistics for every Linear group (inputs
   shared by q/k/v, or LLaMA's gate/up, are accumulated once); prune every Linear from those statistics;
   recompute the layer's outputs with the pruned weights and feed them to the next layer.
   ``true_sequential``: one statistics pass per group, after the earlier groups are pruned.
Magnitude needs no calibration and skips the forward passes. ``allocation="owl"`` first runs one pass over the
dense model for each layer's sparsity (``pruning.allocation``). Each group is pruned by ``pruning.prune_group``.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from pruning.allocation import owl_outlier_ratios
from pruning.checkpoint import LayerCheckpoint
from pruning.checksums import tensor_sha256
from pruning.config import PruneConfig
from pruning.layerwise import LayerInputs, capture_layer_inputs, run_layer, with_smaller_batches_on_oom
from pruning.methods.owl import owl_layer_sparsities
from pruning.methods.tiers import TierCounts, three_tier_ratios_for
from pruning.placement import compute_device_for, on_device
from pruning.plan import PrunePlan
from pruning.plan import plan as make_plan
from pruning.prune_group import GroupResult, prune_group_
from pruning.sparsity import check_sparsity, linear_zero_counts
from pruning.statistics import UnsupportedModelOptionError, collect_statistics, collected_for, moments_for

__all__ = ["LayerReport", "PruneReport", "UnsupportedModelOptionError", "as_config", "prune_model"]

log = logging.getLogger(__name__)


@dataclass
class LayerReport:
    index: int
    seconds: float
    sparsity: float  # measured
    target_sparsity: float | None = None  # the ratio asked of this layer (OWL: its own); None for tile types
    outlier_ratio: float | None = None  # OWL: percent of the dense layer's Wanda scores above owl_m * mean
    tiers: dict[str, int] | None = None  # tile types: tiles per tier over the layer's Linears
    # each Linear's ||X (W - W0)^T||^2 / ||X W0^T||^2 (pruning.prune_group.reconstruction_error), and how it was
    # measured: hessian (exact), norms (its diagonal) or weights (no activations collected)
    errors: dict[str, float] = field(default_factory=dict)
    error_kind: str | None = None


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
    allocation: str = "uniform"
    tiers: dict[str, int] | None = None  # tile types: tiles per tier over the model
    layers: list[LayerReport] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def run_fingerprint(model: nn.Module, plan: PrunePlan, calibration_ids) -> dict:
    """What decides a run's pruned weights, for a checkpoint to be resumed only by the same run."""
    first = next(model.parameters())
    return {
        "prune_config": asdict(plan.config), "backend": plan.backend, "batch_size": plan.batch_size,
        "nsamples": plan.nsamples, "seqlen": plan.seqlen, "calibration_ids_sha256": tensor_sha256(calibration_ids),
        "model_class": type(model).__name__, "layers": len(plan.layers), "dtype": str(first.dtype),
        "torch": torch.__version__, "device": str(plan.device.type),
    }  # fmt: skip


def _collect_and_prune(
    layer: nn.Module,
    groups: list[list[str]],
    inputs: LayerInputs,
    config: PruneConfig,
    backend: str,
    device: torch.device,
    what: str,
) -> list[GroupResult]:
    kind, norms_too = collected_for(config)
    moments = moments_for(config)
    stats = with_smaller_batches_on_oom(
        inputs, lambda: collect_statistics(layer, groups, inputs, kind, norms_too, backend, device, moments), what
    )
    return [prune_group_(layer, group, stats.pop(group[0]), config, backend) for group in groups]


def _layer_config(base: PruneConfig, target: float) -> PruneConfig:
    """One layer's config for its OWL target (validated as a uniform config): the sparsity ratio, or for
    three_tier the tier ratios that give it (``three_tier_ratios_for``)."""
    if base.sparsity_type != "three_tier":
        return dataclasses.replace(base, sparsity_ratio=target, allocation="uniform")
    top, mid, bottom = three_tier_ratios_for(
        target, base.block_size, base.top_dense_ratio, base.mid_2_4_ratio, base.bottom_topk_ratio, base.topk_per_block
    )
    return dataclasses.replace(
        base, top_dense_ratio=top, mid_2_4_ratio=mid, bottom_topk_ratio=bottom, allocation="uniform"
    )


def _add_counts(total: TierCounts | None, counts: TierCounts | None) -> TierCounts | None:
    if counts is None:
        return total
    return counts if total is None else total + counts


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
    checkpoint: LayerCheckpoint | None = None,
    **options,
) -> PruneReport:
    """Prune every Linear of every decoder layer of ``model`` in place; return a :class:`PruneReport`.

    ``calibration_ids``: LongTensor [nsamples, seqlen] (unused by magnitude). ``config``: a
    :class:`pruning.config.PruneConfig`, or its fields: ``prune_model(model, ids, "wanda", 0.5, "2:4",
    calib_batch_size=4)``. ``plan``: the checks of :func:`pruning.plan.plan`, made already for this config.
    The model is pruned where it sits: on a GPU, across GPUs (``device_map``), or in CPU RAM, in which case
    each decoder layer is streamed to the GPU when there is one. ``checkpoint``: write each pruned layer there,
    and continue after the layers it already holds (:class:`pruning.checkpoint.LayerCheckpoint`).
    """
    config = as_config(config, sparsity_ratio, sparsity_type, options)
    if plan is None:
        plan = make_plan(model, config, calibration_ids)
    else:
        plan.check_for(model, config, calibration_ids)
    report = PruneReport(
        config.method, config.sparsity_type, config.sparsity_ratio, plan.backend, plan.nsamples, plan.seqlen,
        plan.batch_size, plan.streamed, estimated_host_bytes=plan.host_bytes, estimated_device_bytes=plan.device_bytes,
        allocation=config.allocation,
    )  # fmt: skip
    if plan.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(plan.device)
    model.eval()
    start = time.perf_counter()
    if not config.prunes:
        log.info("sparsity_ratio 0: nothing to prune")
    else:
        targets = outliers = None
        if config.allocation == "owl":
            outliers = owl_outlier_ratios(model, plan, calibration_ids)
            targets = owl_layer_sparsities(outliers, config.owl_mean_sparsity, config.owl_lambda)
            log.info("OWL layer sparsities: %s", ", ".join(f"{t:.4f}" for t in targets))
        _prune_layers(model, plan, calibration_ids, report, targets, outliers, checkpoint)
    report.seconds = time.perf_counter() - start
    if not report.layers:  # nothing pruned: measure what the model holds
        report.actual_sparsity = check_sparsity(model, log_layers=False)
    if plan.device.type == "cuda":
        report.peak_gpu_memory_bytes = torch.cuda.max_memory_allocated(plan.device)
    log.info("pruned to %.4f sparsity in %.1f s", report.actual_sparsity, report.seconds)
    return report


def _prune_layers(
    model: nn.Module, plan: PrunePlan, calibration_ids, report: PruneReport, targets: list[float] | None = None,
    outliers: list[float] | None = None, checkpoint: LayerCheckpoint | None = None,
) -> None:  # fmt: skip
    """Prune layer by layer; ``targets``: each layer's sparsity (OWL), else the config's for all."""
    base, adapter, layers, backend = plan.config, plan.adapter, plan.layers, plan.backend
    done = 0
    if checkpoint is not None:
        done = checkpoint.open(run_fingerprint(model, plan, calibration_ids))
        if done:
            checkpoint.restore_(layers, done)
            log.info("resuming: layers 0-%d restored from %s, %d to go", done - 1, checkpoint.directory,
                     len(layers) - done)  # fmt: skip
    inputs = None
    store = None
    if base.layer_statistics:
        store = plan.store
        inputs = capture_layer_inputs(model, adapter, calibration_ids, plan.batch_size, store)
    zeros = total = 0
    all_tiers = None
    for index, layer in enumerate(tqdm(layers, desc=f"{base.method} {base.sparsity_type}", unit="layer", disable=None)):
        t0 = time.perf_counter()
        device = compute_device_for(layer)
        if index < done:  # restored: its outputs recomputed as the original run computed them, in its batches
            entry = checkpoint.layers[index]
            if inputs is not None:
                if entry["max_batch"] < inputs.max_batch:
                    inputs.limit_batch(entry["max_batch"])
                with on_device([layer], device):
                    inputs.hidden = run_layer(layer, inputs, device, store)
            report.layers.append(LayerReport(**entry["report"]))
            zeros, total = zeros + entry["zeros"], total + entry["total"]
            tiers = entry["report"]["tiers"]
            if tiers is not None:
                all_tiers = _add_counts(all_tiers, TierCounts(tiers["dense"], tiers["2:4"], tiers["topk"]))
            continue
        config = base if targets is None else _layer_config(base, targets[index])
        results = []
        with on_device([layer], device):
            groups = adapter.groups_for(layer)
            if not config.layer_statistics:
                results = [prune_group_(layer, group, None, config, backend) for group in groups]
            else:
                for stage in [[g] for g in groups] if config.true_sequential else [groups]:
                    what = f"collecting layer {index}'s statistics"
                    results += _collect_and_prune(layer, stage, inputs, config, backend, device, what)
                recompute = functools.partial(run_layer, layer, inputs, device, store)
                inputs.hidden = with_smaller_batches_on_oom(inputs, recompute, f"recomputing layer {index}'s outputs")
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds = time.perf_counter() - t0
            layer_zeros, layer_total = linear_zero_counts(layer)  # counted where the layer is (GPU if streamed)
        zeros, total = zeros + layer_zeros, total + layer_total
        sparsity = layer_zeros / max(layer_total, 1)
        target = targets[index] if targets is not None else None if config.tiered else config.sparsity_ratio
        outlier = None if outliers is None else outliers[index]
        tiers = None
        for result in results:
            tiers = _add_counts(tiers, result.tiers)
        errors = {name: error for result in results for name, error in result.errors.items()}
        kinds = {result.error_kind for result in results}
        report.layers.append(
            LayerReport(
                index,
                seconds,
                sparsity,
                target,
                outlier,
                None if tiers is None else tiers.to_dict(),
                errors,
                kinds.pop() if len(kinds) == 1 else "+".join(sorted(kinds)) or None,
            )
        )
        all_tiers = _add_counts(all_tiers, tiers)
        if checkpoint is not None:
            record = {"report": asdict(report.layers[-1]), "zeros": layer_zeros, "total": layer_total,
                      "max_batch": inputs.max_batch if inputs is not None else 0}  # fmt: skip
            checkpoint.save_layer(index, layer, record)
        error = f", error {sum(errors.values()) / len(errors):.4g}" if errors else ""
        if tiers is not None:
            log.info("layer %d: %.2f s, sparsity %.4f%s, tiles %s", index, seconds, sparsity, error, tiers.to_dict())
        else:
            log.info("layer %d: %.2f s, sparsity %.4f%s", index, seconds, sparsity, error)
    report.actual_sparsity = zeros / max(total, 1)
    report.tiers = None if all_tiers is None else all_tiers.to_dict()
    if inputs is not None:
        report.calib_batch_size = inputs.max_batch  # smaller than asked if a batch ran out of memory
