"""Fused kernels for the small per-token ops of LLaMA-family layers, so that a decode step launches fewer kernels.

At decode sizes the Linears read their weights at memory speed and everything else is launch-bound: in
transformers' LLaMA layer an RMSNorm is six elementwise kernels and the rotary embedding ten, against seven
Linears. Inside a CUDA graph each still costs a few microseconds of GPU time, paid equally by a dense and a
2:4 model, so they shrink the measured sparse speed-up. :func:`fuse_small_ops_` swaps in one kernel for each
(``wanda_kernels.rmsnorm``, ``wanda_kernels.rope``). The results are the same: the rotary kernel is
bit-identical to torch's expression, the norm within 1 ulp of the input dtype (the order of the fp32 sum).

OPT layers have nothing of the kind to fuse (``nn.LayerNorm`` is one kernel already).
"""

from __future__ import annotations

import functools
import sys

import torch
from torch import nn

from wanda_kernels._runtime import interpreting


def _kernels_run_on(t: torch.Tensor) -> bool:
    return t.is_cuda or (t.device.type == "cpu" and interpreting())


class FusedRMSNorm(nn.Module):
    """transformers' ``LlamaRMSNorm`` as one kernel where Triton runs; the torch formula elsewhere."""

    def __init__(self, weight: nn.Parameter, eps: float):
        super().__init__()
        self.weight = weight
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from wanda_kernels.reference import rms_norm_torch
        from wanda_kernels.rmsnorm import rms_norm

        op = rms_norm if _kernels_run_on(x) and self.weight.device == x.device else rms_norm_torch
        return op(x, self.weight, self.variance_epsilon)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}, fused"


def fused_apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1, *, fallback):
    """``apply_rotary_pos_emb`` through one kernel; ``fallback`` (the model's own function) for what the kernel
    does not cover: another head layout, mixed dtypes, or tensors where Triton does not run."""
    from wanda_kernels.rope import rotary

    covered = (
        unsqueeze_dim == 1 and q.ndim == 4 and cos.ndim == 3 and q.dtype == k.dtype == cos.dtype == sin.dtype
        and _kernels_run_on(q) and q.device == k.device == cos.device == sin.device
    )  # fmt: skip
    if not covered:
        return fallback(q, k, cos, sin, unsqueeze_dim)
    return rotary(q, k, cos, sin)


def _with_fused_rotary(forward, modeling):
    """``forward`` with the modeling module's ``apply_rotary_pos_emb`` (a module global its attention calls)
    pointing at the fused kernel for the duration of the call: only this model's attention is affected."""

    @functools.wraps(forward)
    def fused_forward(*args, **kwargs):
        original = modeling.apply_rotary_pos_emb
        modeling.apply_rotary_pos_emb = functools.partial(fused_apply_rotary_pos_emb, fallback=original)
        try:
            return forward(*args, **kwargs)
        finally:
            modeling.apply_rotary_pos_emb = original

    fused_forward.fused_rotary = True
    return fused_forward


def fuse_small_ops_(model: nn.Module) -> dict[str, int]:
    """In place, for LLaMA-family models: each RMSNorm becomes a :class:`FusedRMSNorm` (sharing its weight)
    and each attention applies the rotary embedding with one kernel. Returns how many of each the model now
    runs fused (zeros for models without them, e.g. OPT). Idempotent."""
    counts = {"rms_norm": 0, "rotary": 0}
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, FusedRMSNorm):
                counts["rms_norm"] += 1
            elif type(child).__name__.endswith("RMSNorm") and hasattr(child, "variance_epsilon"):
                setattr(parent, name, FusedRMSNorm(child.weight, child.variance_epsilon))
                counts["rms_norm"] += 1
    for module in model.modules():
        modeling = sys.modules.get(type(module).__module__)
        is_attention = hasattr(module, "q_proj") and hasattr(module, "k_proj")
        if is_attention and hasattr(modeling, "apply_rotary_pos_emb"):
            if not getattr(module.forward, "fused_rotary", False):
                module.forward = _with_fused_rotary(module.forward, modeling)
            counts["rotary"] += 1
    return counts
