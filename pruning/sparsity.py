"""Measured sparsity: the fraction of exact zeros in the decoder layers' Linear weights."""

from __future__ import annotations

import logging

from torch import nn

log = logging.getLogger(__name__)


def linear_zero_counts(layer: nn.Module) -> tuple[int, int]:
    """(exact zeros, entries) over the Linear weights of ``layer``, 2:4-compressed ones included."""
    from pruning.infer.sparse_linear import Sparse24Linear

    zeros = total = 0
    for m in layer.modules():
        if isinstance(m, nn.Linear):
            weight = m.weight.data
        elif isinstance(m, Sparse24Linear):
            weight = m.to_dense()
        else:
            continue
        zeros += int((weight == 0).sum())
        total += weight.numel()
    return zeros, total


def layer_sparsity(layer: nn.Module) -> float:
    zeros, total = linear_zero_counts(layer)
    return zeros / max(total, 1)


def sparsity_by_layer(model: nn.Module) -> list[float]:
    """Per decoder layer, the fraction of zeros over its Linear weights."""
    from pruning.adapters import get_adapter

    return [layer_sparsity(layer) for layer in get_adapter(model).layers(model)]


def check_sparsity(model: nn.Module, log_layers: bool = True) -> float:
    """Fraction of zeros over all decoder-layer Linear weights (weighted by size); logs each layer's value,
    as locuslab/wanda's ``check_sparsity`` prints them. Per-layer values: :func:`sparsity_by_layer`."""
    from pruning.adapters import get_adapter

    zeros = total = 0
    for index, layer in enumerate(get_adapter(model).layers(model)):
        layer_zeros, layer_total = linear_zero_counts(layer)
        zeros, total = zeros + layer_zeros, total + layer_total
        if log_layers:
            log.info("layer %d sparsity %.6f", index, layer_zeros / max(layer_total, 1))
    return zeros / max(total, 1)
