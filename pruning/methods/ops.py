"""The ``wanda_kernels`` ops of one resolved backend, so that methods are written once against :class:`KernelOps`.

``"torch"``: the plain-torch references (``wanda_kernels.reference.<op>_torch``, the spec, always importable);
``"triton"``: the Triton op of the same name, imported lazily (a failing Triton import leaves torch working).
Which of the two a run uses (``"auto"`` included) is ``wanda_kernels.policy.resolve_backend``'s decision.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from dataclasses import dataclass

BACKENDS: tuple[str, ...] = ("torch", "triton")

OP_NAMES: tuple[str, ...] = (
    "accumulate_sq_norms_",
    "wanda_scores",
    "unstructured_mask",
    "nm_mask",
    "magnitude_mask",
    "wanda_prune_",
    "sparsegpt_block_",
    "kth_smallest",
    "tile_scores",
    "tile_tiers",
    "tier_mask",
    "ria_scores",
    "accumulate_moments_",
    "dsnot_unstructured_",
    "dsnot_nm_",
)


@dataclass(frozen=True)
class KernelOps:
    """The ops of one backend; see ``wanda_kernels/reference.py`` for each op's contract."""

    backend: str
    accumulate_sq_norms_: Callable
    wanda_scores: Callable
    unstructured_mask: Callable
    nm_mask: Callable
    magnitude_mask: Callable
    wanda_prune_: Callable
    sparsegpt_block_: Callable
    kth_smallest: Callable
    tile_scores: Callable
    tile_tiers: Callable
    tier_mask: Callable
    ria_scores: Callable
    accumulate_moments_: Callable
    dsnot_unstructured_: Callable
    dsnot_nm_: Callable


def kernel_ops(backend: str) -> KernelOps:
    """Return the ops of ``backend`` (one of :data:`BACKENDS`); ValueError for an unknown name."""
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"unknown kernel backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    return _load(backend)


@functools.cache
def _load(backend: str) -> KernelOps:
    if backend == "torch":
        module = importlib.import_module("wanda_kernels.reference")
        names = {name: f"{name.rstrip('_')}_torch" for name in OP_NAMES}  # accumulate_sq_norms_ -> ..._torch
    else:
        module = importlib.import_module("wanda_kernels")
        names = {name: name for name in OP_NAMES}
    missing = [attr for attr in names.values() if not hasattr(module, attr)]
    if missing:
        raise ImportError(f"backend {backend!r}: {module.__name__} does not provide {', '.join(missing)}")
    return KernelOps(backend=backend, **{name: getattr(module, attr) for name, attr in names.items()})
