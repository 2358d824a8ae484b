"""What the pruner needs to know about one architecture family: where the decoder layers live and how
their Linears group by shared input. One small subclass per family (opt.py, llama.py)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class DecoderAdapter:
    family: str
    model_types: tuple[str, ...]
    layers_path: str  # attribute path from the *ForCausalLM model to the ModuleList of decoder layers
    # Modules run before layer 0 (must sit on the compute device while layer inputs are captured).
    embedding_paths: tuple[str, ...]
    # Modules run after the last layer, up to the logits.
    head_paths: tuple[str, ...]
    # Linears of one layer in execution order, grouped by shared input: q/k/v (and LLaMA's gate/up)
    # read the same activations, so their statistics are collected once per group.
    linear_groups: tuple[tuple[str, ...], ...]

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return _get(model, self.layers_path)

    def embedding_modules(self, model: nn.Module) -> list[nn.Module]:
        return [m for p in self.embedding_paths if (m := _get(model, p, optional=True)) is not None]

    def head_modules(self, model: nn.Module) -> list[nn.Module]:
        return [m for p in self.head_paths if (m := _get(model, p, optional=True)) is not None]

    def groups_for(self, layer: nn.Module) -> list[list[str]]:
        """The layer's Linear groups; any Linear the adapter does not list becomes a group of its own."""
        present = {name for name, m in layer.named_modules() if isinstance(m, nn.Linear)}
        groups = [[n for n in group if n in present] for group in self.linear_groups]
        groups = [g for g in groups if g]
        listed = {n for g in groups for n in g}
        groups += [[n] for n in sorted(present - listed)]
        return groups


def _get(root: nn.Module, path: str, optional: bool = False):
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            if optional:
                return None
            raise ValueError(f"{type(root).__name__} has no attribute path {path!r}")
    return obj
