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
RIA and DSnoT rows (ria_scores, dsnot_unstructured, dsnot_2:4, accumulate_moments): ``published`` is their code
(bench.baselines_dsnot), ``reference`` our plain-torch spec; DSnoT's rows time the whole refinement of a mask.
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
        yield from _bench_moments(label, shape[1], 64 if smoke else 8192, dtype, device, gen, reps)


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
    records += _bench_refine(common, weight, act_sq_norms, device, gen, reps)
    return records


def _bench_refine(common, weight, act_sq_norms, device, gen, reps) -> list[dict]:
    """RIA's score and DSnoT's refinement of Wanda's masks (unstructured 50%, 2:4), against the published code."""
    from bench.baselines_dsnot import DSnoTStatistics, dsnot_prune_mask, ria_metric
    from pruning.methods.dsnot import ChannelMoments, dsnot_mask

    records = []
    expected = ref.ria_scores_torch(weight, act_sq_norms)
    providers = {"ours": wk.ria_scores, "reference": ref.ria_scores_torch, "published": ria_metric}
    timings = {name: time_op(functools.partial(fn, weight, act_sq_norms), device=device, reps=reps)
               for name, fn in providers.items()}  # fmt: skip
    correct = bool(torch.allclose(wk.ria_scores(weight, act_sq_norms), expected, rtol=1e-5, atol=0))
    nbytes = weight.numel() * (2 * weight.element_size() + 4)  # read W twice, write fp32 scores
    for name, timing in timings.items():
        records.append(record(SUITE, "ria_scores", name, **common, timing=timing, correct=correct if name == "ours"
                              else None, reference_ms=timings["published"]["median_ms"], nbytes=nbytes))  # fmt: skip
    cols = weight.shape[1]
    stats = DSnoTStatistics(cols, device)
    stats.scaler_row = act_sq_norms
    stats.sum_metric_row = torch.randn(cols, generator=gen, device=device)
    stats.var = torch.rand(cols, generator=gen, device=device) + 0.1
    moments = ChannelMoments(stats.sum_metric_row, stats.var)
    w32 = weight.float()
    scores = ref.wanda_scores_torch(weight, act_sq_norms)
    for op, (n, m) in {"dsnot_unstructured": (0, 0), "dsnot_2:4": (2, 4)}.items():
        initial = ref.nm_mask_torch(scores, n, m) if n else ref.unstructured_mask_torch(scores, 0.5)
        want = dsnot_mask(w32, initial, scores, act_sq_norms, moments, n, m, backend="torch")
        runs = {
            "ours": functools.partial(dsnot_mask, w32, initial, scores, act_sq_norms, moments, n, m, backend="triton"),
            "reference": functools.partial(dsnot_mask, w32, initial, scores, act_sq_norms, moments, n, m),
            "published": functools.partial(dsnot_prune_mask, w32, stats, scores, 0.5, n, m),
        }
        timings = {name: time_op(fn, device=device, reps=max(3, reps // 4)) for name, fn in runs.items()}
        agreement = float((runs["published"]() == want).float().mean())
        for name, timing in timings.items():
            correct = bool(torch.equal(runs["ours"](), want)) if name == "ours" else None
            records.append(record(SUITE, op, name, **common, timing=timing, correct=correct,
                                  reference_ms=timings["published"]["median_ms"],
                                  published_mask_agreement=agreement))  # fmt: skip
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


def _bench_moments(label, cols, tokens, dtype, device, gen, reps) -> list[dict]:
    """DSnoT's statistics with Wanda's norms in one pass (ours) against the published WrappedGPT.add_batch."""
    from bench.baselines_dsnot import DSnoTStatistics

    samples = 4 if tokens >= 256 else 1
    x = torch.randn(samples, tokens // samples, cols, generator=gen, device=device).to(dtype)
    accs = [torch.zeros(cols, device=device) for _ in range(3)]
    want = [torch.zeros(cols, device=device) for _ in range(3)]
    ref.accumulate_moments_torch(*want, x, samples)
    wk.accumulate_moments_(*accs, x, samples)
    correct = all(torch.allclose(a, b, rtol=1e-4, atol=1e-3) for a, b in zip(accs, want, strict=True))

    def published() -> None:
        stats = DSnoTStatistics(cols, device)
        for sample in x:
            stats.add_batch(sample.unsqueeze(0))

    timings = {
        "ours": time_op(functools.partial(wk.accumulate_moments_, *accs, x, samples), device=device, reps=reps),
        "reference": time_op(functools.partial(ref.accumulate_moments_torch, *accs, x, samples), device=device,
                             reps=reps),
        "published": time_op(published, device=device, reps=reps),
    }  # fmt: skip
    nbytes = x.numel() * x.element_size()
    return [
        record(SUITE, "accumulate_moments", name, label, (tokens, cols), dtype, timing=timing,
               correct=correct if name == "ours" else None, reference_ms=timings["published"]["median_ms"],
               nbytes=nbytes)
        for name, timing in timings.items()
    ]  # fmt: skip
