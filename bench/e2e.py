"""End-to-end pruning time: ``pruning.prune_model`` (ours) against locuslab/wanda's code path (``bench.baselines``).

Random-weight OPTs of the real dimensions (``bench.fixtures.models``), calibration random tokens [128, 2048]
(seed 0), weights re-drawn from the same seed before each provider. One record per (model, method, sparsity
type, provider): wall seconds of one CUDA-synchronized run after an untimed warm-up on a 1-layer model, peak
GPU memory, achieved sparsity, ``speedup_vs_reference`` (locuslab seconds / ours) and ``mask_diff_fraction``
(entries whose zero pattern differs between the providers; per layer: ``mask_diff_by_layer``). ``correct``:
layer 0 differs by < MASK_TOLERANCE[method], the whole model by < CASCADE_TOLERANCE, and the sparsity is within
0.01 of the target. Smoke mode: a tiny OPT, calibration [8, 32], timings meaningless. See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import functools
import gc
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

import pruning
from bench.baselines import locuslab_prune
from bench.fixtures.models import OPT_SMOKE, build_random_opt, calibration_ids, init_random_weights_
from bench.records import once, record
from bench.shapes import MODELS
from pruning.config import parse_sparsity_type

log = logging.getLogger(__name__)

SPARSITY_RATIO = 0.5
WARMUP_SAMPLES = 4
# Mask agreement between the providers: in layer 0 only near-exact ties may flip (per method; SparseGPT's flips
# move its later choices in the row); differences then compound with depth, so the whole model gets a loose
# sanity bound. Why these bounds, and what a bug looks like: docs/benchmarks.md.
MASK_TOLERANCE = {"wanda": 1e-3, "sparsegpt": 1e-2}
CASCADE_TOLERANCE = 0.05
OURS_ONLY = ("alps", "admm")  # no locuslab/wanda code path to compare with: timed alone
METHODS = (*MASK_TOLERANCE, *OURS_ONLY)

SMOKE_CALIBRATION = (8, 32)
GPU_CALIBRATION = (128, 2048)
WARMUP_NOTE = (
    "single timed run; before it, every provider and method ran once untimed on a 1-layer model of the "
    f"same widths with {WARMUP_SAMPLES} calibration samples (Triton compilation, library initialisation)"
)


@dataclass(frozen=True)
class E2ERun:
    model: str
    method: str
    sparsity_type: str

    @property
    def spec(self) -> str:
        return f"{self.model}:{self.method}:{self.sparsity_type}"


DEFAULT_RUNS = (E2ERun("opt-6.7b", "wanda", "unstructured"), E2ERun("opt-6.7b", "wanda", "2:4"))
SPARSEGPT_RUNS = (E2ERun("opt-1.3b", "sparsegpt", "unstructured"),)
RUN_SETS = {"default": DEFAULT_RUNS, "sparsegpt": SPARSEGPT_RUNS, "all": DEFAULT_RUNS + SPARSEGPT_RUNS}


def parse_runs(text: str) -> list[E2ERun]:
    """``MODEL:METHOD:SPARSITY_TYPE`` (e.g. ``opt-6.7b:wanda:2:4``) or a named set: default, sparsegpt, all."""
    if text in RUN_SETS:
        return list(RUN_SETS[text])
    parts = text.split(":", 2)
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected MODEL:METHOD:SPARSITY_TYPE (e.g. opt-6.7b:wanda:2:4) or one of {', '.join(RUN_SETS)}"
        )
    model, method, sparsity_type = parts
    if model != OPT_SMOKE and not (model in MODELS and model.startswith("opt-")):
        opts = [name for name in MODELS if name.startswith("opt-")]
        raise argparse.ArgumentTypeError(f"{text!r}: model must be one of {', '.join(opts)}")
    if method not in METHODS:
        raise argparse.ArgumentTypeError(f"{text!r}: method must be one of {', '.join(METHODS)}")
    try:
        parse_sparsity_type(sparsity_type)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"{text!r}: {err}") from None
    return [E2ERun(model, method, sparsity_type)]


def ours_prune(model, calibration_ids, method: str, sparsity_type: str, sparsity_ratio=SPARSITY_RATIO):
    return pruning.prune_model(model, calibration_ids, method, sparsity_ratio, sparsity_type)


# --- masks -----------------------------------------------------------------------------------------

_BIT_WEIGHTS = [1 << i for i in range(8)]


def _linears_by_layer(model) -> list[list[nn.Linear]]:
    return [[m for m in layer.modules() if isinstance(m, nn.Linear)] for layer in model.model.decoder.layers]


def _pack_bits(mask: torch.Tensor) -> torch.Tensor:
    bits = mask.flatten().to(torch.uint8)
    bits = torch.nn.functional.pad(bits, (0, (-bits.numel()) % 8))
    weights = torch.tensor(_BIT_WEIGHTS, dtype=torch.uint8, device=mask.device)
    return (bits.view(-1, 8) * weights).sum(dim=1, dtype=torch.uint8)


def packed_zero_masks(model) -> list[list[torch.Tensor]]:
    """Per decoder layer, each Linear's zero pattern, 8 entries a byte, in CPU RAM (out of the next GPU peak)."""
    return [[_pack_bits(lin.weight.data == 0).cpu() for lin in layer] for layer in _linears_by_layer(model)]


def mask_diff_by_layer(model, packed: list[list[torch.Tensor]]) -> list[tuple[int, int]]:
    """Per decoder layer: (entries whose zero pattern differs from ``packed``, entries)."""
    layers = _linears_by_layer(model)
    if [len(ls) for ls in layers] != [len(ps) for ps in packed]:
        raise ValueError("the stored masks are of another model")
    device = layers[0][0].weight.device
    popcount = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int64, device=device)
    counts = []
    for linears, masks in zip(layers, packed, strict=True):
        differing = sum(
            int(popcount[(_pack_bits(lin.weight.data == 0) ^ other.to(device)).long()].sum())
            for lin, other in zip(linears, masks, strict=True)
        )
        counts.append((differing, sum(lin.weight.numel() for lin in linears)))
    return counts


def mask_diff_fraction(model, packed: list[list[torch.Tensor]]) -> float:
    """Fraction of all decoder Linear entries whose zero pattern differs from ``packed``."""
    counts = mask_diff_by_layer(model, packed)
    return sum(d for d, _ in counts) / sum(t for _, t in counts)


# --- the suite ---------------------------------------------------------------------------------------


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _timed(fn: Callable[[], object], device: torch.device) -> tuple[object, float, int | None]:
    """(result, wall seconds, peak GPU bytes) of one call, the GPU synchronized on both sides."""
    _free(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return result, seconds, peak


def _warm_up(model: str, pairs: list[tuple[str, str]], device, dtype, seqlen: int, reference: bool) -> None:
    net = build_random_opt(model, device, dtype, n_layers=1)
    ids = calibration_ids(WARMUP_SAMPLES, seqlen, net.config.vocab_size)
    for method, sparsity_type in pairs:
        for provider in ("ours", "locuslab") if reference and method not in OURS_ONLY else ("ours",):
            init_random_weights_(net)
            (ours_prune if provider == "ours" else locuslab_prune)(net, ids, method, sparsity_type, SPARSITY_RATIO)
    del net
    _free(device)


def _record(run: E2ERun, provider, calib, dtype, seconds, peak, sparsity, reference_s, **fields) -> dict:
    import transformers

    return record(
        "e2e", f"prune_{run.method}_{run.sparsity_type}", provider, run.model, calib, dtype,  # [nsamples, seqlen]
        timing=once(seconds * 1e3, 1), reference_ms=reference_s * 1e3 if reference_s else None,
        model=run.model, method=run.method, sparsity_type=run.sparsity_type, sparsity_ratio=SPARSITY_RATIO,
        seconds=seconds, peak_gpu_memory_bytes=peak, actual_sparsity=sparsity, warmup=WARMUP_NOTE,
        transformers=transformers.__version__, **fields,
    )  # fmt: skip


def iter_records(
    device: torch.device,
    smoke: bool,
    runs: list[E2ERun] | None = None,
    reference: bool = True,
    nsamples: int | None = None,
    seqlen: int | None = None,
) -> Iterator[dict]:
    """Measure each run, yielding its records as soon as they exist (a long run that is cut off keeps them)."""
    threads = torch.get_num_threads()
    if smoke and device.type == "cpu":
        # Tiny tensors: intra-op threads only add overhead, and their spin-waits make a busy CI machine
        # several times slower (2 cores, another job running: 20 s instead of 5).
        torch.set_num_threads(1)
    try:
        yield from _iter_records(device, smoke, runs, reference, nsamples, seqlen)
    finally:
        torch.set_num_threads(threads)


def _iter_records(device, smoke, runs, reference, nsamples, seqlen) -> Iterator[dict]:
    if smoke:  # each requested (method, type) on the tiny model; by default every one, SparseGPT included
        pairs = [(r.method, r.sparsity_type) for r in runs or RUN_SETS["all"]]
        runs = [E2ERun(OPT_SMOKE, method, st) for method, st in dict.fromkeys(pairs)]
    runs = list(runs or DEFAULT_RUNS)
    default_calib = SMOKE_CALIBRATION if smoke else GPU_CALIBRATION
    calib = (nsamples or default_calib[0], seqlen or default_calib[1])
    dtype = torch.float16 if device.type == "cuda" else torch.float32

    for model_name in dict.fromkeys(r.model for r in runs):
        model_runs = [r for r in runs if r.model == model_name]
        pairs = [(r.method, r.sparsity_type) for r in model_runs]
        log.info("e2e: warming up on a 1-layer %s", model_name)
        _warm_up(model_name, pairs, device, dtype, calib[1], reference)
        net = build_random_opt(model_name, device, dtype)
        ids = calibration_ids(*calib, net.config.vocab_size)
        for run in model_runs:
            log.info("e2e: %s ours", run.spec)
            init_random_weights_(net)
            report, seconds, peak = _timed(
                functools.partial(ours_prune, net, ids, run.method, run.sparsity_type), device
            )
            sparsity = pruning.check_sparsity(net, log_layers=False)
            log.info("e2e: %s ours %.2f s, sparsity %.4f", run.spec, seconds, sparsity)
            ours = {"seconds": seconds, "peak": peak, "sparsity": sparsity, "report": report}
            diff = ref = None
            if reference and run.method not in OURS_ONLY:
                # Written before the reference runs (minutes, for SparseGPT): a run cut off there keeps ours. The
                # record after the reference, with the speed-up and the mask agreement, supersedes it.
                (early,) = _run_records(run, calib, dtype, ours, None, None)
                yield {**early, "compared": False}
                packed = packed_zero_masks(net)
                init_random_weights_(net)
                log.info("e2e: %s locuslab", run.spec)
                try:
                    _, ref_seconds, ref_peak = _timed(
                        functools.partial(locuslab_prune, net, ids, run.method, run.sparsity_type, SPARSITY_RATIO),
                        device,
                    )
                except (RuntimeError, TypeError, ValueError, AttributeError):
                    # The re-implementation follows transformers' internals; if a version breaks it, keep ours.
                    log.exception("e2e: %s locuslab reference failed; recording ours alone", run.spec)
                else:
                    ref_sparsity = pruning.check_sparsity(net, log_layers=False)
                    diff = mask_diff_by_layer(net, packed)
                    log.info("e2e: %s locuslab %.2f s; masks differ in %s", run.spec, ref_seconds, _fractions(diff))
                    ref = {"seconds": ref_seconds, "peak": ref_peak, "sparsity": ref_sparsity}
                del packed
            yield from _run_records(run, calib, dtype, ours, ref, diff)
        del net, ids
        _free(device)


def _fractions(counts: list[tuple[int, int]]) -> list[float]:
    return [float(f"{d / t:.3g}") for d, t in counts]


def _run_records(run: E2ERun, calib, dtype, ours: dict, ref: dict | None, diff: list | None) -> list[dict]:
    def sparsity_ok(s: float) -> bool:
        return abs(s - SPARSITY_RATIO) < 0.01

    mask_fields = {"mask_diff_fraction": None, "mask_diff_layer0": None, "mask_diff_by_layer": None}
    masks_ok = None
    if diff is not None:
        overall = sum(d for d, _ in diff) / sum(t for _, t in diff)
        layer0 = diff[0][0] / diff[0][1]
        masks_ok = layer0 < MASK_TOLERANCE[run.method] and overall < CASCADE_TOLERANCE
        mask_fields = {
            "mask_diff_fraction": overall,
            "mask_diff_layer0": layer0,
            "mask_diff_by_layer": _fractions(diff),
        }
    report = ours["report"]
    records = [
        _record(
            run, "ours", calib, dtype, ours["seconds"], ours["peak"], ours["sparsity"], ref and ref["seconds"],
            backend=report.backend, calib_batch_size=report.calib_batch_size, **mask_fields,
            correct=sparsity_ok(ours["sparsity"]) and masks_ok is not False,
        )
    ]  # fmt: skip
    if ref:
        records.append(
            _record(
                run, "locuslab", calib, dtype, ref["seconds"], ref["peak"], ref["sparsity"], ref["seconds"],
                backend="torch", calib_batch_size=1, **mask_fields,
                correct=sparsity_ok(ref["sparsity"]) and bool(masks_ok),
            )
        )  # fmt: skip
    return records


def run(device: torch.device, smoke: bool, **options) -> list[dict]:
    """All records of :func:`iter_records` as a list."""
    return list(iter_records(device, smoke, **options))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("e2e suite")
    group.add_argument(
        "--e2e-run",
        dest="e2e_runs",
        action="append",
        type=parse_runs,
        metavar="SPEC",
        help="MODEL:METHOD:SPARSITY_TYPE (repeatable), or a named set: "
        + "; ".join(f"{k} = {', '.join(r.spec for r in v)}" for k, v in RUN_SETS.items())
        + " (default: default). Smoke mode runs each METHOD:SPARSITY_TYPE (default: all) on a tiny OPT.",
    )
    group.add_argument(
        "--reference",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also run the locuslab/wanda code path (speedup and mask agreement need it)",
    )
    group.add_argument("--nsamples", type=int, default=None, help="calibration samples (default 128; smoke 8)")
    group.add_argument("--seqlen", type=int, default=None, help="calibration sequence length (default 2048; smoke 32)")


def iter_from_args(device: torch.device, smoke: bool, args: argparse.Namespace) -> Iterator[dict]:
    runs = [r for group in args.e2e_runs for r in group] if args.e2e_runs else None
    return iter_records(device, smoke, runs=runs, reference=args.reference, nsamples=args.nsamples, seqlen=args.seqlen)
