"""Inference runners: the static-cache greedy decoder and the prefill runner agree with plain transformers.

On CPU they run eagerly (the CUDA-graph capture is the only GPU-specific part; it is exercised by the
gpu-marked test and the inference benchmark)."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from bench.fixtures.models import tiny_model
from pruning.infer.runner import GreedyDecoder, PrefillRunner

KERNELS = "triton"  # our kernels wherever Triton runs: here, the CPU under the interpreter


def tiny(family: str):
    torch.manual_seed(0)
    if family == "mistral-sliding":
        from transformers import MistralConfig, MistralForCausalLM

        config = MistralConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                               sliding_window=8)  # fmt: skip
        return MistralForCausalLM(config).eval()
    return tiny_model(family)


@pytest.mark.parametrize("family", ["opt", "llama"])
def test_greedy_decoder_in_bf16_picks_the_full_forward_argmax(family):
    """In bf16, greedy tokens can flip at near-ties between two correct kernels (generate() itself masks its
    decode steps differently), so each token is checked against one full forward over prompt + tokens: it must
    be that forward's argmax, within one bf16 ulp at the logits' scale (2^-7 relative)."""
    model = tiny(family).to(torch.bfloat16)
    prompt = torch.randint(3, 96, (2, 7), generator=torch.Generator().manual_seed(0))
    tokens = GreedyDecoder(model, batch=2, max_len=29, use_graph=False, backend=KERNELS).generate(prompt, 12)
    with torch.no_grad():
        logits = model(torch.cat([prompt, tokens], dim=1)).logits.float()[:, 6:-1]  # the positions that chose them
    gap = logits.max(dim=-1).values - logits.gather(2, tokens.unsqueeze(-1)).squeeze(-1)
    assert gap.max() <= 2.0**-7 * logits.abs().max(), gap


@pytest.mark.parametrize("family", ["opt", "llama"])
def test_greedy_decoder_matches_generate(family):
    model = tiny(family)
    prompt = torch.randint(3, 96, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model.generate(prompt, max_new_tokens=12, do_sample=False, min_new_tokens=12)[:, 7:]
    decoder = GreedyDecoder(
        model, batch=2, max_len=29, use_graph=False, backend=KERNELS
    )  # 32 cache slots, 3 never written
    assert torch.equal(decoder.generate(prompt, 12), want)
    # The cache is reset by the next prefill: a second run gives the same tokens.
    assert torch.equal(decoder.generate(prompt, 12), want)
    # A one-token prompt after a run: written at position 0, not where the last run stopped.
    with torch.no_grad():
        want_one = model.generate(prompt[:, :1], max_new_tokens=5, do_sample=False, min_new_tokens=5)[:, 1:]
    assert torch.equal(decoder.generate(prompt[:, :1], 5), want_one)


class _GraphOnCpu:
    """Stands in for a captured CUDA graph: ``replay`` runs the step again into the captured output."""

    replaying = False

    def __init__(self, fn, out):
        self.fn, self.out = fn, out

    def replay(self):
        _GraphOnCpu.replaying = True
        try:
            self.out.copy_(self.fn())
        finally:
            _GraphOnCpu.replaying = False


def _capture_on_cpu(fn, warmup: int = 2):
    """``runner._capture`` as the device sees it: the warm-up runs execute, the capture run only records (its
    writes to the static cache are undone here), and each replay executes the recorded step."""
    for _ in range(warmup):
        fn()
    cache_tensors = [t for layer in fn.__self__.cache.layers for t in vars(layer).values() if torch.is_tensor(t)]
    before = [t.clone() for t in cache_tensors]
    out = fn()
    for tensor, saved in zip(cache_tensors, before, strict=True):
        tensor.copy_(saved)
    return _GraphOnCpu(fn, out), out


@pytest.mark.parametrize("family", ["opt", "llama", "mistral-sliding"])
def test_graphed_decode_steps_compute_what_eager_steps_do(family, monkeypatch):
    """transformers' static cache layers write at their own device-side counter, and the causal mask takes the
    query's position from it too; the warm-up steps run before a capture advance it. Replayed steps would then
    write keys and values ahead of the position they attend to, or (with the writes placed right) let the first
    replayed step attend one slot too far. Simulated on the CPU: capture with warm-up, then replays; every
    replayed step's logits must be the eager step's, bit for bit, over two generations. A sliding window (8,
    shorter than the decode) branches on a host-side count, which no single captured step can follow: that
    decoder runs eagerly."""
    from pruning.infer import runner

    model = tiny(family)
    prompt = torch.randint(3, 96, (2, 7), generator=torch.Generator().manual_seed(0))
    step_logits, graphed = [], {"on": False}

    def record(_module, args, kwargs, output):
        one_token = (kwargs.get("input_ids") if "input_ids" in kwargs else args[0]).shape[1] == 1
        if one_token and (not graphed["on"] or _GraphOnCpu.replaying):
            step_logits.append(output.logits[:, -1].clone())

    model.register_forward_hook(record, with_kwargs=True)
    want_tokens = GreedyDecoder(model, batch=2, max_len=32, use_graph=False, backend=KERNELS).generate(prompt, 12)
    want_logits, step_logits[:] = list(step_logits), []
    assert len(want_logits) == 11
    monkeypatch.setattr(runner, "_capture", _capture_on_cpu)
    graphed["on"] = True
    decoder = GreedyDecoder(model, batch=2, max_len=32, use_graph=True, backend=KERNELS)
    for _ in range(2):  # the second generation replays only, after a fresh prefill
        step_logits[:] = []
        assert torch.equal(decoder.generate(prompt, 12), want_tokens)
        if family == "mistral-sliding":
            assert not decoder.use_graph and decoder.graph is None
            continue
        assert decoder.use_graph and len(step_logits) == len(want_logits)
        for got, want in zip(step_logits, want_logits, strict=True):
            assert torch.equal(got, want)


def test_decoder_refuses_overflow():
    decoder = GreedyDecoder(tiny("llama"), batch=1, max_len=8, use_graph=False, backend=KERNELS)
    with pytest.raises(ValueError, match="prompt must be"):
        decoder.prefill(torch.zeros(1, 8, dtype=torch.long))
    decoder.prefill(torch.zeros(1, 6, dtype=torch.long))
    decoder.step()
    decoder.step()
    with pytest.raises(ValueError, match="full"):
        decoder.step()
    fresh = GreedyDecoder(tiny("llama"), batch=1, max_len=8, use_graph=False, backend=KERNELS)
    with pytest.raises(ValueError, match="call prefill"):
        fresh.step()
    with pytest.raises(ValueError, match="prompt must be"):
        fresh.prefill(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="max_new_tokens must be"):
        fresh.generate(torch.zeros(1, 3, dtype=torch.long), 0)


@pytest.mark.parametrize("family", ["opt", "llama", "mistral-sliding"])
def test_prefill_runner_returns_last_logits(family):
    """Mistral's 8-token window is shorter than the 20-token prompt: causal attention alone would see past it."""
    model = tiny(family)
    ids = torch.randint(0, 96, (3, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(ids).logits[:, -1]
    runner = PrefillRunner(model, batch=3, seqlen=20, use_graph=False)
    torch.testing.assert_close(runner(ids), want, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("fused", [False, True], ids=["as-written", "fused"])
@pytest.mark.parametrize("family", ["opt", "llama"])
def test_graphed_runners_match_eager_on_cuda(family, fused):
    from pruning.infer.fusion import fuse_projections_, fuse_small_ops_

    model = tiny(family).half().cuda()
    if fused:
        fuse_small_ops_(model, backend=KERNELS)
        fuse_projections_(model)
    prompt = torch.randint(3, 96, (2, 7), device="cuda")
    eager = GreedyDecoder(model, batch=2, max_len=32, use_graph=False, backend=KERNELS).generate(prompt, 10)
    graphed_decoder = GreedyDecoder(model, batch=2, max_len=32, use_graph=True, backend=KERNELS)
    graphed = graphed_decoder.generate(prompt, 10)
    assert graphed_decoder.use_graph, "decode-step capture failed and fell back to eager"
    assert torch.equal(eager, graphed)
    ids = torch.randint(0, 96, (2, 16), device="cuda")
    runner = PrefillRunner(model, batch=2, seqlen=16, use_graph=True)
    assert runner.use_graph, "prefill capture failed and fell back to eager"
    with torch.no_grad():
        torch.testing.assert_close(runner(ids), model(ids).logits[:, -1], rtol=1e-2, atol=1e-2)


class _CaptureHazards(TorchDispatchMode):
    """Records what would go wrong inside a CUDA graph: ops that read a device value back to the host
    (``.item()``, data-dependent shapes), which capture refuses, and how attention was called."""

    SYNCING = {"_local_scalar_dense", "nonzero", "masked_select", "unique_consecutive", "_unique2"}

    def __init__(self):
        super().__init__()
        self.syncs, self.attention = [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name in self.SYNCING:
            self.syncs.append(str(func))
        if name.startswith("_scaled_dot_product"):  # (q, k, v, dropout_p, is_causal, *, attn_mask, ...)
            is_causal = args[4] if len(args) > 4 else kwargs.get("is_causal", False)
            self.attention.append((kwargs.get("attn_mask") is not None, bool(is_causal)))
        return func(*args, **kwargs)


@pytest.mark.parametrize("fused", [False, True], ids=["as-written", "fused"])
@pytest.mark.parametrize("capturing", [False, True], ids=["eager", "capturing"])
@pytest.mark.parametrize("family", ["opt", "llama"])
def test_runners_are_capturable_and_prefill_stays_maskless(family, capturing, fused, monkeypatch):
    """What a CUDA graph needs, checked on the CPU. transformers changes course while a stream is capturing
    (it stops reading masks on the host and builds them instead), so that state is simulated too. The fused
    layers of pruning.fusion (one-kernel norms and rotary, shared q/k/v products) must keep it so."""
    import transformers.utils.import_utils as hf_import_utils

    from pruning.infer.fusion import fuse_projections_, fuse_small_ops_

    model = tiny(family)
    if fused:
        fuse_small_ops_(model, backend=KERNELS)
        fuse_projections_(model)
    decoder = GreedyDecoder(model, batch=2, max_len=32, use_graph=False, backend=KERNELS)
    decoder.prefill(torch.randint(3, 96, (2, 7), generator=torch.Generator().manual_seed(0)))
    decoder.step()
    runner = PrefillRunner(model, batch=2, seqlen=10, use_graph=False)
    ids = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(ids).logits[:, -1]
    if capturing:
        monkeypatch.setattr(hf_import_utils, "is_cuda_stream_capturing", lambda: True)
    with _CaptureHazards() as step:
        decoder.step()
    with _CaptureHazards() as prefill:
        got = runner(ids)
    assert step.syncs == [] and prefill.syncs == []
    # Prefill attention: no mask tensor, is_causal=True (what lets SDPA pick its flash kernel), same logits.
    assert prefill.attention == [(False, True)] * model.config.num_hidden_layers
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert model.config._attn_implementation == "sdpa"  # restored after the prefill


def test_cache_layers_with_other_value_head_size_keep_transformers_update():
    """The one-kernel write takes keys and values of one shape; a layer whose values have another head size is
    updated by transformers' own method, as if the decoder had not touched it."""
    from transformers.cache_utils import StaticLayer

    decoder = GreedyDecoder(tiny("llama"), batch=1, max_len=8, use_graph=False, backend=KERNELS)
    keys, values = torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 4)
    ours, theirs = StaticLayer(max_cache_len=8), StaticLayer(max_cache_len=8)
    got = decoder._write_cache_layer(ours, keys, values)
    want = theirs.update(keys, values)
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    assert int(ours.cumulative_length) == int(theirs.cumulative_length) == 3


@pytest.mark.parametrize("family", ["opt", "llama"])
def test_decode_step_mask_gives_transformers_own_masking(family):
    """A decode step passes its own additive [1, 1, 1, slots] mask (-inf past the position); the logits equal
    those of the step under the mask transformers builds from the 2-D one, bit for bit."""
    model = tiny(family)
    decoder = GreedyDecoder(model, batch=2, max_len=29, use_graph=False, backend=KERNELS)
    decoder.prefill(torch.randint(3, 96, (2, 7), generator=torch.Generator().manual_seed(0)))
    seen = []
    hook = model.register_forward_hook(lambda _m, _a, out: seen.append(out.logits[:, -1].clone()))
    position, token = decoder.length, decoder.token.clone()
    decoder.step()
    hook.remove()
    # The same step again (it rewrites the same cache slot with the same values); transformers takes the query's
    # position from the layers' count of cached tokens, which the step advanced: put it back.
    decoder.position.fill_(position)
    for layer in decoder.cache.layers:
        layer.cumulative_length.fill_(position)
    with torch.no_grad():
        want = model(input_ids=token, attention_mask=decoder.attention_mask,
                     position_ids=decoder.position.expand(2, 1), cache_position=decoder.position, use_cache=True,
                     **{decoder.cache_kwarg: decoder.cache}).logits[:, -1]  # fmt: skip
    assert len(seen) == 1 and torch.equal(seen[0], want)


def test_a_failed_capture_reports_its_first_error_and_restores_the_stream(monkeypatch, caplog):
    """An invalidated capture fails again in capture_end, before the graph context puts the stream back."""
    from pruning.infer import runner

    streams = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: "the caller's stream")
    monkeypatch.setattr(torch.cuda, "set_stream", streams.append)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)

    def invalidated_capture(fn):
        try:
            raise RuntimeError("operation not permitted when stream is capturing (a host sync)")
        except RuntimeError:
            raise RuntimeError("operation failed due to a previous error during capture") from None

    monkeypatch.setattr(runner, "_capture", invalidated_capture)
    with caplog.at_level("WARNING"):
        assert runner._try_capture(lambda: None, "decode step") == (None, None)
    assert streams == ["the caller's stream"]
    assert "a host sync" in caplog.text


@pytest.mark.gpu
def test_a_prompt_on_the_cpu_decodes_on_the_gpu():
    model = tiny("llama").cuda()
    prompt = torch.randint(3, 96, (1, 7), generator=torch.Generator().manual_seed(0))
    tokens = GreedyDecoder(model, batch=1, max_len=20, backend=KERNELS).generate(prompt, 4)
    with torch.no_grad():
        want = model.generate(prompt.cuda(), max_new_tokens=4, do_sample=False, min_new_tokens=4)[:, 7:]
    assert torch.equal(tokens, want)
