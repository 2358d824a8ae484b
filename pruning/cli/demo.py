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

ASSETS = Path(__file__).resolve().parents[1] / "assets"
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
    from pruning.cli.parser import build_parser
    from pruning.cli.prune import run_prune

    if argv in (["-h"], ["--help"]):
        print("usage: wanda-prune demo\n\nPrune a tiny random-weight OPT built offline with every method, end to end "
              "(no arguments, no network).")  # fmt: skip
        return 0
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
                    # the 2:4 run also exports the compressed checkpoint, loaded back below
                    *(["--save_model", str(Path(tmp) / "opt-24"), "--save_format", "sparse24"] if i == 1 else []),
                ]
            )  # fmt: skip
            metrics = run_prune(args)
            if i == 0:
                dense_ppl = metrics["ppl_dense"]
            rows.append(
                (method, sparsity_type, metrics["actual_sparsity"], metrics["ppl_test"], metrics["prune"]["seconds"])
            )
        export = _check_sparse24_export(model_dir, Path(tmp) / "opt-24")
    print("\nSummary (random weights: pipeline check, not quality)")
    print(f"{'method':10s} {'type':13s} {'sparsity':>8s} {'dense ppl':>10s} {'pruned ppl':>10s} {'prune s':>8s}")
    for method, sparsity_type, sparsity, ppl, seconds in rows:
        print(f"{method:10s} {sparsity_type:13s} {sparsity:8.4f} {dense_ppl:10.2f} {ppl:10.2f} {seconds:8.2f}")
    print(export)
    return 0


def _check_sparse24_export(model_dir: Path, sparse_dir: Path) -> str:
    """Load the 2:4-compressed checkpoint back and compare it with the pruned dense weights it came from."""
    import warnings

    from safetensors import safe_open

    from pruning.sparse24 import load_sparse

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Sparse24Linear's "dense weight on CPU" notice
        model = load_sparse(sparse_dir)
        modules = model.config.sparsity_config["modules"]
        dense_bytes = packed_bytes = 0
        with safe_open(str(sparse_dir / "model.safetensors"), "pt") as f:
            for name in modules:
                values, meta = f.get_tensor(f"{name}.values"), f.get_tensor(f"{name}.meta")
                packed_bytes += values.numel() * values.element_size() + meta.numel()
                dense_bytes += 2 * values.numel() * values.element_size()
        zeros = all((model.get_submodule(n).to_dense().reshape(-1, 4) == 0).sum(dim=1).eq(2).all() for n in modules)
        tokens = torch.randint(4, 260, (1, 32), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            logits_ok = bool(torch.isfinite(model(tokens).logits).all())
    return (
        f"\n2:4 export: {len(modules)} Linears stored compressed, {packed_bytes / dense_bytes:.4f}x their dense "
        f"bytes; exactly 2 zeros per group of 4: {zeros}; reloaded with pruning.load_sparse and ran: {logits_ok}"
    )
