"""Kernel suite: each op on real layer shapes against locuslab/wanda's code path and vectorized torch.

Providers measured in the same run on the same data (the references: ``bench.baselines``):
  ours             the Triton op (wanda_kernels)
  locuslab         prune_wanda's code: abs*sqrt, stable sort + scatter, a Python loop of topk for N:M
  torch_vectorized the best plain torch: topk per row, reshape + topk for N:M
  copy             dst.copy_(src) of the weight: the read+write floor the targets are stated against
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator

import torch

import wanda_kernels as wk
from bench.baselines import locuslab_add_batch_, locuslab_magnitude_mask, locuslab_prune_, vectorized_prune_
from bench.records import record
from bench.shapes import KERNEL_SUITE, SMOKE_SUITE, linear_shape
from bench.timing import time_op
from wanda_kernels import reference as ref

log = logging.getLogger(__name__)

SUITE = "kernels"


def _cases(smoke: bool) -> list[tuple[str, tuple[int, int]]]:
    if smoke:
        return SMOKE_SUITE
    return [(f"{model}.{linear}", linear_shape(model, linear)) for model, linear in KERNEL_SUITE]


PRUNE_PROVIDERS = {"ours": wk.wanda_prune_, "torch_vectorized": vectorized_prune_, "locuslab": locuslab_prune_}


def run(device: torch.device, smoke: bool, dtype: torch.dtype = torch.float16, reps: int = 20) -> Iterator[dict]:
    """Each shape's records as soon as they are measured (a run cut off by a time limit keeps them)."""
    gen = torch.Generator(device=device).manual_seed(0)
    for label, shape in _cases(smoke):
        log.info("kernels: %s [%d x %d]", label, *shape)
        yield from _bench_matrix(label, shape, dtype, device, gen, reps)
        yield from _bench_sq_norms(label, shape[1], 64 if smoke else 8192, dtype, device, gen, reps)


def _bench_matrix(label, shape, dtype, device, gen, reps) -> list[dict]:
    rows, cols = shape
    weight = (torch.randn(rows, cols, generator=gen, device=device) * 0.02).to(dtype)
    act_sq_norms = torch.rand(cols, generator=gen, device=device) * 10
    work = torch.empty_like(weight)

    def restore() -> None:  # per-rep setup, untimed: pruning works in place
        work.copy_(weight)

    elem = weight.element_size()
    copy_t = time_op(restore, device=device, reps=reps)
    copy_ms = copy_t["median_ms"]
    common = {"label": label, "shape": shape, "dtype": dtype, "copy_ms": copy_ms}
    records = [record(SUITE, "copy", "copy", **common, timing=copy_t, nbytes=2 * elem * weight.numel(), correct=True)]

    for op, (sparsity, n, m) in {"wanda_prune_unstructured": (0.5, 0, 0), "wanda_prune_2:4": (0.5, 2, 4)}.items():
        expected = ref.wanda_prune_torch(weight.clone(), act_sq_norms, sparsity, n, m)
        timings = {}
        for provider, prune_ in PRUNE_PROVIDERS.items():
            restore()
            correct = bool(torch.equal(prune_(work, act_sq_norms, sparsity, n, m), expected))
            args = (work, act_sq_norms, sparsity, n, m)
            timings[provider] = (time_op(functools.partial(prune_, *args), restore, device, reps), correct)
        reference_ms = timings["locuslab"][0]["median_ms"]
        nbytes = weight.numel() * (2 * elem + 1)  # read W, write W, write the bool mask
        for provider, (timing, correct) in timings.items():
            records.append(
                record(SUITE, op, provider, **common, timing=timing, correct=correct, reference_ms=reference_ms,
                       nbytes=nbytes)
            )  # fmt: skip

    # Magnitude baseline: one per-matrix threshold (locuslab: a full sort of |W|).
    expected = ref.magnitude_mask_torch(weight, 0.5)
    mag_loc = time_op(functools.partial(locuslab_magnitude_mask, weight, 0.5), device=device, reps=reps)
    for provider, fn in (("locuslab", locuslab_magnitude_mask), ("ours", wk.magnitude_mask)):
        timing = (
            mag_loc if provider == "locuslab" else time_op(functools.partial(fn, weight, 0.5), device=device, reps=reps)
        )
        correct = bool(torch.equal(fn(weight, 0.5), expected))
        nbytes = weight.numel() * (elem + 1)
        records.append(
            record(SUITE, "magnitude_mask", provider, **common, timing=timing, correct=correct,
                   reference_ms=mag_loc["median_ms"], nbytes=nbytes)
        )  # fmt: skip
    return records


def _bench_sq_norms(label, cols, tokens, dtype, device, gen, reps) -> list[dict]:
    """Calibration statistic over a batch of tokens of this layer's input width (read-bound)."""
    x = torch.randn(tokens, cols, generator=gen, device=device).to(dtype)
    want = ref.accumulate_sq_norms_torch(torch.zeros(cols, device=device), x)
    acc = torch.zeros(cols, device=device)
    ours_ok = bool(torch.allclose(wk.accumulate_sq_norms_(acc, x), want, rtol=1e-4))
    scaler_row = torch.zeros(cols, device=device)
    loc_t = time_op(functools.partial(locuslab_add_batch_, scaler_row, x, 1), device=device, reps=reps)
    ours_t = time_op(functools.partial(wk.accumulate_sq_norms_, acc, x), device=device, reps=reps)
    vec_t = time_op(functools.partial(ref.accumulate_sq_norms_torch, acc, x), device=device, reps=reps)
    nbytes = x.numel() * x.element_size()
    shape = (tokens, cols)
    return [
        record(
            SUITE,
            "accumulate_sq_norms",
            provider,
            label,
            shape,
            dtype,
            timing=timing,
            correct=correct,
            reference_ms=loc_t["median_ms"],
            nbytes=nbytes,
        )  # fmt: skip
        for provider, timing, correct in (
            ("locuslab", loc_t, None),
            ("ours", ours_t, ours_ok),
            ("torch_vectorized", vec_t, None),
        )
    ]
