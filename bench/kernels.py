"""Kernel suite: each op on real layer shapes against locuslab/wanda's code path and vectorized torch.

Providers measured in the same run on the same data:
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
from bench.shapes import KERNEL_SUITE, SMOKE_SUITE, linear_shape
from bench.timing import time_op
from wanda_kernels import reference as ref

log = logging.getLogger(__name__)


# --- the two reference implementations (what users run today) ----------------------------------


def locuslab_prune_(weight: torch.Tensor, scaler_row: torch.Tensor, sparsity: float, n: int, m: int) -> torch.Tensor:
    """locuslab/wanda lib/prune.py prune_wanda, per matrix, verbatim apart from names."""
    w_metric = torch.abs(weight) * torch.sqrt(scaler_row.reshape((1, -1)))
    w_mask = torch.zeros_like(w_metric) == 1
    if n != 0:
        for ii in range(w_metric.shape[1]):
            if ii % m == 0:
                tmp = w_metric[:, ii : (ii + m)].float()
                w_mask.scatter_(1, ii + torch.topk(tmp, n, dim=1, largest=False)[1], True)
    else:
        sort_res = torch.sort(w_metric, dim=-1, stable=True)
        indices = sort_res[1][:, : int(w_metric.shape[1] * sparsity)]
        w_mask.scatter_(1, indices, True)
    weight[w_mask] = 0
    return w_mask


def vectorized_prune_(weight: torch.Tensor, scaler_row: torch.Tensor, sparsity: float, n: int, m: int) -> torch.Tensor:
    """The fastest plain-torch formulation we know: topk per row, or reshape to groups + topk."""
    w_metric = weight.abs().float() * torch.sqrt(scaler_row)[None, :]
    rows, cols = w_metric.shape
    if n:
        groups = w_metric.reshape(rows, cols // m, m)
        mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(
            2, torch.topk(groups, n, dim=2, largest=False)[1], True
        )
        mask = mask.reshape(rows, cols)
    else:
        idx = torch.topk(w_metric, int(cols * sparsity), dim=1, largest=False)[1]
        mask = torch.zeros(rows, cols, dtype=torch.bool, device=weight.device).scatter_(1, idx, True)
    weight.masked_fill_(mask, 0)
    return mask


def locuslab_magnitude_mask(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    """locuslab/wanda prune_magnitude's mask: a full sort of |W| for one threshold."""
    w_metric = torch.abs(weight)
    thresh = torch.sort(w_metric.flatten())[0][int(weight.numel() * sparsity)]
    return w_metric <= thresh


def locuslab_add_batch_(scaler_row: torch.Tensor, inp: torch.Tensor, nsamples: int) -> None:
    """WrappedGPT.add_batch's statistic (for one batch of one sample, as the reference runs it)."""
    tmp = 1
    inp = inp.reshape((-1, inp.shape[-1])).t()
    scaler_row *= nsamples / (nsamples + tmp)
    nsamples += tmp
    inp = inp.type(torch.float32)
    scaler_row += torch.norm(inp, p=2, dim=1) ** 2 / nsamples


# --- the suite ------------------------------------------------------------------------------------


def _cases(smoke: bool) -> list[tuple[str, tuple[int, int]]]:
    if smoke:
        return SMOKE_SUITE
    return [(f"{model}.{linear}", linear_shape(model, linear)) for model, linear in KERNEL_SUITE]


def _record(op, provider, label, shape, dtype, timing, nbytes, reference_ms, copy_ms, correct):
    median = timing["median_ms"]
    return {
        "suite": "kernels",
        "op": op,
        "provider": provider,
        "label": label,
        "shape": list(shape),
        "dtype": str(dtype).removeprefix("torch."),
        **timing,
        "gbps": nbytes / (median * 1e-3) / 1e9 if nbytes else None,
        "x_copy": median / copy_ms if copy_ms else None,
        "speedup_vs_reference": reference_ms / median if reference_ms else None,
        "correct": correct,
    }


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
    records = [_record("copy", "copy", label, shape, dtype, copy_t, 2 * elem * weight.numel(), None, copy_ms, True)]

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
            records.append(_record(op, provider, label, shape, dtype, timing, nbytes, reference_ms, copy_ms, correct))

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
            _record(
                "magnitude_mask", provider, label, shape, dtype, timing, nbytes, mag_loc["median_ms"], copy_ms, correct
            )
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
        _record("accumulate_sq_norms", provider, label, shape, dtype, timing, nbytes, loc_t["median_ms"], None, correct)
        for provider, timing, correct in (
            ("locuslab", loc_t, None),
            ("ours", ours_t, ours_ok),
            ("torch_vectorized", vec_t, None),
        )
    ]
