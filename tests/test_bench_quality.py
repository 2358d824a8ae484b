"""The quality harness (``bench.quality``) on a tiny random Llama: one calibration set and one set of evaluation
windows for every method, records as they are measured, the measured sparsity in each, and its table."""

from __future__ import annotations

import torch

from bench import quality
from bench.records import read_jsonl
from pruning.tokenizers import byte_level_tokenizer


def _tiny_model_and_texts(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tokenizer = byte_level_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    model_dir = tmp_path / "tiny-llama"
    LlamaForCausalLM(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    eval_text, calibration_text = tmp_path / "eval.txt", tmp_path / "calib.txt"
    eval_text.write_text("The quick brown fox jumps over the lazy dog. " * 20, encoding="utf-8")
    calibration_text.write_text("Pack my box with five dozen liquor jugs. " * 20, encoding="utf-8")
    return model_dir, eval_text, calibration_text


def test_every_method_is_measured_on_the_same_ids_and_recorded(tmp_path):
    model_dir, eval_text, calibration_text = _tiny_model_and_texts(tmp_path)
    out = tmp_path / "quality.jsonl"
    todo = [("magnitude", 0.5, "unstructured"), ("wanda", 0.5, "2:4"), ("sparsegpt", 0.6, "unstructured")]

    records = quality.run(model_dir, out, nsamples=2, seqlen=32, eval_windows=3, todo=todo,
                          eval_text=eval_text, calibration_text=calibration_text)  # fmt: skip

    assert read_jsonl(out) == records
    assert [(r["method"], r["sparsity_ratio"], r["sparsity_type"]) for r in records] == [("dense", 0.0, "-"), *todo]
    assert len({(r["calibration"], r["eval_tokens"], r["eval_windows"]) for r in records}) == 1
    assert records[0]["eval_windows"] == 3 and records[0]["eval_tokens"] == 96
    for record, (_, ratio, _) in zip(records[1:], todo, strict=True):
        assert abs(record["sparsity"] - ratio) < 0.02 and record["ppl"] > 0
    table = quality.format_table(records).splitlines()
    assert table[0] == "| method | 50% | 2:4 | 4:8 | 60% | 70% |"
    assert table[2].startswith(f"| dense | {records[0]['ppl']:.2f} (0%) |")
    assert table[4] == f"| wanda |  | {records[2]['ppl']:.2f} (50.0%) |  |  |  |"


def test_the_main_table_covers_every_method_and_setting_the_issue_names():
    main = quality.configs(ablations=False)
    assert {m for m, *_ in main} == {"magnitude", "wanda", "sparsegpt"}
    assert {(r, k) for _, r, k in main} == {(0.5, "unstructured"), (0.5, "2:4"), (0.5, "4:8"), (0.6, "unstructured"),
                                             (0.7, "unstructured")}  # fmt: skip
    assert len(quality.configs(ablations=True)) == len(main) + 8


def test_the_tile_and_owl_suite_matches_the_unstructured_rows_to_the_forks_sparsity(tmp_path):
    model_dir, eval_text, calibration_text = _tiny_model_and_texts(tmp_path)
    out = tmp_path / "tiers.jsonl"
    todo = [c for c in quality.configs(False, tiers=True) if c[0] == "wanda" and c[2] != "hybrid_2_4"][:2]
    todo += [("wanda", quality.MATCHED, "unstructured", {}), ("wanda", 0.6, "unstructured", {"allocation": "owl"})]
    records = quality.run(model_dir, out, nsamples=2, seqlen=32, eval_windows=2, todo=todo,
                          eval_text=eval_text, calibration_text=calibration_text)  # fmt: skip
    fork, metric, matched, owl = records[1:]
    assert fork["label"] == "wanda three_tier fork" and fork["tiers"] == metric["tiers"]
    assert fork["sparsity"] == metric["sparsity"]  # same tier counts, same sparsity
    assert matched["sparsity_ratio"] == round(fork["sparsity"], 4)
    assert abs(matched["sparsity"] - fork["sparsity"]) < 0.02
    assert owl["label"] == "wanda owl" and len(owl["layer_sparsities"]) == 2
    assert "| wanda three_tier fork |" in quality.format_list(records)
    names = {quality.label(m, k, (o[0] if o else {})) for m, _, k, *o in quality.configs(False, tiers=True)}
    assert {"wanda three_tier fork", "wanda three_tier balanced", "sparsegpt owl", "wanda owl"} <= names


def test_the_optimizer_suite_records_each_linears_error_on_the_same_ids(tmp_path):
    model_dir, eval_text, calibration_text = _tiny_model_and_texts(tmp_path)
    suite = quality.configs(False, optimizers=True)
    assert {(m, r, k) for m, r, k, _ in suite} >= {(m, r, k) for m in ("sparsegpt", "alps", "admm")
                                                     for r, k in quality.OPTIMIZER_SETTINGS}  # fmt: skip
    todo = [c for c in suite if c[1:3] == (0.5, "2:4")]
    records = quality.run(model_dir, tmp_path / "opt.jsonl", nsamples=2, seqlen=32, eval_windows=2, todo=todo,
                          eval_text=eval_text, calibration_text=calibration_text)  # fmt: skip
    by_label = {r.get("label", r["method"]): r for r in records[1:]}
    assert set(by_label) == {"sparsegpt", "alps", "admm", "wanda +admm"}
    for record in by_label.values():
        assert record["error_kind"] == "hessian" and record["sparsity"] == 0.5
        errors = [e for layer in record["layer_errors"] for e in layer.values()]
        assert len(errors) == 2 * 7 and record["mean_error"] == sum(errors) / len(errors)
    assert by_label["alps"]["mean_error"] < by_label["sparsegpt"]["mean_error"]
