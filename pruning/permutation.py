"""Where an N:M channel permutation of a Linear's input goes, so that the stored weight is N:M in stored order.

Folded (free at inference): a permutation of fc2's / down_proj's input reorders the rows (and bias) of the
Linears that produce it (fc1; gate_proj and up_proj); one of out_proj's / o_proj's input reorders value dims
inside each head (``head_permutation``), hence v_proj's rows. Carried: the hidden state feeding q/k/v, fc1 and
gate/up cannot be reordered for free (the residual stream reads it too), so the weight stays in its own order with
the mask there, and the permutation is kept on the module as ``input_permutation``; the sparse24 format stores
``W[:, perm]`` packed and gathers ``x[..., perm]`` before the product (``pruning.infer.Sparse24Linear``).
"""

from __future__ import annotations

import torch
from torch import nn

# consumer -> the Linears whose output rows are its input channels (per family; names inside a decoder layer)
PRODUCERS = {
    "mlp.down_proj": ("mlp.gate_proj", "mlp.up_proj"),
    "fc2": ("fc1",),
    "self_attn.o_proj": ("self_attn.v_proj",),
    "self_attn.out_proj": ("self_attn.v_proj",),
}
HEAD_STRUCTURED = ("self_attn.o_proj", "self_attn.out_proj")
PERMUTATION_ATTRIBUTE = "input_permutation"


def attention_shape(layer: nn.Module, consumer: str) -> tuple[int, int]:
    """(head_dim, value heads) of the attention whose output ``consumer`` reads."""
    attention = layer.get_submodule(consumer.rpartition(".")[0])
    head_dim = getattr(attention, "head_dim", None)
    value = layer.get_submodule(PRODUCERS[consumer][0])
    if not head_dim or value.out_features % head_dim:
        raise ValueError(f"cannot tell the head size of {consumer}'s attention, so its input cannot be permuted")
    return head_dim, value.out_features // head_dim


def is_folded(layer: nn.Module, group: list[str]) -> bool:
    """Whether ``group``'s input permutation folds into its producers (a single consumer they all exist for)."""
    if len(group) != 1 or group[0] not in PRODUCERS:
        return False
    names = {name for name, _ in layer.named_modules()}
    return all(p in names for p in PRODUCERS[group[0]])


@torch.no_grad()
def apply_permutation_(layer: nn.Module, group: list[str], perm: torch.Tensor, fold: bool = True) -> bool:
    """Reorder ``group``'s input channels by ``perm`` for real (folded: True) or record it (carried: False;
    ``fold=False`` always carries). The layer computes the same function either way."""
    if fold and is_folded(layer, group):
        consumer = layer.get_submodule(group[0])
        consumer.weight.data = consumer.weight.data[:, perm].contiguous()
        rows = _producer_rows(layer, group[0], perm)
        for name in PRODUCERS[group[0]]:
            producer = layer.get_submodule(name)
            producer.weight.data = producer.weight.data[rows].contiguous()
            if producer.bias is not None:
                producer.bias.data = producer.bias.data[rows].contiguous()
        return True
    for name in group:
        setattr(layer.get_submodule(name), PERMUTATION_ATTRIBUTE, perm.clone())
    return False


def _producer_rows(layer: nn.Module, consumer: str, perm: torch.Tensor) -> torch.Tensor:
    if consumer not in HEAD_STRUCTURED:
        return perm
    head_dim, kv_heads = attention_shape(layer, consumer)
    q_heads = perm.shape[0] // head_dim
    inner = perm.reshape(q_heads, head_dim)[:: q_heads // kv_heads] % head_dim  # one order per value head
    return (inner + torch.arange(kv_heads, device=perm.device)[:, None] * head_dim).reshape(-1)
