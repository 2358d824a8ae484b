"""Kernel suite: each op on real layer shapes against locuslab/wanda's code path and vectorized torch.

Providers measured in the same run on the same data (the references: ``bench.baselines``):
  ours             the Triton op (wanda_kernels)
  locuslab         prune_wanda's code: abs*sqrt, stable sort + scatter, a Python loop of topk for N:M
  torch_vectorized the best plain torch: topk per row, reshape + topk for N:M
  copy             dst.copy_(src) of the weight: the read+write floor the targets are stated against
The three_tier row (tile_scores + tile_tiers + tier_mask, the fork's defaults) has its own references:
  reference        the plain-torch tile ops (wanda_kernels.reference_tiers)
  fork_loop        Jiajun-Ji/wanda's apply_three_tier_block_pruning (a Python loop over tiles; the smallest shape
                   only, timed once)
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator

import torch

import wanda_kernels as wk
from bench.baselines import locuslab_add_batch_, locuslab_magnitude_mask, locuslab_prune_, vectorized_prune_
from bench.baselines_tiers import apply_three_tier_block_pruning
from bench.records import record
from bench.shapes import KERNEL_SUITE, SMOKE_SUITE, linear_shape
from bench.timing import time_op
from wanda_kernels import reference as ref
from wanda_kernels import reference_tiers

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
    cases = _cases(smoke)
    fork_label = min(cases, key=lambda case: case[1][0] * case[1][1])[0]  # the fork's tile loop: smallest only
    for label, shape in cases:
        log.info("kernels: %s [%d x %d]", label, *shape)
        yield from _bench_matrix(label, shape, dtype, device, gen, reps, with_fork_loop=label == fork_label)
        yield from _bench_sq_norms(label, shape[1], 64 if smoke else 8192, dtype, device, gen, reps)


def _bench_matrix(label, shape, dtype, device, gen, reps, with_fork_loop=False) -> list[dict]:
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
    records += _bench_three_tier(common, weight, act_sq_norms, device, reps, with_fork_loop)
    return records


# The fork's three-tier defaults: 35% dense tiles, 45% 2:4, the rest keep their 15 largest of 16 x 16.
THREE_TIER = {"block_size": 16, "dense_ratio": 0.35, "mid_ratio": 0.45, "topk_per_block": 15}


def _three_tier(ops, weight: torch.Tensor, act_sq_norms: torch.Tensor) -> torch.Tensor:
    """The whole three-tier mask with one backend's tile ops (``tile_scores``, ``tile_tiers``, ``tier_mask``)."""
    b = THREE_TIER["block_size"]
    scores = ops["tile_scores"](weight, act_sq_norms, b)
    n = scores.numel()
    tiers = ops["tile_tiers"](scores, int(n * THREE_TIER["dense_ratio"]), int(n * THREE_TIER["mid_ratio"]))
    return ops["tier_mask"](weight, tiers, b, THREE_TIER["topk_per_block"])[0]  # ranked by |W|, as the fork


def _fork_three_tier(weight: torch.Tensor, act_sq_norms: torch.Tensor) -> torch.Tensor:
    metric = weight.abs() * torch.sqrt(act_sq_norms)[None, :]  # the fork's W_metric, formed by its caller
    dense, mid = THREE_TIER["dense_ratio"], THREE_TIER["mid_ratio"]
    return apply_three_tier_block_pruning(
        weight, metric, THREE_TIER["block_size"], dense, mid, 1.0 - dense - mid, THREE_TIER["topk_per_block"]
    )[0]


def _bench_three_tier(common, weight, act_sq_norms, device, reps, with_fork_loop) -> list[dict]:
    ours = {"tile_scores": wk.tile_scores, "tile_tiers": wk.tile_tiers, "tier_mask": wk.tier_mask}
    reference = {
        "tile_scores": reference_tiers.tile_scores_torch,
        "tile_tiers": reference_tiers.tile_tiers_torch,
        "tier_mask": reference_tiers.tier_mask_torch,
    }
    expected = _three_tier(reference, weight, act_sq_norms)
    ref_t = time_op(functools.partial(_three_tier, reference, weight, act_sq_norms), device=device, reps=reps)
    ours_t = time_op(functools.partial(_three_tier, ours, weight, act_sq_norms), device=device, reps=reps)
    correct = bool(torch.equal(_three_tier(ours, weight, act_sq_norms), expected))
    nbytes = weight.numel() * (2 * weight.element_size() + 1)  # W read by the scores and by the masks, mask written
    shared = {**common, "nbytes": nbytes, "reference_ms": ref_t["median_ms"]}
    records = [
        record(SUITE, "three_tier", "ours", **shared, timing=ours_t, correct=correct),
        record(SUITE, "three_tier", "reference", **shared, timing=ref_t, correct=None),  # the spec itself
    ]
    if with_fork_loop:
        fork = functools.partial(_fork_three_tier, weight, act_sq_norms)
        fork_t = time_op(fork, device=device, reps=1, warmup=1)  # a Python loop over every tile: seconds on a GPU
        # Not `correct`: the fork breaks ties with torch.topk / argsort (unstable), so tied fp16 entries may differ.
        mismatches = int((fork() != expected).sum())
        records.append(
            record(SUITE, "three_tier", "fork_loop", **shared, timing=fork_t, correct=None, mask_mismatches=mismatches)
        )
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
