"""Model adapters, chosen from ``config.model_type``. Adding a family = one small file + one entry here."""

from __future__ import annotations

from torch import nn

from pruning.adapters.base import DecoderAdapter
from pruning.adapters.llama import LLAMA
from pruning.adapters.opt import OPT

ADAPTERS: tuple[DecoderAdapter, ...] = (OPT, LLAMA)


class UnsupportedModelError(ValueError):
    pass


def supported_model_types() -> list[str]:
    return [t for a in ADAPTERS for t in a.model_types]


def get_adapter(model_or_type: nn.Module | str) -> DecoderAdapter:
    """The adapter for a model (or a ``config.model_type`` string); a clear error for anything else."""
    if isinstance(model_or_type, str):
        model_type = model_or_type
    else:
        model_type = getattr(getattr(model_or_type, "config", None), "model_type", None)
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            return adapter
    raise UnsupportedModelError(
        f"unsupported architecture {model_type!r}: supported model types are {', '.join(supported_model_types())}"
    )


def check_one_mask_for_every_layer(config) -> None:
    """Refuse a config whose layers attend differently (some full, some through a sliding window).

    Layer-by-layer passes (pruning, perplexity with ``--offload``) capture what decoder layer 0 receives and hand
    its attention mask to every layer; transformers builds one mask per layer type instead."""
    layer_types = getattr(config, "layer_types", None)
    if layer_types and len(set(layer_types)) > 1:
        counts = ", ".join(f"{layer_types.count(kind)} {kind}" for kind in sorted(set(layer_types)))
        raise UnsupportedModelError(
            f"this {config.model_type} config mixes attention types across its layers ({counts}); the pruner runs "
            "every layer with layer 0's attention mask, so it supports only models whose layers share one "
            "(for Qwen2/Qwen3: use_sliding_window false, as in the released checkpoints)"
        )


__all__ = [
    "ADAPTERS",
    "DecoderAdapter",
    "UnsupportedModelError",
    "check_one_mask_for_every_layer",
    "get_adapter",
    "supported_model_types",
]
