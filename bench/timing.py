"""Timers: CUDA events on a GPU (L2 flushed, per-rep setup untimed), a plain clock in CPU smoke mode."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def _quantiles(times_ms: list[float]) -> dict[str, float]:
    ordered = sorted(times_ms)

    def q(p: float) -> float:
        return ordered[min(len(ordered) - 1, int(round(p * (len(ordered) - 1))))]

    return {"median_ms": statistics.median(ordered), "p20_ms": q(0.2), "p80_ms": q(0.8), "reps": len(ordered)}


def time_op(
    fn: Callable[[], object],
    setup: Callable[[], object] | None = None,
    device: torch.device | None = None,
    reps: int = 20,
    warmup: int = 3,
    max_seconds: float = 5.0,
) -> dict[str, float]:
    """Median/p20/p80 of ``fn`` in ms. ``setup`` runs before each rep outside the timed region.

    In-place ops (pruning zeroes the weight) need ``setup`` to restore their input: timing them on
    already-pruned data would measure a different, easier selection problem.
    """
    on_gpu = device is not None and device.type == "cuda"
    flush = torch.empty(256 * 1024 * 1024, dtype=torch.int8, device=device) if on_gpu else None
    for _ in range(warmup):
        if setup:
            setup()
        fn()
    times: list[float] = []
    budget_end = time.perf_counter() + max_seconds
    for _ in range(reps):
        if setup:
            setup()
        if on_gpu:
            flush.zero_()  # evict the inputs from L2 so every rep reads from HBM
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        if time.perf_counter() > budget_end and len(times) >= 3:
            break
    return _quantiles(times)
