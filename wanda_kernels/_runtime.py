"""Where kernels run: GPU, or the CPU under the Triton interpreter (``TRITON_INTERPRET=1``)."""

from __future__ import annotations

import functools
import itertools
import os
import warnings
from collections.abc import Callable
from typing import TypeVar

import torch


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU through its interpreter."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def tuning_configs(gpu_configs: list, fixed):
    """Autotune candidates: ``gpu_configs`` on a GPU; just ``fixed`` under the interpreter (~3 ms per program, no
    timing worth having) or with WANDA_KERNELS_AUTOTUNE=0 (the tests: correctness, not speed, and compile time)."""
    if interpreting() or os.environ.get("WANDA_KERNELS_AUTOTUNE") == "0":
        return [fixed]
    return gpu_configs


Launcher = TypeVar("Launcher", bound=Callable)


def on_input_device(launcher: Launcher) -> Launcher:
    """Run ``launcher`` with its first tensor argument's CUDA device made current.

    Triton launches on the *current* device and its current stream. With a model spread over several GPUs
    (``--device_map auto``), a kernel given tensors on cuda:1 while cuda:0 is current would run on cuda:0: an
    illegal access without peer access, or, with it, a race against cuda:1's stream, which reads the
    kernel's output. torch's own ops switch devices themselves; every public launcher here goes through this."""

    @functools.wraps(launcher)
    def launch(*args, **kwargs):
        # Hot path (eager decode launches hundreds per token): one GPU, or already current, costs no switch.
        first = args[0] if args and isinstance(args[0], torch.Tensor) else _first_tensor(args, kwargs)
        if first is None or not first.is_cuda or torch.cuda.device_count() < 2:
            return launcher(*args, **kwargs)
        if first.get_device() == torch.cuda.current_device():
            return launcher(*args, **kwargs)
        with torch.cuda.device(first.device):
            return launcher(*args, **kwargs)

    return launch  # type: ignore[return-value]


def _first_tensor(args: tuple, kwargs: dict) -> torch.Tensor | None:
    return next((a for a in itertools.chain(args, kwargs.values()) if isinstance(a, torch.Tensor)), None)


def check_kernel_device(*tensors: torch.Tensor) -> None:
    """Raise a ValueError when a Triton kernel cannot run on these tensors' device."""
    device = tensors[0].device
    for t in tensors[1:]:
        if t.device != device:
            raise ValueError(f"all tensors must be on one device, got {device} and {t.device}")
    if device.type == "cpu" and not interpreting():
        raise ValueError(
            "Triton kernels need CUDA tensors; on the CPU set TRITON_INTERPRET=1 before importing triton, "
            "or use the plain-torch references (wanda_kernels.reference, backend='torch')"
        )
    if device.type == "cpu":
        problem = interpreter_incompatibility()
        if problem:
            raise ImportError(problem)  # an install problem: the CLI reports it in one line


@functools.lru_cache(maxsize=1)
def interpreter_incompatibility() -> str | None:
    """Why Triton's CPU interpreter cannot run these kernels here, or None.

    Triton <= 3.6's interpreter turns a loop bound into a Python int with ``int(array_of_shape_1)``, which
    numpy >= 2.4 refuses; every kernel with a runtime loop bound then fails deep inside the interpreter.
    Compiled GPU code is unaffected. Triton 3.7 squeezes the array first."""
    import numpy as np
    import triton

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # numpy 1.25-2.3 only warn
            int(np.zeros(1, dtype=np.int32))
        return None
    except TypeError:
        pass
    version = tuple(int(part) for part in triton.__version__.split(".")[:2] if part.isdigit())
    if version >= (3, 7):
        return None
    return (
        f"triton {triton.__version__}'s CPU interpreter cannot run loops under numpy {np.__version__}: "
        "install 'numpy<2.4' or 'triton>=3.7' (GPU runs are unaffected)"
    )


@functools.lru_cache(maxsize=8)
def num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def target_programs(device: torch.device) -> int:
    """Enough programs to fill the GPU a few times over; few under the interpreter (~3 ms each)."""
    if device.type != "cuda":
        return 1
    return 4 * num_sms(device.index if device.index is not None else torch.cuda.current_device())
