"""Command line: ``wanda-prune`` / ``python -m pruning``, with locuslab/wanda's flags.

    wanda-prune --model facebook/opt-125m --prune_method wanda --sparsity_ratio 0.5 --sparsity_type 2:4 --save out/
    wanda-prune check MODEL      # before a long job: load, show layers and shapes, generate, validate weights
    wanda-prune demo             # the embedded default: no network, a tiny random OPT (also: no arguments)

Errors in the input (a bad flag value, a missing model, an unwritable directory, offline data) print one
line, ``error: ...``, and exit with status 2; set WANDA_DEBUG=1 for the traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

import torch

from pruning.config import BACKENDS, METHODS, PruneConfig

log = logging.getLogger("pruning")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="wanda-prune",
        description="Prune a Hugging Face causal LM with Wanda, SparseGPT or magnitude (locuslab/wanda's flags).",
        epilog="Subcommands: 'wanda-prune check MODEL' and 'wanda-prune demo'.",
    )
    # locuslab/wanda main.py / main_opt.py flags, same meanings and defaults
    p.add_argument("--model", required=True, help="HF model id or local directory")
    p.add_argument("--seed", type=int, default=0, help="seed for sampling the calibration data")
    p.add_argument("--nsamples", type=int, default=128, help="number of calibration samples")
    p.add_argument("--sparsity_ratio", type=float, default=0.0, help="fraction of weights to prune")
    p.add_argument("--sparsity_type", default="unstructured", help="unstructured, or N:M such as 2:4 or 4:8")
    p.add_argument("--prune_method", choices=METHODS, required=True)
    p.add_argument("--cache_dir", default="llm_weights", help="Hugging Face cache directory")
    p.add_argument("--use_variant", action="store_true", help="Wanda's per-row cumulative-alpha variant")
    p.add_argument("--save", default=None, help="directory for log_{method}.txt and metrics.json")
    p.add_argument("--save_model", default=None, help="directory to save the pruned model and tokenizer")
    p.add_argument("--eval_zero_shot", action="store_true", help="lm-eval zero-shot tasks (needs .[eval])")
    # added
    p.add_argument("--device_map", default=None, help="accelerate device map, e.g. 'auto' for several GPUs")
    p.add_argument("--offload", action="store_true", help="keep the model in CPU RAM, stream layers to the GPU")
    p.add_argument("--seqlen", type=int, default=None, help="calibration/eval length (default: model max, <= 4096)")
    p.add_argument("--calib_dataset", default="c4", help="c4, wikitext2, or a local text file/directory")
    p.add_argument("--eval_dataset", default="wikitext2", help="wikitext2, c4, a local text file, or 'none'")
    p.add_argument("--backend", choices=BACKENDS, default="auto", help="mask kernels: triton (GPU) or torch")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --save_model directory")
    p.add_argument("--true_sequential", action="store_true", help="statistics after earlier sublayers are pruned")
    p.add_argument("--calib_batch_size", type=int, default=None, help="samples per forward (default: from memory)")
    p.add_argument("--eval_batch_size", type=int, default=1)
    p.add_argument("--eval_dense", action="store_true", help="also measure the dense model's perplexity first")
    p.add_argument("--dtype", choices=["auto", "float16", "bfloat16", "float32"], default="auto")
    return p


def validate_args(args: argparse.Namespace) -> PruneConfig:
    """Everything checkable before a weight is loaded; returns the pruning config."""
    if args.nsamples <= 0:
        raise ValueError(f"--nsamples must be positive, got {args.nsamples}")
    if args.seqlen is not None and args.seqlen < 2:
        raise ValueError(f"--seqlen must be at least 2, got {args.seqlen}")
    config = PruneConfig(
        method=args.prune_method,
        sparsity_ratio=args.sparsity_ratio,
        sparsity_type=args.sparsity_type,
        use_variant=args.use_variant,
        true_sequential=args.true_sequential,
        backend=args.backend,
        calib_batch_size=args.calib_batch_size,
        offload=args.offload,
    )
    if args.save:
        from pruning.outputs import check_save_dir

        check_save_dir(args.save)
    if args.save_model:
        from pruning.outputs import check_save_model_dir

        check_save_model_dir(args.save_model, args.overwrite)
    return config


def resolve_seqlen(requested: int | None, model_config) -> int:
    max_positions = getattr(model_config, "max_position_embeddings", None) or 2048
    if requested is None:
        # The reference uses max_position_embeddings uncapped: 131072 for Llama-3, a 128 GiB allocation.
        return min(max_positions, 4096)
    if requested > max_positions:
        raise ValueError(f"--seqlen {requested} exceeds the model's max_position_embeddings ({max_positions})")
    return requested


def evaluate_ppl(model, tokenizer, args, seqlen: int) -> float | None:
    if args.eval_dataset.lower() == "none":
        return None
    from pruning.adapters import get_adapter
    from pruning.data import get_eval_ids
    from pruning.evaluate import perplexity
    from pruning.layerwise import layerwise_perplexity, module_device

    ids = get_eval_ids(args.eval_dataset, tokenizer, cache_dir=args.cache_dir, seqlen=seqlen)
    adapter = get_adapter(model)
    if module_device(adapter.layers(model)[0]).type == "cpu" and torch.cuda.is_available():
        return layerwise_perplexity(model, adapter, ids, seqlen, args.eval_batch_size)
    return perplexity(model, ids, seqlen, batch_size=args.eval_batch_size)


def run_prune(args: argparse.Namespace) -> dict:
    from pruning.data import get_calibration_ids
    from pruning.driver import prune_model
    from pruning.loading import load_config, load_model, load_tokenizer
    from pruning.outputs import save_model_atomically, versions, write_metrics, write_wanda_log
    from pruning.sparsity import check_sparsity

    started = time.perf_counter()
    config = validate_args(args)
    model_config = load_config(args.model, args.cache_dir)
    seqlen = resolve_seqlen(args.seqlen, model_config)
    tokenizer = load_tokenizer(args.model, args.cache_dir)
    calibration_ids = None
    if config.method != "magnitude" and config.sparsity_ratio > 0:
        calibration_ids = get_calibration_ids(
            args.calib_dataset, tokenizer, args.nsamples, seqlen, seed=args.seed, cache_dir=args.cache_dir
        )
    torch.manual_seed(args.seed)
    model = load_model(args.model, args.cache_dir, args.dtype, args.device_map, args.offload)
    log.info("loaded %s (%s) in %.1f s", args.model, model_config.model_type, time.perf_counter() - started)

    metrics: dict = {"config": {k: v for k, v in vars(args).items() if k != "func"}, "versions": versions()}
    if args.eval_dense:
        metrics["ppl_dense"] = evaluate_ppl(model, tokenizer, args, seqlen)
        log.info("dense perplexity: %s", metrics["ppl_dense"])
    report = prune_model(model, calibration_ids, **{k: getattr(config, k) for k in vars(config)})
    metrics["prune"] = report.to_dict()
    print("*" * 30)
    sparsity = check_sparsity(model)
    print(f"sparsity sanity check {sparsity:.4f}")
    print("*" * 30)
    metrics["actual_sparsity"] = sparsity
    metrics["ppl_test"] = evaluate_ppl(model, tokenizer, args, seqlen)
    print(
        f"wikitext perplexity {metrics['ppl_test']}"
        if args.eval_dataset == "wikitext2"
        else f"{args.eval_dataset} perplexity {metrics['ppl_test']}"
    )
    if args.eval_zero_shot:
        from pruning.evaluate import zero_shot

        metrics["zero_shot"] = zero_shot(model, tokenizer)
        print(f"zero-shot: {metrics['zero_shot']}")
    metrics["total_seconds"] = time.perf_counter() - started
    if args.save:
        save_dir = Path(args.save).expanduser()
        write_wanda_log(save_dir, config.method, sparsity, metrics["ppl_test"])
        write_metrics(save_dir, metrics)
        log.info("wrote %s", save_dir)
    if args.save_model:
        target = save_model_atomically(model, tokenizer, Path(args.save_model).expanduser(), args.overwrite)
        log.info("saved the pruned model to %s", target)
    return metrics


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        if not argv or argv[0] == "demo":
            from pruning.demo import run_demo

            return run_demo(argv[1:])
        if argv[0] == "check":
            from pruning.check import run_check

            return run_check(argv[1:])
        run_prune(build_parser().parse_args(argv))
        return 0
    except (ValueError, OSError) as err:
        if os.environ.get("WANDA_DEBUG"):
            raise
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        print(f"error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
