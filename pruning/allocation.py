"""Layer sparsity allocation: OWL's first pass over the dense model, giving each decoder layer its outlier ratio.

The pass runs like a Wanda pruning pass without pruning: capture layer 0's calibration inputs, and for each layer
collect its input norms, score its Linears (``|W| * sqrt(a)``), count the outliers (``methods.owl``), and feed the
dense layer's outputs to the next layer. The pruning pass that follows captures its inputs again.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from tqdm.auto import tqdm

from pruning.layerwise import capture_layer_inputs, run_layer, with_smaller_batches_on_oom
from pruning.methods import kernel_ops
from pruning.methods.owl import OutlierCounter
from pruning.placement import compute_device_for, on_device
from pruning.plan import PrunePlan
from pruning.statistics import collect_statistics


@torch.no_grad()
def owl_outlier_ratios(model: nn.Module, plan: PrunePlan, calibration_ids: torch.Tensor) -> list[float]:
    """Per decoder layer, the percent of its dense Wanda scores above ``owl_m`` times their mean."""
    config, adapter, backend, store = plan.config, plan.adapter, plan.backend, plan.store
    ops = kernel_ops(backend)
    inputs = capture_layer_inputs(model, adapter, calibration_ids, plan.batch_size, store)
    ratios = []
    for index, layer in enumerate(tqdm(plan.layers, desc="OWL outlier ratios", unit="layer", disable=None)):
        device = compute_device_for(layer)
        with on_device([layer], device):
            groups = adapter.groups_for(layer)
            stats = with_smaller_batches_on_oom(
                inputs,
                lambda: collect_statistics(layer, groups, inputs, "norms", False, backend, device),  # noqa: B023
                f"collecting layer {index}'s statistics for OWL",
            )
            modules = dict(layer.named_modules())
            pairs = [(modules[name].weight.data, stats[group[0]].act_sq_norms) for group in groups for name in group]
            counter = OutlierCounter(config.owl_m)
            for weight, norms in pairs:  # two passes, each score matrix formed and dropped at once
                counter.add_sum(ops.wanda_scores(weight, norms))
            for weight, norms in pairs:
                counter.add_count(ops.wanda_scores(weight, norms))
            ratios.append(counter.ratio)
            recompute = functools.partial(run_layer, layer, inputs, device, store)
            inputs.hidden = with_smaller_batches_on_oom(inputs, recompute, f"recomputing layer {index}'s outputs")
    return ratios
