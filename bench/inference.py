"""2:4 sparse inference against dense, through the same runners: is 2:4 actually faster? (design: docs/benchmarks.md)

linear   per-Linear on real FFN/attention shapes, M in LINEAR_TOKENS rows: dense cuBLAS, cuSPARSELt, our
         Triton 2:4 GEMV (M <= 128) and Sparse24Linear's choice, each timed inside a CUDA graph; at M <= 128
         every call cycles through ROTATION_BYTES of weight copies so that no provider is served from L2.
model    random-weight OPT-6.7B, OPT-13B and a LLaMA-7B shape, magnitude 2:4, dense-with-zeros then
         compressed to Sparse24Linear: graphed prefill (B x T) and greedy decode tokens/s after a 512-token
         context; the sparse logits must match the dense ones (relative error < LOGITS_RTOL). Both fused
         (``pruning.infer.fusion``) unless ``--no-fuse``. CPU smoke mode: tiny shapes, timings meaningless.
"""

from __future__ import annotations

import functools
import gc
import logging
import time
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from bench.fixtures.models import LLAMA_SMOKE, OPT_SMOKE, build_model
from bench.records import once, record
from bench.shapes import MODELS, linear_shape
from bench.timing import time_op

log = logging.getLogger(__name__)

# FFN shapes, a square attention projection, and the fused q/k/v product that the whole-model runs use.
LINEAR_CASES = [
    ("opt-13b", "fc1"), ("opt-13b", "fc2"), ("llama-7b", "down_proj"), ("opt-6.7b", "q_proj"), ("opt-13b", "qkv_proj"),
]  # fmt: skip
LINEAR_TOKENS = (1, 4, 8, 16, 32, 128, 2048, 8192)  # 4-32: to locate where the Triton kernel stops paying
MODEL_NAMES = ("opt-6.7b", "opt-13b", "llama-7b")
PREFILL_SHAPES = ((1, 2048), (8, 2048))
DECODE_BATCHES = (1, 8)
DECODE_CONTEXT = 512
DECODE_STEPS = 64
LOGITS_RTOL = 1e-2
LINEAR_RTOL = 5e-3  # per-Linear outputs, relative Frobenius error against dense F.linear
ROTATE_MAX_TOKENS = 128  # memory-bound sizes: weights rotate past L2 (H100 50 MB, H200 60 MB)
ROTATION_BYTES = 256 << 20  # of dense weight copies; the 2:4 copies of them hold 0.5625x that

KERNELS = "triton"  # our kernels: on the GPU, and in smoke mode under the CPU interpreter
SMOKE_LINEARS = [("smoke", (32, 64))]
SMOKE_TOKENS = (1, 4, 32)
SMOKE_MODELS = (OPT_SMOKE, LLAMA_SMOKE)
SMOKE_PREFILL = ((1, 16), (2, 16))
SMOKE_CONTEXT, SMOKE_STEPS = 8, 4


# --- models ----------------------------------------------------------------------------------------


@torch.no_grad()
def prune_24_(model: nn.Module) -> None:
    """Magnitude 2:4 on every decoder Linear (random weights: only the pattern matters for speed)."""
    from pruning.adapters import get_adapter
    from pruning.methods import prune_magnitude_

    backend = "triton" if next(model.parameters()).is_cuda else "torch"
    for layer in get_adapter(model).layers(model):
        for module in layer.modules():
            if isinstance(module, nn.Linear):
                prune_magnitude_(module.weight.data, 0.5, 2, 4, backend=backend)


# --- timing ----------------------------------------------------------------------------------------


def _time_graphed(fn, device: torch.device, reps: int, calls_per_fn: int = 1) -> dict:
    """Median/p20/p80 ms per call with host overhead removed (CUDA graph) on a GPU; a plain timer on CPU.
    ``fn`` makes ``calls_per_fn`` calls (one per weight copy, see ROTATION_BYTES)."""
    if device.type != "cuda":
        timing = time_op(fn, device=device, reps=reps)
    else:
        import triton.testing

        median, p20, p80 = triton.testing.do_bench_cudagraph(fn, rep=max(20, 5 * reps), quantiles=[0.5, 0.2, 0.8])
        timing = {"median_ms": median, "p20_ms": p20, "p80_ms": p80, "reps": reps}
    for key in ("median_ms", "p20_ms", "p80_ms"):
        timing[key] /= calls_per_fn
    return {**timing, "weight_copies": calls_per_fn}


def _each(fns: list) -> object:
    """Call every function in turn (one per weight copy); the last result."""
    out = None
    for fn in fns:
        out = fn()
    return out


def _record(op, provider, label, shape, dtype, timing, reference_ms, correct, **fields) -> dict:
    return record("inference", op, provider, label, shape, dtype, timing=timing, correct=correct,
                  reference_ms=reference_ms, **fields)  # fmt: skip


# --- per-Linear microbenchmark -----------------------------------------------------------------------


def _weight_copies(n_tokens: int, n_out: int, n_in: int, dtype: torch.dtype, smoke: bool) -> int:
    """How many copies of the weight one timed call cycles through: enough to leave L2 at memory-bound sizes."""
    if smoke or n_tokens > ROTATE_MAX_TOKENS:
        return 1
    dense_bytes = n_out * n_in * torch.finfo(dtype).bits // 8
    return max(1, -(-ROTATION_BYTES // dense_bytes))


def bench_linears(
    device: torch.device, smoke: bool, dtype: torch.dtype, reps: int, tokens: tuple[int, ...] | None = None
) -> Iterator[dict]:
    from pruning.infer import Sparse24Linear
    from pruning.methods import prune_magnitude_
    from wanda_kernels.sparse24_mm import last_tuned_config, sparse24_linear

    cases = SMOKE_LINEARS if smoke else [(f"{m}.{n}", linear_shape(m, n)) for m, n in LINEAR_CASES]
    for label, (n_out, n_in) in cases:
        gen = torch.Generator(device=device).manual_seed(0)
        linear = nn.Linear(n_in, n_out, bias=False, device=device, dtype=dtype)
        linear.weight.data.normal_(0, 0.02, generator=gen)
        prune_magnitude_(linear.weight.data, 0.5, 2, 4, backend="triton" if device.type == "cuda" else "torch")
        sparse = Sparse24Linear.from_linear(linear)
        weights, modules = [linear.weight.data], [sparse]  # grown to the copies a token count needs
        for n_tokens in tokens or (SMOKE_TOKENS if smoke else LINEAR_TOKENS):
            n_copies = _weight_copies(n_tokens, n_out, n_in, dtype, smoke)
            while len(modules) < n_copies:
                weights.append(weights[0].clone())
                copy = Sparse24Linear.from_linear(linear)
                # The same shape: the first module's choices (backend per row count, cuSPARSELt algorithm)
                # hold for every copy, and are not searched again.
                copy._backends, copy._cslt_alg = sparse._backends, sparse._cslt_alg
                modules.append(copy)
            x = torch.randn(n_tokens, n_in, generator=gen, device=device).to(dtype)
            with torch.no_grad():
                want = F.linear(x, linear.weight)
                providers = {"dense": [functools.partial(F.linear, x, w) for w in weights[:n_copies]]}
                if device.type == "cuda":
                    providers["cusparselt"] = [functools.partial(m._cusparselt_linear, x) for m in modules[:n_copies]]
                    if torch.cuda.get_device_capability(device)[0] == 8:
                        providers["cutlass"] = [functools.partial(m._cutlass_linear, x) for m in modules[:n_copies]]
                if n_tokens <= 128:
                    providers["triton_24"] = [
                        functools.partial(sparse24_linear, x, m.values, m.meta) for m in modules[:n_copies]
                    ]
                providers["sparse24_auto"] = [functools.partial(m, x) for m in modules[:n_copies]]
                timings = {}
                for provider, fns in providers.items():
                    try:
                        got = fns[0]()  # the first copy decides (autotuning, compression, algorithm search)
                        _each(fns)
                    except (RuntimeError, TypeError, ValueError, NotImplementedError) as err:
                        log.warning("inference: %s fails on %s M=%d: %s", provider, label, n_tokens, err)
                        continue  # a missing library or unsupported GPU: no record rather than no benchmark
                    # Both sides accumulate in fp32 and round to fp16 (~2^-11 relative each; cuBLAS may also
                    # reduce split-K partials in fp16): ~1e-3 relative Frobenius error; a wrong index or a
                    # dropped term is off by orders of magnitude more.
                    error = (got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-30)
                    correct = bool(error < LINEAR_RTOL)
                    extra = {}
                    if provider == "triton_24":  # which path and tile the autotuner measured best here
                        extra["kernel_config"] = last_tuned_config()
                    timing = _time_graphed(functools.partial(_each, fns), device, reps, len(fns))
                    timings[provider] = (timing, correct, extra)
            dense_ms = timings["dense"][0]["median_ms"]
            for provider, (timing, correct, extra) in timings.items():
                yield _record("linear", provider, label, (n_tokens, n_out, n_in), dtype, timing, dense_ms, correct,
                              **extra)  # fmt: skip
        del linear, sparse, weights, modules
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


# --- whole models ---------------------------------------------------------------------------------------

# Where a decode step's GPU time goes, by kernel name. Attention first: its kernels' names can contain "cutlass"
# or "splitk" too (fmha_cutlassF..., flash_fwd_splitkv...).
KERNEL_CATEGORIES = (
    ("attention", ("flash", "fmha", "attention", "softmax", "sdpa")),
    ("linear", ("sparse24_linear", "gemv", "gemm", "cutlass", "xmma", "cublas", "cusparselt", "splitk")),
)


def classify_kernel(name: str) -> str:
    lower = name.lower()
    for category, markers in KERNEL_CATEGORIES:
        if any(marker in lower for marker in markers):
            return category
    return "other"


def summarize_kernels(kernels: list[tuple[str, float]], steps: int) -> dict:
    """Per decode step: kernel count and GPU microseconds by category, and the costliest 'other' kernels."""
    summary = {"kernels_per_step": len(kernels) / steps}
    other: dict[str, float] = {}
    for category in [c for c, _ in KERNEL_CATEGORIES] + ["other"]:
        chosen = [(name, us) for name, us in kernels if classify_kernel(name) == category]
        summary[f"{category}_kernels_per_step"] = len(chosen) / steps
        summary[f"{category}_us_per_step"] = sum(us for _, us in chosen) / steps
        if category == "other":
            for name, us in chosen:
                other[name[:100]] = other.get(name[:100], 0.0) + us / steps
    summary["top_other_us_per_step"] = sorted(other.items(), key=lambda item: -item[1])[:6]
    return summary


def _profile_decode_steps(decoder, steps: int = 4) -> dict:
    """The GPU kernels of a few decode steps (graph replays included), by category; a diagnosis, not the timing."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    try:
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                decoder.step()
            torch.cuda.synchronize()
        kernels = [(e.name, e.time_range.elapsed_us()) for e in prof.events() if e.device_type == DeviceType.CUDA]
        return summarize_kernels(kernels, steps)
    except Exception as err:  # diagnostics must not cost the measurements
        log.warning("inference: decode profile failed: %s", err)
        return {"error": str(err)[:300]}


AGREEMENT_PROMPT, AGREEMENT_TOKENS = 32, 8


def _agreement_with_eager(model, short_prompt: torch.Tensor, graphed_tokens: torch.Tensor, max_len: int) -> float:
    """The fraction of greedy tokens an eager decoder produces alike the timed (graphed) one did from the same
    short prompt, with a cache of the same length: the same kernels, so 1.0 unless the graph replays something
    else than the step (a stale position, a cache written in the wrong place)."""
    from pruning.infer.runner import GreedyDecoder

    eager = GreedyDecoder(model, short_prompt.shape[0], max_len, use_graph=False, backend=KERNELS)
    agreement = float((eager.generate(short_prompt, graphed_tokens.shape[1]) == graphed_tokens).float().mean())
    del eager
    gc.collect()  # the decoder and its cache layers refer to each other: free the cache now
    return agreement


def _measure_model(model, label, provider, device, dtype, smoke, reps, reference: dict, fused: dict) -> Iterator[dict]:
    from pruning.infer.runner import GreedyDecoder, PrefillRunner

    vocab = model.config.vocab_size
    gen = torch.Generator(device="cpu").manual_seed(0)
    for batch, seqlen in SMOKE_PREFILL if smoke else PREFILL_SHAPES:
        ids = torch.randint(0, vocab, (batch, seqlen), generator=gen).to(device)
        runner = PrefillRunner(model, batch, seqlen)
        logits = runner(ids).float().clone()
        with torch.no_grad():  # the graphed prefill must compute what the model computes eagerly
            eager = model(input_ids=ids, use_cache=False, logits_to_keep=1).logits[:, -1].float()
        graph_error = float((logits - eager).norm() / eager.norm())
        key = ("prefill", batch, seqlen)
        correct = graph_error < LOGITS_RTOL
        if key in reference:  # and the 2:4 model what the dense-with-zeros one computes
            want = reference[key]["logits"]
            correct = correct and bool(((logits - want).norm() / want.norm()) < LOGITS_RTOL)
        timing = time_op(functools.partial(runner, ids), device=device, reps=reps, warmup=1)
        runner_graphed = runner.use_graph
        tokens_per_s = batch * seqlen / (timing["median_ms"] * 1e-3)
        ref_ms = reference[key]["median_ms"] if key in reference else None
        reference.setdefault(key, {"logits": logits, "median_ms": timing["median_ms"]})
        del runner
        yield _record("prefill", provider, label, (batch, seqlen), dtype, timing, ref_ms, correct,
                      tokens_per_s=tokens_per_s, cuda_graph=runner_graphed,
                      graph_vs_eager_error=graph_error, fused_small_ops=fused)  # fmt: skip
    context, steps = (SMOKE_CONTEXT, SMOKE_STEPS) if smoke else (DECODE_CONTEXT, DECODE_STEPS)
    for batch in DECODE_BATCHES:
        prompt = torch.randint(0, vocab, (batch, context), generator=gen).to(device)
        max_len = context + steps + 8  # + the profiled steps
        decoder = GreedyDecoder(model, batch, max_len, backend=KERNELS)
        decoder.prefill(prompt)
        decoder.step()  # captures the graph (GPU) outside the timed region
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            decoder.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        ms_per_token = (time.perf_counter() - t0) * 1e3 / steps
        profile = _profile_decode_steps(decoder) if device.type == "cuda" else None
        use_graph = decoder.use_graph
        short_prompt = prompt[:, :AGREEMENT_PROMPT]
        graphed_tokens = decoder.generate(short_prompt, AGREEMENT_TOKENS)  # replays after a fresh prefill
        del decoder
        gc.collect()  # the decoder and its cache layers refer to each other: free the large cache now
        agreement = _agreement_with_eager(model, short_prompt, graphed_tokens, max_len)
        timing = once(ms_per_token, steps)
        key = ("decode", batch)
        ref_ms = reference[key]["median_ms"] if key in reference else None
        # The 2:4 model's greedy tokens against the dense-with-zeros model's (recorded, not a check: fp16
        # near-ties between two correct kernels may flip a token and everything after it).
        vs_dense = float((graphed_tokens == reference[key]["tokens"]).float().mean()) if key in reference else None
        reference.setdefault(key, {"median_ms": ms_per_token, "tokens": graphed_tokens})
        yield _record("decode", provider, label, (batch, context), dtype, timing, ref_ms, agreement == 1.0,
                      tokens_per_s=batch * 1e3 / ms_per_token, cuda_graph=use_graph,
                      graph_token_agreement=agreement, token_agreement_with_dense=vs_dense,
                      fused_small_ops=fused, kernel_profile=profile)  # fmt: skip


def bench_models(
    device: torch.device, smoke: bool, dtype: torch.dtype, reps: int, models=None, fuse: bool = True
) -> Iterator[dict]:
    from pruning.infer.fusion import fuse_projections_, fuse_small_ops_
    from pruning.sparse24 import compress_model_24

    for name in SMOKE_MODELS if smoke else (MODEL_NAMES if models is None else models):
        if not smoke and name not in MODELS:
            raise ValueError(f"unknown model {name!r} for the inference suite; known: {', '.join(MODELS)}")
        log.info("inference: %s", name)
        model = build_model(name, device, dtype)
        prune_24_(model)
        fused = {**fuse_small_ops_(model, backend=KERNELS), "projections": fuse_projections_(model)} if fuse else {}
        reference: dict = {}
        for provider in ("dense", "sparse24"):
            if provider == "sparse24":
                compress_model_24(model)  # in place: the dense weights are freed
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            try:
                yield from _measure_model(model, name, provider, device, dtype, smoke, reps, reference, fused)
            except (RuntimeError, ValueError) as err:  # keep the other models' numbers; the failure is a record
                log.exception("inference: %s %s failed", name, provider)
                timing = once(None, 0)
                yield _record("model", provider, name, (), dtype, timing, None, False, error=str(err)[:500])
        del model, reference
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def run(
    device: torch.device,
    smoke: bool,
    reps: int = 10,
    models: tuple[str, ...] | None = None,
    fuse: bool = True,
    tokens: tuple[int, ...] | None = None,
) -> Iterator[dict]:
    """Per-Linear then whole-model records, each yielded as soon as it is measured; ``models`` overrides
    MODEL_NAMES (() = per-Linear only); ``tokens`` the per-Linear row counts (() = no per-Linear part)."""
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    reps = min(reps, 10)
    if tokens != ():
        yield from bench_linears(device, smoke, dtype, reps, tokens)
    yield from bench_models(device, smoke, dtype, reps, models, fuse)
