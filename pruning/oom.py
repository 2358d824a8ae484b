"""GPU out-of-memory errors: retry a batched pass with smaller batches, and tell the user what to change.

Most out-of-memory reports against the published pruning code come from a batch (or sequence) that does not
fit, after minutes or hours of work. The batched passes here (capturing layer-0 inputs, collecting a layer's
statistics, recomputing its outputs, scoring perplexity windows) restart from nothing with half the samples
per forward instead, down to one sample; only an error that one sample still hits reaches the user, with
the flags that change the memory footprint.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable
from typing import TypeVar

import torch

log = logging.getLogger(__name__)

T = TypeVar("T")

ALLOCATOR_HINT = "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True also helps when memory is fragmented"


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


def out_of_memory_advice(stage: str, streamed: bool) -> str:
    """What to change after a GPU out-of-memory error that smaller batches did not cure, for the CLI.
    ``stage``: 'loading', 'pruning' or 'evaluating'; ``streamed``: --offload or --device_map is in use already."""
    if stage == "loading":
        fix = "use --device_map auto to spread the model over several GPUs, or --offload to keep it in CPU RAM"
    elif streamed:
        fix = "use a smaller --seqlen"
    else:
        fix = (
            "use --offload (the model in CPU RAM, one decoder layer at a time on the GPU), --device_map auto "
            "(several GPUs), or a smaller --seqlen"
        )
    if stage == "evaluating":
        fix += " (--eval_dataset none skips perplexity)"
    return f"{fix}; {ALLOCATOR_HINT}"
