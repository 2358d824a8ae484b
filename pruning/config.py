"""Typed pruning configuration: what to prune and how (library code takes this, never an argparse Namespace)."""

from __future__ import annotations

import re
from dataclasses import dataclass, fields

from pruning.errors import OptionError, quote
from wanda_kernels.policy import BACKENDS

METHODS = (
    "magnitude", "wanda", "sparsegpt",
    # locuslab/wanda's ablations: SparseGPT's updates, the mask chosen by Wanda's or the magnitude metric
    "ablate_mag_seq", "ablate_wanda_seq", "ablate_mag_iter", "ablate_wanda_iter",
)  # fmt: skip


def parse_sparsity_type(sparsity_type: str) -> tuple[int, int]:
    """'unstructured' -> (0, 0); 'N:M' -> (N, M) with 0 < N < M."""
    if sparsity_type == "unstructured":
        return 0, 0
    match = re.fullmatch(r"(\d+):(\d+)", sparsity_type or "")
    if not match:
        raise ValueError(f"sparsity_type must be 'unstructured' or 'N:M' such as '2:4' or '4:8', got {sparsity_type!r}")
    n, m = int(match.group(1)), int(match.group(2))
    if not 0 < n < m:
        raise ValueError(f"sparsity_type {sparsity_type!r} needs 0 < N < M")
    return n, m


@dataclass
class PruneConfig:
    method: str = "wanda"
    sparsity_ratio: float = 0.5
    sparsity_type: str = "unstructured"
    use_variant: bool = False  # Wanda's per-row cumulative-alpha variant (unstructured only)
    true_sequential: bool = False  # statistics for later sublayers after earlier ones are pruned
    backend: str = "auto"  # triton on CUDA, torch on CPU
    calib_batch_size: int | None = None  # calibration samples per forward; None = from a memory budget
    blocksize: int = 128  # SparseGPT
    percdamp: float = 0.01  # SparseGPT

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise OptionError(f"{{method}} must be one of {', '.join(METHODS)}, got {quote(repr(self.method))}")
        if self.backend not in BACKENDS:
            raise OptionError(f"{{backend}} must be one of {', '.join(BACKENDS)}, got {quote(repr(self.backend))}")
        if isinstance(self.sparsity_ratio, bool) or not isinstance(self.sparsity_ratio, (int, float)):
            raise ValueError(f"sparsity_ratio must be a number in [0, 1), got {self.sparsity_ratio!r}")
        if not 0.0 <= self.sparsity_ratio < 1.0:
            raise ValueError(f"sparsity_ratio must be in [0, 1), got {self.sparsity_ratio}")
        n, m = parse_sparsity_type(self.sparsity_type)
        if m and abs(self.sparsity_ratio - n / m) > 1e-9:
            raise OptionError(
                f"sparsity_type {self.sparsity_type} prunes exactly {n}/{m} = {n / m:g} of the weights; "
                f"use {{sparsity_ratio}} {n / m:g} (got {self.sparsity_ratio})"
            )
        if self.use_variant and (self.method != "wanda" or m):
            raise OptionError("{use_variant} is Wanda's unstructured variant: use it with {method} wanda, unstructured")
        if self.calib_batch_size is not None and self.calib_batch_size <= 0:
            raise ValueError(f"calib_batch_size must be positive, got {self.calib_batch_size}")
        if self.blocksize <= 0 or not 0 < self.percdamp:
            raise ValueError("SparseGPT needs blocksize > 0 and percdamp > 0")

    @property
    def nm(self) -> tuple[int, int]:
        return parse_sparsity_type(self.sparsity_type)

    @property
    def needs_calibration(self) -> bool:
        """Whether pruning reads activations: every method but magnitude, unless nothing is pruned."""
        return self.method != "magnitude" and self.sparsity_ratio > 0

    @classmethod
    def from_options(cls, **options) -> PruneConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise TypeError(f"unknown pruning option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**options)
