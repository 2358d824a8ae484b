"""The one rule for running a Triton kernel or its torch reference (``wanda_kernels.reference``).

``backend``: ``"torch"`` the reference; ``"triton"`` the kernel, refused where Triton cannot run it;
``"auto"`` the kernel on CUDA tensors, the reference elsewhere. Triton also runs on the CPU under its
interpreter (``TRITON_INTERPRET=1``), ~3 ms per program: a test vehicle that ``"auto"`` never picks.
"""

from __future__ import annotations

import torch

from wanda_kernels._runtime import interpreting

BACKENDS: tuple[str, ...] = ("auto", "triton", "torch")


def kernels_run_on(device: torch.device | str) -> bool:
    """Whether Triton can execute kernels on ``device``: CUDA, or the CPU under the interpreter."""
    device = torch.device(device)
    return device.type == "cuda" or (device.type == "cpu" and interpreting())


def resolve_backend(backend: str, device: torch.device | str) -> str:
    """``"auto"``, ``"triton"`` or ``"torch"`` for tensors on ``device`` -> ``"triton"`` or ``"torch"``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    device = torch.device(device)
    if backend == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if backend == "triton" and not kernels_run_on(device):
        raise ValueError(
            f"backend 'triton' needs a CUDA GPU (or TRITON_INTERPRET=1 on CPU) and the tensors are on {device}; "
            "use backend 'torch'"
        )
    return backend


def use_kernel(backend: str, *tensors: torch.Tensor) -> bool:
    """True when the kernel, not the reference, should run on these tensors (all on one device)."""
    return resolve_backend(backend, tensors[0].device) == "triton"
