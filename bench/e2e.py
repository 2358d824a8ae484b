"""End-to-end pruning time: ``pruning.prune_model`` against locuslab/wanda's code path, whole models.

Models are random-weight OPTs with the real dimensions (``bench.shapes.MODELS``; vocab 50272, 2048
positions), built on the device in fp16 without materializing on the CPU (constructed on the meta device,
then ``to_empty`` + ``normal_(0, 0.02)``). Calibration: random tokens [128, 2048], seed 0. Weights are
re-initialized from the same seed before every run, so both providers prune identical models.

Providers, measured in the same run on the same model and data:
  ours      ``pruning.prune_model`` (Triton backend on CUDA): batched layer forwards, q/k/v statistics shared
  locuslab  a faithful re-implementation of locuslab/wanda ``lib/prune_opt.py`` below (prune_wanda /
            prune_sparsegpt with WrappedGPT / SparseGPT): one calibration sample per layer forward, a hook
            on every Linear, ``torch.norm`` running mean, stable sort + scatter, a Python loop of topk over
            column groups for N:M. Adapted only where transformers changed: the Catcher keeps every keyword
            argument the model's own forward passes to layer 0 (not just ``attention_mask``), and a layer's
            output may be a tensor (transformers 5) or a tuple (older).

One record per (model, method, sparsity type, provider): wall seconds of a single run (CUDA-synchronized)
after an untimed warm-up of every provider and method on a 1-layer model of the same widths (Triton
compilation, cuBLAS/cuSOLVER initialisation), peak GPU memory, achieved sparsity, ``speedup_vs_reference``
(locuslab seconds / ours), and ``mask_diff_fraction``: the fraction of decoder Linear entries whose zero
pattern differs between the two providers' final weights (also per layer: ``mask_diff_by_layer``).
Batched and per-sample fp16 forwards round differently, so near-tie flips are possible, and each flip
changes the next layer's inputs, so differences compound with depth. ``correct``: layer 0's fraction
``< MASK_TOLERANCE[method]`` (1e-3 for Wanda), the whole model's ``< CASCADE_TOLERANCE``, and the achieved
sparsity within 0.01 of the target. Without the reference (``--no-reference``), ``correct`` checks the
sparsity only and the mask fields are None.

CPU smoke mode: a tiny OPT, calibration [8, 32], torch backend; same code path, timings meaningless.
"""

from __future__ import annotations

import argparse
import functools
import gc
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

import pruning
from bench.kernels import locuslab_prune_
from bench.shapes import MODELS, DecoderShape
from pruning.config import parse_sparsity_type

log = logging.getLogger(__name__)

OPT_VOCAB = 50272
OPT_MAX_POSITIONS = 2048
INIT_STD = 0.02
WEIGHT_SEED = 1234
CALIBRATION_SEED = 0
SPARSITY_RATIO = 0.5
WARMUP_SAMPLES = 4
# Mask agreement between the providers. Layer 0 sees the same inputs in both (up to the rounding of batched
# vs per-sample forwards), so only near-exact ties can flip there: MASK_TOLERANCE, per method (SparseGPT's
# choices depend on its own weight updates, so one flip moves later choices in the same row: looser).
# Every flip then changes the next layer's inputs by more than rounding, so differences compound with depth
# (fp32 OPT-125M dims, 4x128 tokens: 0 for 8 layers, then 1e-6, 5e-4, 3e-3 ... 7e-3 by layer 24), so the
# whole model only gets a loose sanity bound. A wrong statistic shows in layer 0 already; a skipped
# recompute of the pruned layer's outputs shows as a jump at layer 1 (same setting: 0, 5.3e-2, 6.4e-2, ...),
# which ``mask_diff_by_layer`` (recorded) tells apart from the gradual growth of a cascade.
MASK_TOLERANCE = {"wanda": 1e-3, "sparsegpt": 1e-2}
CASCADE_TOLERANCE = 0.05
METHODS = tuple(MASK_TOLERANCE)

SMOKE_MODEL = "opt-smoke"
SMOKE_SHAPE = DecoderShape(hidden=64, ffn=256, n_layers=2, n_heads=4)
SMOKE_VOCAB, SMOKE_MAX_POSITIONS = 128, 64
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
    if model != SMOKE_MODEL and not (model in MODELS and model.startswith("opt-")):
        opts = [name for name in MODELS if name.startswith("opt-")]
        raise argparse.ArgumentTypeError(f"{text!r}: model must be one of {', '.join(opts)}")
    if method not in METHODS:
        raise argparse.ArgumentTypeError(f"{text!r}: method must be one of {', '.join(METHODS)}")
    try:
        parse_sparsity_type(sparsity_type)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"{text!r}: {err}") from None
    return [E2ERun(model, method, sparsity_type)]


# --- random-weight models -------------------------------------------------------------------------


def opt_config(model: str, n_layers: int | None = None):
    """An OPTConfig with the real dims of ``model`` (opt-350m's 512-wide embedding projection is not modelled)."""
    from transformers import OPTConfig

    smoke = model == SMOKE_MODEL
    shape = SMOKE_SHAPE if smoke else MODELS[model]
    vocab, positions = (SMOKE_VOCAB, SMOKE_MAX_POSITIONS) if smoke else (OPT_VOCAB, OPT_MAX_POSITIONS)
    return OPTConfig(
        vocab_size=vocab, hidden_size=shape.hidden, word_embed_proj_dim=shape.hidden, ffn_dim=shape.ffn,
        num_hidden_layers=n_layers or shape.n_layers, num_attention_heads=shape.n_heads,
        max_position_embeddings=positions,
        dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, do_layer_norm_before=True,
    )  # fmt: skip


@torch.no_grad()
def init_random_weights_(model: nn.Module, seed: int = WEIGHT_SEED, std: float = INIT_STD) -> None:
    """N(0, std) Linear/Embedding weights, zero biases, unit LayerNorms; the same seed gives the same model."""
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    seen: set[int] = set()
    for module in model.modules():
        weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
        if weight is None or id(weight) in seen:  # a tied lm_head shares the embedding's weight
            continue
        seen.add(id(weight))
        if isinstance(module, (nn.Linear, nn.Embedding)):
            weight.normal_(0.0, std, generator=gen)
        elif isinstance(module, nn.LayerNorm):
            weight.fill_(1.0)
        if bias is not None:
            bias.zero_()


def build_random_opt(model: str, device: torch.device, dtype: torch.dtype, n_layers: int | None = None):
    """A random-weight OPTForCausalLM built on the meta device and allocated directly on ``device``.

    Skips Hugging Face's weight initialisation (it runs on meta tensors), which would otherwise take
    minutes for billions of parameters and need the model in CPU RAM.
    """
    from transformers import OPTForCausalLM

    with torch.device("meta"):
        net = OPTForCausalLM(opt_config(model, n_layers))
    net = net.to(dtype=dtype).to_empty(device=device)
    if hasattr(net, "tie_weights"):
        net.tie_weights()  # to_empty gives the tied lm_head its own (uninitialized) tensor
    init_random_weights_(net)
    return net.eval()


def calibration_ids(nsamples: int, seqlen: int, vocab: int, seed: int = CALIBRATION_SEED) -> torch.Tensor:
    """Random token ids [nsamples, seqlen] on the CPU (where a dataloader hands them over)."""
    return torch.randint(0, vocab, (nsamples, seqlen), generator=torch.Generator().manual_seed(seed))


# --- locuslab/wanda lib/prune_opt.py, re-implemented faithfully ---------------------------------------


def _cuda_synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _empty_cache() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def find_layers(module: nn.Module, layers=(nn.Linear,), name: str = "") -> dict[str, nn.Module]:
    """lib/prune_opt.py find_layers: every module of the given types, by qualified name."""
    if type(module) in layers:
        return {name: module}
    res = {}
    for name1, child in module.named_children():
        res.update(find_layers(child, layers=layers, name=name + "." + name1 if name != "" else name1))
    return res


class WrappedGPT:
    """lib/layerwrapper.py: a running mean over samples of each input channel's squared L2 norm."""

    def __init__(self, layer: nn.Linear):
        self.layer = layer
        self.dev = self.layer.weight.device
        self.rows = layer.weight.data.shape[0]
        self.columns = layer.weight.data.shape[1]
        self.scaler_row = torch.zeros((self.columns), device=self.dev)
        self.nsamples = 0

    def add_batch(self, inp: torch.Tensor, out: torch.Tensor) -> None:
        if len(inp.shape) == 2:
            inp = inp.unsqueeze(0)
        tmp = inp.shape[0]
        if isinstance(self.layer, nn.Linear):
            if len(inp.shape) == 3:
                inp = inp.reshape((-1, inp.shape[-1]))
            inp = inp.t()
        self.scaler_row *= self.nsamples / (self.nsamples + tmp)
        self.nsamples += tmp
        inp = inp.type(torch.float32)
        self.scaler_row += torch.norm(inp, p=2, dim=1) ** 2 / self.nsamples


class SparseGPT:
    """lib/sparsegpt.py (IST-DASLab/sparsegpt f5c2500): Hessian running mean + fasterprune. Unchanged apart
    from the Conv1D/Conv2d branches (OPT has only nn.Linear) and the unused timer and losses print."""

    def __init__(self, layer: nn.Linear):
        self.layer = layer
        self.dev = self.layer.weight.device
        W = layer.weight.data.clone()
        self.rows = W.shape[0]
        self.columns = W.shape[1]
        self.H = torch.zeros((self.columns, self.columns), device=self.dev)
        self.nsamples = 0

    def add_batch(self, inp: torch.Tensor, out: torch.Tensor) -> None:
        if len(inp.shape) == 2:
            inp = inp.unsqueeze(0)
        tmp = inp.shape[0]
        if len(inp.shape) == 3:
            inp = inp.reshape((-1, inp.shape[-1]))
        inp = inp.t()
        self.H *= self.nsamples / (self.nsamples + tmp)
        self.nsamples += tmp
        inp = math.sqrt(2 / self.nsamples) * inp.float()
        self.H += inp.matmul(inp.t())

    def fasterprune(self, sparsity, prune_n=0, prune_m=0, blocksize=128, percdamp=0.01) -> None:
        W = self.layer.weight.data.clone().float()
        H = self.H
        del self.H
        dead = torch.diag(H) == 0
        H[dead, dead] = 1
        W[:, dead] = 0
        Losses = torch.zeros(self.rows, device=self.dev)
        damp = percdamp * torch.mean(torch.diag(H))
        diag = torch.arange(self.columns, device=self.dev)
        H[diag, diag] += damp
        H = torch.linalg.cholesky(H)
        H = torch.cholesky_inverse(H)
        H = torch.linalg.cholesky(H, upper=True)
        Hinv = H
        mask = None
        for i1 in range(0, self.columns, blocksize):
            i2 = min(i1 + blocksize, self.columns)
            count = i2 - i1
            W1 = W[:, i1:i2].clone()
            Q1 = torch.zeros_like(W1)
            Err1 = torch.zeros_like(W1)
            Losses1 = torch.zeros_like(W1)
            Hinv1 = Hinv[i1:i2, i1:i2]
            if prune_n == 0:
                if mask is not None:
                    mask1 = mask[:, i1:i2]
                else:
                    tmp = W1**2 / (torch.diag(Hinv1).reshape((1, -1))) ** 2
                    thresh = torch.sort(tmp.flatten())[0][int(tmp.numel() * sparsity)]
                    mask1 = tmp <= thresh
            else:
                mask1 = torch.zeros_like(W1) == 1
            for i in range(count):
                w = W1[:, i]
                d = Hinv1[i, i]
                if prune_n != 0 and i % prune_m == 0:
                    tmp = W1[:, i : (i + prune_m)] ** 2 / (torch.diag(Hinv1)[i : (i + prune_m)].reshape((1, -1))) ** 2
                    mask1.scatter_(1, i + torch.topk(tmp, prune_n, dim=1, largest=False)[1], True)
                q = w.clone()
                q[mask1[:, i]] = 0
                Q1[:, i] = q
                Losses1[:, i] = (w - q) ** 2 / d**2
                err1 = (w - q) / d
                W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
                Err1[:, i] = err1
            W[:, i1:i2] = Q1
            Losses += torch.sum(Losses1, 1) / 2
            W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
        _cuda_synchronize()
        self.layer.weight.data = W.reshape(self.layer.weight.shape).to(self.layer.weight.data.dtype)

    def free(self) -> None:
        self.H = None
        _empty_cache()


def _hidden_states(out):
    """A decoder layer's output: a tensor in transformers 5, ``(hidden_states, ...)`` before."""
    return out[0] if isinstance(out, (tuple, list)) else out


def locuslab_prepare_calibration_input(model, calibration_ids: torch.Tensor, device: torch.device):
    """prepare_calibration_input: a Catcher in place of layer 0 records its input, one sample per forward."""
    use_cache = model.config.use_cache
    model.config.use_cache = False
    layers = model.model.decoder.layers
    nsamples, seqlen = calibration_ids.shape
    dtype = next(iter(model.parameters())).dtype
    inps = torch.zeros((nsamples, seqlen, model.config.hidden_size), dtype=dtype, device=device)  # 128 upstream
    inps.requires_grad = False
    cache = {"i": 0, "layer_kwargs": None}

    class Catcher(nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, inp, **kwargs):
            inps[cache["i"]] = inp
            cache["i"] += 1
            # upstream keeps kwargs['attention_mask'] only; newer layers also want position_ids etc.
            cache["layer_kwargs"] = {
                k: v for k, v in kwargs.items() if k not in ("past_key_value", "past_key_values", "cache")
            }
            raise ValueError

    layers[0] = Catcher(layers[0])
    for j in range(nsamples):  # the dataloader yields one [1, seqlen] sample per batch
        try:
            model(calibration_ids[j : j + 1].to(device))
        except ValueError:
            pass
    layers[0] = layers[0].module
    if cache["i"] != nsamples:
        raise RuntimeError(f"the Catcher saw {cache['i']} of {nsamples} samples: the model forward failed early")
    outs = torch.zeros_like(inps)
    model.config.use_cache = use_cache
    return inps, outs, cache["layer_kwargs"]


def locuslab_prune_wanda(model, calibration_ids, sparsity_ratio, prune_n=0, prune_m=0, device=None) -> None:
    """prune_wanda from locuslab/wanda lib/prune_opt.py (OPT), minus data loading and prints."""
    device = device or next(model.parameters()).device
    use_cache = model.config.use_cache
    model.config.use_cache = False
    nsamples = calibration_ids.shape[0]
    with torch.no_grad():
        inps, outs, layer_kwargs = locuslab_prepare_calibration_input(model, calibration_ids, device)

    layers = model.model.decoder.layers
    for i in range(len(layers)):
        layer = layers[i]
        subset = find_layers(layer)
        wrapped_layers = {name: WrappedGPT(subset[name]) for name in subset}

        def add_batch(name, wrapped_layers=wrapped_layers):
            def hook(_, inp, out):  # upstream names it tmp, like the N:M loop's variable below
                wrapped_layers[name].add_batch(inp[0].data, out.data)

            return hook

        handles = [subset[name].register_forward_hook(add_batch(name)) for name in wrapped_layers]
        for j in range(nsamples):
            with torch.no_grad():
                outs[j] = _hidden_states(layer(inps[j].unsqueeze(0), **layer_kwargs))
        for h in handles:
            h.remove()

        for name in subset:  # prune_wanda's mask + zeroing, per matrix (bench.kernels keeps it verbatim)
            locuslab_prune_(subset[name].weight.data, wrapped_layers[name].scaler_row, sparsity_ratio, prune_n, prune_m)

        for j in range(nsamples):
            with torch.no_grad():
                outs[j] = _hidden_states(layer(inps[j].unsqueeze(0), **layer_kwargs))
        inps, outs = outs, inps

    model.config.use_cache = use_cache
    _empty_cache()


@torch.no_grad()
def locuslab_prune_sparsegpt(model, calibration_ids, sparsity_ratio, prune_n=0, prune_m=0, device=None) -> None:
    """prune_sparsegpt from locuslab/wanda lib/prune_opt.py (OPT), minus data loading and prints."""
    device = device or next(model.parameters()).device
    use_cache = model.config.use_cache
    model.config.use_cache = False
    nsamples = calibration_ids.shape[0]
    inps, outs, layer_kwargs = locuslab_prepare_calibration_input(model, calibration_ids, device)
    _empty_cache()

    layers = model.model.decoder.layers
    for i in range(len(layers)):
        layer = layers[i]
        subset = find_layers(layer)
        gpts = {name: SparseGPT(subset[name]) for name in subset}

        def add_batch(name, gpts=gpts):
            def hook(_, inp, out):
                gpts[name].add_batch(inp[0].data, out.data)

            return hook

        handles = [subset[name].register_forward_hook(add_batch(name)) for name in gpts]
        for j in range(nsamples):
            outs[j] = _hidden_states(layer(inps[j].unsqueeze(0), **layer_kwargs))
        for h in handles:
            h.remove()

        for name in gpts:
            gpts[name].fasterprune(sparsity_ratio, prune_n=prune_n, prune_m=prune_m, percdamp=0.01, blocksize=128)
            gpts[name].free()

        for j in range(nsamples):
            outs[j] = _hidden_states(layer(inps[j].unsqueeze(0), **layer_kwargs))
        layers[i] = layer
        _empty_cache()
        inps, outs = outs, inps

    model.config.use_cache = use_cache
    _empty_cache()


LOCUSLAB = {"wanda": locuslab_prune_wanda, "sparsegpt": locuslab_prune_sparsegpt}


def locuslab_prune(model, calibration_ids, method: str, sparsity_type: str, sparsity_ratio=SPARSITY_RATIO) -> None:
    n, m = parse_sparsity_type(sparsity_type)
    LOCUSLAB[method](model, calibration_ids, sparsity_ratio, prune_n=n, prune_m=m)


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
        for provider in ("ours", "locuslab") if reference else ("ours",):
            init_random_weights_(net)
            (ours_prune if provider == "ours" else locuslab_prune)(net, ids, method, sparsity_type)
    del net
    _free(device)


def _record(run: E2ERun, provider, calib, dtype, seconds, peak, sparsity, extra) -> dict:
    import transformers

    ms = seconds * 1e3
    return {
        "suite": "e2e",
        "op": f"prune_{run.method}_{run.sparsity_type}",
        "provider": provider,
        "label": run.model,
        "model": run.model,
        "method": run.method,
        "sparsity_type": run.sparsity_type,
        "sparsity_ratio": SPARSITY_RATIO,
        "shape": list(calib),  # calibration [nsamples, seqlen]
        "dtype": str(dtype).removeprefix("torch."),
        "median_ms": ms,
        "p20_ms": ms,
        "p80_ms": ms,
        "reps": 1,
        "seconds": seconds,
        "peak_gpu_memory_bytes": peak,
        "actual_sparsity": sparsity,
        "gbps": None,
        "x_copy": None,
        "warmup": WARMUP_NOTE,
        "transformers": transformers.__version__,
        **extra,
    }


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
        runs = [E2ERun(SMOKE_MODEL, method, st) for method, st in dict.fromkeys(pairs)]
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
            if reference:
                # Written before the reference runs (minutes, for SparseGPT): a run cut off there keeps ours. The
                # record after the reference, with the speed-up and the mask agreement, supersedes it.
                (early,) = _run_records(run, calib, dtype, ours, None, None)
                yield {**early, "compared": False}
                packed = packed_zero_masks(net)
                init_random_weights_(net)
                log.info("e2e: %s locuslab", run.spec)
                try:
                    _, ref_seconds, ref_peak = _timed(
                        functools.partial(locuslab_prune, net, ids, run.method, run.sparsity_type), device
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
            run, "ours", calib, dtype, ours["seconds"], ours["peak"], ours["sparsity"],
            {
                "backend": report.backend,
                "calib_batch_size": report.calib_batch_size,
                "speedup_vs_reference": ref["seconds"] / ours["seconds"] if ref else None,
                **mask_fields,
                "correct": sparsity_ok(ours["sparsity"]) and masks_ok is not False,
            },
        )
    ]  # fmt: skip
    if ref:
        records.append(
            _record(
                run, "locuslab", calib, dtype, ref["seconds"], ref["peak"], ref["sparsity"],
                {
                    "backend": "torch",
                    "calib_batch_size": 1,
                    "speedup_vs_reference": 1.0,
                    **mask_fields,
                    "correct": sparsity_ok(ref["sparsity"]) and bool(masks_ok),
                },
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
