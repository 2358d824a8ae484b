"""The end-to-end pruning benchmark (bench/e2e.py) in its CPU smoke mode, its locuslab re-implementation
(bench/baselines.py) and its random-weight models (bench/fixtures/models.py)."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

import pruning
from bench import e2e
from bench.__main__ import main
from bench.baselines import locuslab_prune
from bench.fixtures import models
from bench.report import format_table

REQUIRED = {
    "suite", "op", "provider", "label", "shape", "dtype", "median_ms", "p20_ms", "p80_ms", "gbps",
    "speedup_vs_reference", "correct", "device", "torch", "triton", "git_sha", "mode", "seconds",
    "peak_gpu_memory_bytes", "actual_sparsity", "mask_diff_fraction", "model", "method", "sparsity_type",
    "warmup", "transformers", "mask_diff_layer0", "mask_diff_by_layer",
}  # fmt: skip


def _records(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_smoke_run_writes_complete_records(tmp_path, capsys):
    out = tmp_path / "e2e.jsonl"
    assert main(["e2e", "--smoke", "--out", str(out)]) == 0
    written = _records(out)
    early = [r for r in written if r.get("compared") is False]  # ours, written before the reference ran
    records = [r for r in written if r.get("compared") is not False]
    assert [(r["op"], r["seconds"]) for r in early] == [
        (r["op"], r["seconds"]) for r in records if r["provider"] == "ours"
    ]  # superseded by the complete record of the same measurement
    ops = {(r["op"], r["provider"]) for r in records}
    for op in ("prune_wanda_unstructured", "prune_wanda_2:4", "prune_sparsegpt_unstructured"):
        assert {(op, "ours"), (op, "locuslab")} <= ops
    by_key = {(r["op"], r["provider"]): r for r in records}
    for r in records:
        assert REQUIRED <= r.keys(), REQUIRED - r.keys()
        assert r["suite"] == "e2e" and r["mode"] == "smoke" and r["label"] == models.OPT_SMOKE
        assert r["shape"] == list(e2e.SMOKE_CALIBRATION)
        assert r["p20_ms"] == r["median_ms"] == r["p80_ms"] == pytest.approx(r["seconds"] * 1e3)
        assert r["seconds"] > 0 and r["peak_gpu_memory_bytes"] is None  # no GPU here
        assert abs(r["actual_sparsity"] - 0.5) < 0.01
        # Wanda: at most a near-tie flip; SparseGPT's flips move its later choices in the row (looser bound).
        assert r["mask_diff_fraction"] < e2e.MASK_TOLERANCE[r["method"]] and r["correct"] is True
        assert len(r["mask_diff_by_layer"]) == models.OPT_SMOKE_SHAPE.n_layers
        assert r["mask_diff_layer0"] == pytest.approx(r["mask_diff_by_layer"][0], rel=1e-2)
        reference = by_key[(r["op"], "locuslab")]
        assert r["speedup_vs_reference"] == pytest.approx(reference["seconds"] / r["seconds"])
    printed = capsys.readouterr().out
    assert "prune_wanda_2:4" in printed and "mask_diff_fraction" in printed


def test_without_the_reference_only_ours_is_measured(tmp_path):
    out = tmp_path / "e2e.jsonl"
    assert main(["e2e", "--smoke", "--no-reference", "--e2e-run", "opt-6.7b:wanda:2:4", "--out", str(out)]) == 0
    (record,) = _records(out)
    assert (record["provider"], record["op"], record["label"]) == ("ours", "prune_wanda_2:4", models.OPT_SMOKE)
    assert record["speedup_vs_reference"] is None and record["mask_diff_fraction"] is None
    assert record["correct"] is True  # the sparsity check alone


def test_methods_without_a_published_code_path_are_timed_alone(tmp_path):
    out = tmp_path / "e2e.jsonl"
    assert main(["e2e", "--smoke", "--e2e-run", "opt-6.7b:alps:2:4", "--out", str(out)]) == 0
    (record,) = _records(out)
    assert (record["provider"], record["op"]) == ("ours", "prune_alps_2:4")
    assert record["speedup_vs_reference"] is None and record["correct"] is True


@pytest.mark.parametrize("sparsity_type", ["unstructured", "2:4"])
def test_locuslab_reimplementation_gives_our_masks(sparsity_type):
    ids = models.calibration_ids(6, 24, models.SMOKE_VOCAB)
    ours = models.build_random_opt(models.OPT_SMOKE, torch.device("cpu"), torch.float32)
    ref = models.build_random_opt(models.OPT_SMOKE, torch.device("cpu"), torch.float32)
    pruning.prune_model(ours, ids, "wanda", 0.5, sparsity_type, calib_batch_size=4)  # batches of 4 and 2
    locuslab_prune(ref, ids, "wanda", sparsity_type)
    for lin in (lin for layer in e2e._linears_by_layer(ref) for lin in layer):  # the requested pattern
        pruned = lin.weight == 0
        if sparsity_type == "unstructured":
            assert (pruned.sum(dim=1) == lin.in_features // 2).all()
        else:
            assert (pruned.reshape(lin.out_features, -1, 4).sum(dim=2) == 2).all()
    diff = e2e.mask_diff_fraction(ref, e2e.packed_zero_masks(ours))
    assert diff < 1e-3  # fp32 batched vs per-sample sums: at most a near-tie flip


def test_mask_diff_counts_single_entries():
    model = models.build_random_opt(models.OPT_SMOKE, torch.device("cpu"), torch.float32)
    packed = e2e.packed_zero_masks(model)
    layers = e2e._linears_by_layer(model)
    per_layer = [sum(lin.weight.numel() for lin in layer) for layer in layers]
    with torch.no_grad():
        layers[-1][-1].weight[-1, -1] = 0  # the last bit of the last matrix
        layers[0][0].weight[3, 5] = 0
    counts = e2e.mask_diff_by_layer(model, packed)
    assert counts == [(1, per_layer[0]), (1, per_layer[1])]
    assert e2e.mask_diff_fraction(model, packed) == pytest.approx(2 / sum(per_layer))


def test_random_models_are_reproducible_and_tied():
    a = models.build_random_opt(models.OPT_SMOKE, torch.device("cpu"), torch.float32)
    b = models.build_random_opt(models.OPT_SMOKE, torch.device("cpu"), torch.float32)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name
    assert a.lm_head.weight is a.model.decoder.embed_tokens.weight
    q = a.model.decoder.layers[0].self_attn.q_proj
    assert abs(float(q.weight.detach().std()) - models.INIT_STD) < 0.005 and not q.bias.any()
    assert bool((a.model.decoder.layers[0].final_layer_norm.weight == 1).all())
    with torch.no_grad():
        q.weight.zero_()
    models.init_random_weights_(a)  # the reset between providers restores the same model
    assert torch.equal(q.weight, b.model.decoder.layers[0].self_attn.q_proj.weight)


def test_opt_configs_have_the_real_dims():
    config = models.opt_config("opt-6.7b")
    assert (config.hidden_size, config.ffn_dim, config.num_hidden_layers, config.num_attention_heads) == (
        4096, 16384, 32, 32,
    )  # fmt: skip
    assert (config.vocab_size, config.max_position_embeddings) == (50272, 2048)
    assert models.opt_config("opt-1.3b", n_layers=1).num_hidden_layers == 1


def test_run_specs():
    assert e2e.parse_runs("opt-6.7b:wanda:2:4") == [e2e.E2ERun("opt-6.7b", "wanda", "2:4")]
    assert e2e.parse_runs("all") == list(e2e.DEFAULT_RUNS + e2e.SPARSEGPT_RUNS)
    for bad in ("opt-6.7b:wanda", "llama-7b:wanda:2:4", "opt-6.7b:magic:2:4", "opt-6.7b:wanda:3:2"):
        with pytest.raises(argparse.ArgumentTypeError):
            e2e.parse_runs(bad)


def test_table_has_a_section_per_suite():
    kernel = {"suite": "kernels", "op": "copy", "shape": [2, 3], "median_ms": 1.0, "gbps": 5.0}
    run = {"suite": "e2e", "op": "prune_wanda_2:4", "seconds": 12.5, "peak_gpu_memory_bytes": 3 * 2**30}
    table = format_table([kernel, run])
    kernel_part, e2e_part = table.split("\n\n")
    assert "gbps" in kernel_part and "seconds" not in kernel_part
    assert "12.50" in e2e_part and "3.0 GiB" in e2e_part and "gbps" not in e2e_part


@pytest.mark.gpu
def test_gpu_run_on_real_widths_agrees_with_the_reference():
    """OPT-125M's real widths, a small calibration set: Triton backend, fp16, masks as the reference's."""
    runs = [e2e.E2ERun("opt-125m", "wanda", "unstructured"), e2e.E2ERun("opt-125m", "wanda", "2:4")]
    records = e2e.run(torch.device("cuda"), smoke=False, runs=runs, nsamples=16, seqlen=256)
    records = [r for r in records if r.get("compared") is not False]  # ours again, before the reference ran
    assert len(records) == 4
    for r in records:
        assert r["correct"] is True, r
        assert r["peak_gpu_memory_bytes"] > 0 and r["dtype"] == "float16"
    assert {r["backend"] for r in records if r["provider"] == "ours"} == {"triton"}
