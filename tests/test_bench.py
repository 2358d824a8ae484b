"""The benchmark harness in its CPU smoke mode: it runs, records what it promises, and checks masks."""

from __future__ import annotations

import json

import pytest

from bench.__main__ import main
from bench.baselines import locuslab_prune_, vectorized_prune_
from bench.report import format_table
from wanda_kernels import reference as ref

REQUIRED = {
    "suite", "op", "provider", "shape", "dtype", "median_ms", "p20_ms", "p80_ms", "gbps",
    "speedup_vs_reference", "correct", "device", "torch", "triton", "git_sha", "mode",
}  # fmt: skip


def test_smoke_run_writes_complete_records(tmp_path, capsys):
    out = tmp_path / "smoke.jsonl"
    assert main(["kernels", "--smoke", "--out", str(out)]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert records, "no records written"
    for r in records:
        assert REQUIRED <= r.keys(), REQUIRED - r.keys()
        assert r["p20_ms"] <= r["median_ms"] <= r["p80_ms"]
        assert r["correct"] in (True, None)
    assert all(r["correct"] is True for r in records if r["provider"] == "ours")  # every one of ours is checked
    providers = {(r["op"], r["provider"]) for r in records}
    expected = {("wanda_prune_2:4", "ours"), ("wanda_prune_2:4", "locuslab"), ("wanda_prune_unstructured", "ours")}
    expected |= {("three_tier", "ours"), ("three_tier", "reference"), ("three_tier", "fork_loop")}
    expected |= {(op, p) for op in ("ria_scores", "dsnot_unstructured", "dsnot_2:4", "accumulate_moments")
                 for p in ("ours", "reference", "published")}  # fmt: skip
    assert expected <= providers
    fork = [r for r in records if r["provider"] == "fork_loop"]
    # One shape only. Its mismatches are fp16 ties, which the fork's unstable topk breaks either way.
    assert len(fork) == 1 and 0 <= fork[0]["mask_mismatches"] < 0.01 * fork[0]["shape"][0] * fork[0]["shape"][1]
    assert "wanda_prune_2:4" in capsys.readouterr().out  # the table is printed


def test_unknown_suite_is_a_clear_error(capsys):
    with pytest.raises(SystemExit):
        main(["nonsense"])
    assert "unknown suite" in capsys.readouterr().err


@pytest.mark.parametrize("sparsity,n,m", [(0.5, 0, 0), (0.5, 2, 4)])
def test_reference_providers_agree_with_the_spec(sparsity, n, m):
    import torch

    w = torch.randn(8, 32)
    a = torch.rand(32)
    expected = ref.wanda_prune_torch(w.clone(), a, sparsity, n, m)
    assert torch.equal(locuslab_prune_(w.clone(), a, sparsity, n, m), expected)
    assert torch.equal(vectorized_prune_(w.clone(), a, sparsity, n, m), expected)


def test_table_formats_missing_values():
    table = format_table([{"op": "x", "shape": [2, 3], "median_ms": 1.0}])
    assert "2x3" in table and "| -" in table


def test_fused_shapes_stack_their_parts():
    from bench.shapes import MODELS, linear_shape

    for name, shape in MODELS.items():
        parts = shape.linears()
        out, inp = linear_shape(name, "qkv_proj")
        assert inp == shape.hidden and out == sum(parts[p][0] for p in ("q_proj", "k_proj", "v_proj"))
        if shape.gated:
            assert linear_shape(name, "gate_up_proj") == (parts["gate_proj"][0] + parts["up_proj"][0], shape.hidden)
    assert linear_shape("llama-2-70b", "qkv_proj") == (8192 + 2 * 1024, 8192)  # grouped-query k/v


def test_decode_ops_counts_each_of_our_kernels_once():
    """The README's operations-per-layer table: each Triton kernel is one operation, none of the torch calls the
    interpreter makes inside it (the decoder picks its cache-write kernel when it is built)."""
    from bench.decode_ops import layer_ops

    ops, outside = layer_ops("llama", small_ops=True, projections=True)
    assert ops.count("triton:write_kv_cache_") == 1 and ops.count("triton:add_rms_norm") == 1
    assert not {"new_empty", "set_", "empty"} & set(ops), ops  # the interpreter's own tensor handling
    linears = sum(name in ("mm", "addmm") for name in ops)
    assert linears == 4 and len(ops) <= 13, ops  # q/k/v, o, gate/up, down; 7 other kernels (+2 repeat_kv in 5.17)
    assert 0 < outside <= 16


def test_one_record_builder_for_every_suite():
    import torch

    from bench.records import once, record

    r = record("kernels", "copy", "copy", "x", (2, 3), torch.float16, timing=once(2.0, 1), correct=True,
               reference_ms=4.0, nbytes=2_000_000, copy_ms=1.0, weight_copies=1)  # fmt: skip
    assert (r["shape"], r["dtype"], r["p20_ms"], r["reps"], r["weight_copies"]) == ([2, 3], "float16", 2.0, 1, 1)
    assert r["speedup_vs_reference"] == 2.0 and r["x_copy"] == 2.0 and r["gbps"] == pytest.approx(1.0)
    failed = record("inference", "model", "dense", "m", (), torch.float32, timing=once(None, 0), correct=False)
    assert failed["median_ms"] is None and failed["gbps"] is failed["x_copy"] is failed["speedup_vs_reference"] is None
