"""Pruning quality on a real trained model: stories260K (llama2.c), dense vs pruned perplexity.

    python -m bench.stories_quality [--ablations] [--masks] [--optimizers] [--out FILE]

The model is Karpathy's stories260K (a 5-layer Llama trained on TinyStories), converted to a Hugging Face
LlamaForCausalLM from ../shared/data. Evaluation: the first EVAL_CHARS characters of the TinyStories text,
cut into disjoint windows of SEQLEN tokens (the published perplexity protocol). Calibration: NSAMPLES
random windows (seed 0) drawn only from the text AFTER those characters, so the two never overlap.
Runs on the CPU in about a minute; results append to bench/results/ as JSON lines.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import tempfile
import time
from pathlib import Path

import torch

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
EVAL_CHARS = 60_000
SEQLEN = 256
NSAMPLES = 128
SPARSITY_TYPES = ("unstructured", "2:4")  # not 4:8: down_proj's in_features is 172
CONFIGS = [(method, kind) for kind in SPARSITY_TYPES for method in ("magnitude", "wanda", "sparsegpt")]
# locuslab/wanda's ablations: SparseGPT's updates with the mask chosen by Wanda's or the magnitude metric
ABLATION_CONFIGS = [
    (method, kind)
    for kind in SPARSITY_TYPES
    for method in ("ablate_mag_seq", "ablate_wanda_seq", "ablate_mag_iter", "ablate_wanda_iter")
]


def mask_configs() -> list[tuple[str, str, dict]]:
    """The RIA / permutation / DSnoT suite of ``bench.quality`` (all at 50%), as (method, type, options)."""
    from bench.quality import MASK_CONFIGS

    return [(method, kind, options) for method, _ratio, kind, options in MASK_CONFIGS]


def optimizer_configs() -> list[tuple[str, str, dict, float]]:
    """ALPS and ADMM against SparseGPT (``bench.quality``'s suite), as (method, type, options, ratio)."""
    from bench.quality import OPTIMIZER_CONFIGS

    return [(method, kind, options, ratio) for method, ratio, kind, options in OPTIMIZER_CONFIGS]


def run(data_dir: Path = SHARED_DATA, configs: list[tuple] = CONFIGS) -> list[dict]:
    import pruning
    from bench.fixtures.llama2c import load_llama2c
    from bench.quality import label
    from pruning.data import get_calibration_ids, get_eval_ids
    from pruning.evaluate import perplexity

    stories = data_dir / "stories260K"
    dense, tokenizer = load_llama2c(stories / "stories260K.bin", stories / "tok512.bin")
    text = (data_dir / "tinystories" / "tinystories_val_head.txt").read_text(encoding="utf-8")
    with tempfile.TemporaryDirectory() as tmp:
        eval_path, calib_path = Path(tmp) / "eval.txt", Path(tmp) / "calib.txt"
        eval_path.write_text(text[:EVAL_CHARS], encoding="utf-8")
        calib_path.write_text(text[EVAL_CHARS:], encoding="utf-8")
        eval_ids = get_eval_ids(str(eval_path), tokenizer)
        calib_ids = get_calibration_ids(str(calib_path), tokenizer, NSAMPLES, SEQLEN, seed=0)
    common = {
        "suite": "stories_quality", "model": "stories260K", "seqlen": SEQLEN, "nsamples": NSAMPLES,
        "eval_tokens": int(eval_ids.shape[1]), "torch": torch.__version__, "device": "cpu",
        "date": dt.date.today().isoformat(),
    }  # fmt: skip
    records = [{**common, "method": "dense", "sparsity_type": "-", "sparsity": 0.0,
                "ppl": perplexity(dense, eval_ids, SEQLEN, batch_size=16, progress=False)}]  # fmt: skip
    for method, sparsity_type, *rest in configs:
        options = dict(rest[0]) if rest else {}
        ratio = rest[1] if len(rest) > 1 else 0.5
        model = copy.deepcopy(dense)
        t0 = time.perf_counter()
        report = pruning.prune_model(model, calib_ids, method, ratio, sparsity_type, backend="torch", **options)
        seconds = time.perf_counter() - t0
        ppl = perplexity(model, eval_ids, SEQLEN, batch_size=16, progress=False)
        record = {**common, "method": method, "sparsity_type": sparsity_type, "sparsity_ratio": ratio,
                  "sparsity": report.actual_sparsity, "ppl": ppl, "prune_seconds": seconds}  # fmt: skip
        errors = [e for layer in report.layers for e in layer.errors.values()]
        if errors:
            record.update(error_kind=report.layers[0].error_kind, mean_error=sum(errors) / len(errors))
        if options:
            record.update(label=label(method, sparsity_type, options), options=options)
        records.append(record)
    return records


def format_table(records: list[dict]) -> str:
    lines = ["| method | sparsity | actual sparsity | ppl |", "|---|---|---|---|"]
    for r in records:
        label = "dense" if r["method"] == "dense" else f"{r.get('sparsity_ratio', 0.5):.0%} {r['sparsity_type']}"
        lines.append(f"| {r.get('label', r['method'])} | {label} | {r['sparsity']:.4f} | {r['ppl']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.stories_quality", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="JSON-lines file (default: bench/results/)")
    parser.add_argument("--ablations", action="store_true", help="also Wanda's ablate_* methods")
    parser.add_argument("--masks", action="store_true", help="the RIA / permutation / DSnoT suite instead")
    parser.add_argument("--optimizers", action="store_true", help="ALPS and ADMM against SparseGPT instead")
    args = parser.parse_args(argv)
    if not (SHARED_DATA / "stories260K").is_dir():
        print(f"stories260K not found under {SHARED_DATA}; nothing to measure")
        return 2
    configs = mask_configs() if args.masks else CONFIGS + (ABLATION_CONFIGS if args.ablations else [])
    if args.optimizers:
        configs = optimizer_configs()
    records = run(configs=configs)
    out = (
        args.out or Path(__file__).resolve().parent / "results" / f"{dt.date.today().isoformat()}_stories260k-cpu.jsonl"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, sort_keys=True) + "\n")
    print(format_table(records))
    print(f"\n{len(records)} records appended to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
