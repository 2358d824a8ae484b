"""Pruning algorithms as pure functions over tensors: each prunes one weight matrix in place, returns its mask."""

from __future__ import annotations

from pruning.methods.ablate import ABLATE_METHODS, accumulate_ablate_scaler_, prune_ablate_
from pruning.methods.magnitude import prune_magnitude_
from pruning.methods.ops import BACKENDS, KernelOps, kernel_ops
from pruning.methods.sparsegpt import (
    InverseHessian,
    accumulate_hessian_,
    prune_sparsegpt_,
    sparsegpt_inverse_hessian,
)
from pruning.methods.wanda import prune_wanda_

__all__ = [
    "ABLATE_METHODS",
    "BACKENDS",
    "InverseHessian",
    "KernelOps",
    "accumulate_ablate_scaler_",
    "accumulate_hessian_",
    "kernel_ops",
    "prune_ablate_",
    "prune_magnitude_",
    "prune_sparsegpt_",
    "prune_wanda_",
    "sparsegpt_inverse_hessian",
]
