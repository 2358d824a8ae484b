"""GPU out-of-memory errors: retry a batched pass from nothing with half the samples per forward, down to one.

Used by every batched pass (capturing layer-0 inputs, collecting a layer's statistics, recomputing its outputs,
scoring perplexity); only an error that one sample still hits reaches the caller.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable
from typing import TypeVar

import torch

log = logging.getLogger(__name__)

T = TypeVar("T")


def release_cached_memory() -> None:
    """After a failed attempt: drop its unreachable tensors and hand cached blocks back to the driver."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def retry_with_half_batch(attempt: Callable[[int], T], batch_size: int, what: str) -> T:
    """``attempt(batch_size)``; after a CUDA out-of-memory error, ``attempt`` again with half the batch size
    (rounded up), down to 1. ``attempt`` must start from nothing each time (no state kept from a failed
    try). The error propagates when one sample per batch does not fit either."""
    while True:
        try:
            return attempt(batch_size)
        except torch.OutOfMemoryError:
            if batch_size <= 1:
                raise
        # Outside the handler, so the failed attempt's frames (and the tensors they hold) are already released.
        release_cached_memory()
        smaller = (batch_size + 1) // 2
        log.warning("GPU out of memory while %s with %d samples per batch; retrying with %d", what, batch_size, smaller)
        batch_size = smaller
