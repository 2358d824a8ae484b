"""The inference benchmark in CPU smoke mode: both providers run through the same runners and agree."""

from __future__ import annotations

import warnings

import torch

from bench import inference
from bench.fixtures.models import build_model


def test_inference_smoke_records():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Sparse24Linear's one-time "dense on CPU" warning
        records = list(inference.run(torch.device("cpu"), smoke=True, reps=2))
    linear = [r for r in records if r["op"] == "linear"]
    assert all(r["weight_copies"] == 1 for r in linear)  # smoke: no L2 to leave
    assert {r["provider"] for r in linear} == {"dense", "triton_24", "sparse24_auto"}
    assert all(r["correct"] for r in linear)
    for model in inference.SMOKE_MODELS:
        rows = [r for r in records if r["label"] == model]
        prefill_sparse = [r for r in rows if r["op"] == "prefill" and r["provider"] == "sparse24"]
        assert len(prefill_sparse) == len(inference.SMOKE_PREFILL)
        assert all(r["correct"] for r in prefill_sparse), "sparse logits differ from dense-with-zeros"
        prefill = [r for r in rows if r["op"] == "prefill"]
        assert all(r["correct"] and r["graph_vs_eager_error"] < inference.LOGITS_RTOL for r in prefill)
        # The LLaMA-shaped model runs the one-kernel RMSNorm/rotary (2 norms per layer + the final one).
        # and q/k/v (+ gate/up) as one product per layer (2 layers each).
        llama = model.startswith("llama")
        want_fused = {
            "rms_norm": 5 if llama else 0,
            "rotary": 2 if llama else 0,
            "silu_mul": 2 if llama else 0,
            "add_rms_norm": 2 if llama else 0,
            "projections": 4 if llama else 2,
        }
        assert all(r["fused_small_ops"] == want_fused for r in rows if r["op"] in ("prefill", "decode"))
        decode = [r for r in rows if r["op"] == "decode"]
        assert {(r["provider"], r["shape"][0]) for r in decode} == {
            (p, b) for p in ("dense", "sparse24") for b in inference.DECODE_BATCHES
        }
        assert all(r["tokens_per_s"] > 0 and r["speedup_vs_reference"] or r["provider"] == "dense" for r in decode)
        assert all(r["graph_token_agreement"] == 1.0 and r["correct"] is True for r in decode)
        # Recorded for the 2:4 model against the dense-with-zeros one (CPU: the same dense weights, so equal).
        assert [r["token_agreement_with_dense"] for r in decode if r["provider"] == "sparse24"] == [1.0, 1.0]


def test_random_llama_is_a_working_model():
    model = build_model("llama-smoke", torch.device("cpu"), torch.float32)
    # The rotary frequencies are real, not the uninitialized memory to_empty leaves: 1 / 10000^(2i / d).
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    want = 1.0 / 10000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    torch.testing.assert_close(model.model.rotary_emb.inv_freq, want)
    inference.prune_24_(model)
    layer = model.model.layers[0]
    pruned = layer.mlp.up_proj.weight == 0
    assert (pruned.reshape(pruned.shape[0], -1, 4).sum(dim=2) == 2).all()
    with torch.no_grad():
        logits = model(torch.randint(0, 128, (1, 8))).logits
    assert torch.isfinite(logits).all() and logits.std() > 0


def test_decode_kernels_are_classified():
    kernels = [
        ("sparse24_linear_kernel", 10.0),
        ("void gemv2T_kernel_val<int, int, __half>", 8.0),
        ("sm90_xmma_gemm_f16f16_f16f32", 6.0),
        ("fmha_cutlassF_f16_aligned_64x64_rf_sm80", 4.0),  # attention, though it names cutlass
        ("flash_fwd_splitkv_kernel", 3.0),  # attention, though it names splitk
        ("triton_rms_norm_kernel", 2.0),
        ("void at::native::elementwise_kernel<add>", 1.0),
        ("void at::native::elementwise_kernel<add>", 1.0),
    ]
    summary = inference.summarize_kernels(kernels, steps=2)
    assert summary["kernels_per_step"] == 4
    assert summary["linear_kernels_per_step"] == 1.5 and summary["linear_us_per_step"] == 12
    assert summary["attention_kernels_per_step"] == 1 and summary["attention_us_per_step"] == 3.5
    assert summary["other_kernels_per_step"] == 1.5 and summary["other_us_per_step"] == 2
    assert summary["top_other_us_per_step"][0] == ("triton_rms_norm_kernel", 1.0)


def test_decode_profile_is_printed_compactly():
    from bench.report import format_table

    profile = inference.summarize_kernels([("sparse24_linear_kernel", 30.0), ("flash_fwd", 4.0), ("add", 2.0)], 2)
    record = {"suite": "inference", "op": "decode", "provider": "sparse24", "kernel_profile": profile}
    failed, absent = {**record, "kernel_profile": {"error": "no CUPTI"}}, {**record, "kernel_profile": None}
    table = format_table([record, failed, absent])
    assert "2 kernels, linear 15 us, attention 2 us, other 1 us" in table and "profile failed" in table


def test_records_are_yielded_as_they_are_measured(monkeypatch):
    """A run cut off by a time limit keeps what it measured: the first per-Linear record comes out before any
    whole model is built, and the kernels suite hands over each shape's records before the next shape."""
    from bench import kernels

    def must_not_build(*args, **kwargs):
        raise AssertionError("the whole-model part ran before the first record was handed over")

    monkeypatch.setattr(inference, "build_model", must_not_build)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        first = next(inference.run(torch.device("cpu"), smoke=True, reps=2))
    assert first["op"] == "linear"
    shapes = iter(kernels.SMOKE_SUITE)
    monkeypatch.setattr(kernels, "_cases", lambda smoke: [next(shapes), ("never", (0, 0))])
    stream = kernels.run(torch.device("cpu"), smoke=True, reps=2)
    assert next(stream)["suite"] == "kernels"


def test_memory_bound_timings_cycle_through_weight_copies_past_l2():
    fp16 = torch.float16
    assert inference._weight_copies(1, 4096, 4096, fp16, smoke=False) == 8  # 32 MiB each: 256 MiB in all
    assert inference._weight_copies(1, 20480, 5120, fp16, smoke=False) == 2
    assert inference._weight_copies(2048, 4096, 4096, fp16, smoke=False) == 1  # compute-bound: no rotation
