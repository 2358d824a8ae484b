"""The embedded default: a real end-to-end run with no network.

A small OPT is built from ``assets/tiny-opt-config.json`` with random weights, saved with a byte-level
tokenizer built in code, then loaded back through the same ``from_pretrained`` path as a real model,
calibrated on ``assets/demo_calibration.txt`` and evaluated on ``assets/demo_eval.txt`` (disjoint texts).
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import torch

ASSETS = Path(__file__).resolve().parent / "assets"
RUNS = [("wanda", "unstructured"), ("wanda", "2:4"), ("magnitude", "unstructured"), ("sparsegpt", "unstructured")]

log = logging.getLogger(__name__)


def build_tiny_opt(directory: Path, seed: int = 0) -> Path:
    from transformers import OPTConfig, OPTForCausalLM

    from pruning.tokenizers import byte_level_tokenizer

    torch.manual_seed(seed)
    model = OPTForCausalLM(OPTConfig.from_json_file(ASSETS / "tiny-opt-config.json"))
    model.save_pretrained(directory)
    byte_level_tokenizer().save_pretrained(directory)
    return directory


def run_demo(argv: list[str]) -> int:
    from pruning.cli import build_parser, run_prune

    if argv:
        raise ValueError(f"'wanda-prune demo' takes no arguments, got {' '.join(argv)}")
    print("Demo: a tiny random-weight OPT (4 layers, hidden 128), built offline. With random weights the")
    print("perplexities below show that the pipeline runs end to end, NOT model quality.\n")
    rows = []
    with tempfile.TemporaryDirectory(prefix="wanda-demo-") as tmp:
        model_dir = build_tiny_opt(Path(tmp) / "tiny-opt")
        for i, (method, sparsity_type) in enumerate(RUNS):
            print(f"\n=== {method} {sparsity_type} 50% ===")
            args = build_parser().parse_args(
                [
                    "--model", str(model_dir), "--prune_method", method, "--sparsity_ratio", "0.5",
                    "--sparsity_type", sparsity_type, "--nsamples", "16", "--seqlen", "128",
                    "--calib_dataset", str(ASSETS / "demo_calibration.txt"),
                    "--eval_dataset", str(ASSETS / "demo_eval.txt"), "--cache_dir", str(Path(tmp) / "cache"),
                    *(["--eval_dense"] if i == 0 else []),
                ]
            )  # fmt: skip
            metrics = run_prune(args)
            if i == 0:
                dense_ppl = metrics["ppl_dense"]
            rows.append(
                (method, sparsity_type, metrics["actual_sparsity"], metrics["ppl_test"], metrics["prune"]["seconds"])
            )
    print("\nSummary (random weights: pipeline check, not quality)")
    print(f"{'method':10s} {'type':13s} {'sparsity':>8s} {'dense ppl':>10s} {'pruned ppl':>10s} {'prune s':>8s}")
    for method, sparsity_type, sparsity, ppl, seconds in rows:
        print(f"{method:10s} {sparsity_type:13s} {sparsity:8.4f} {dense_ppl:10.2f} {ppl:10.2f} {seconds:8.2f}")
    return 0
