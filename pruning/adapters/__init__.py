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


__all__ = ["ADAPTERS", "DecoderAdapter", "UnsupportedModelError", "get_adapter", "supported_model_types"]
