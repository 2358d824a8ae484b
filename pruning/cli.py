"""Command line: ``wanda-prune`` / ``python -m pruning``, with locuslab/wanda's flags.

    wanda-prune --model facebook/opt-125m --prune_method wanda --sparsity_ratio 0.5 --sparsity_type 2:4 --save out/
    wanda-prune check MODEL      # before a long job: load, show layers and shapes, generate, validate weights
    wanda-prune demo             # the embedded default: no network, a tiny random OPT (also: no arguments)

Errors in the input (a bad flag value, a missing model, an unwritable directory, offline data) print one
line, ``error: ...``, and exit with status 2; set WANDA_DEBUG=1 for the traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import torch

from pruning.config import BACKENDS, METHODS, PruneConfig

log = logging.getLogger("pruning")


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the CLI's error contract: one line, ``error: ...``, exit status 2 (no usage block)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
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
    p.add_argument("--save", default=None, help="directory for log_{method}.txt and a metrics_*.json per run")
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
    p.add_argument(
        "--save_format",
        choices=["dense", "sparse24"],
        default="dense",
        help="--save_model format: dense (from_pretrained) or sparse24 (2:4 compressed; pruning.load_sparse)",
    )
    p.add_argument("--true_sequential", action="store_true", help="statistics after earlier sublayers are pruned")
    p.add_argument("--calib_batch_size", type=int, default=None, help="samples per forward (default: from memory)")
    p.add_argument("--eval_batch_size", type=int, default=1, help="perplexity windows / zero-shot requests per forward")
    p.add_argument("--eval_dense", action="store_true", help="also measure the dense model's perplexity first")
    p.add_argument("--dtype", choices=["auto", "float16", "bfloat16", "float32"], default="auto")
    p.add_argument(
        "--zero_shot_tasks",
        default="boolq,rte,hellaswag,winogrande,arc_easy,arc_challenge,openbookqa",
        help="comma-separated lm-eval tasks for --eval_zero_shot (default: Wanda's seven)",
    )
    p.add_argument("--zero_shot_include_path", default=None, help="directory of extra lm-eval task YAMLs (offline)")
    return p


def _data_source(source: str) -> str:
    """A hub dataset name as is; a local path with ``~`` expanded."""
    from pruning.data import HUB_SOURCES

    return source if source in HUB_SOURCES else os.path.expanduser(source)


def _check_data_source(flag: str, source: str) -> None:
    from pruning.data import HUB_SOURCES

    if source in HUB_SOURCES or Path(source).exists():
        return
    raise ValueError(
        f"{flag} {source!r}: no such file or directory; use {' or '.join(HUB_SOURCES)}, "
        "or a local text/.json/.jsonl file or a directory of them"
    )


def _same_or_inside(path: Path, directory: Path) -> bool:
    path, directory = path.resolve(), directory.resolve()
    return path == directory or directory in path.parents


def _check_output_paths(args: argparse.Namespace) -> None:
    """--save_model replaces its directory (with --overwrite): never the model itself, nor --save's files."""
    if not args.save_model:
        return
    save_model = Path(args.save_model).expanduser()
    model_dir = Path(args.model).expanduser()
    if model_dir.exists() and _same_or_inside(model_dir, save_model):
        raise ValueError(
            f"--save_model {args.save_model!r} would replace the model being pruned ({args.model!r}); "
            "choose another directory"
        )
    if args.save and _same_or_inside(Path(args.save).expanduser(), save_model):
        raise ValueError(
            f"--save {args.save!r} is inside --save_model {args.save_model!r}, which the saved model replaces; "
            "use separate directories"
        )
    for flag, source in (("--calib_dataset", args.calib_dataset), ("--eval_dataset", args.eval_dataset)):
        path = Path(_data_source(source))
        if path.exists() and _same_or_inside(path, save_model):
            raise ValueError(
                f"{flag} {source!r} is inside --save_model {args.save_model!r}, which the saved model replaces; "
                "keep the data elsewhere"
            )


def validate_args(args: argparse.Namespace) -> PruneConfig:
    """Everything checkable before a weight is loaded; returns the pruning config.

    Runs first so that a mistake costs seconds, not a pruning job: flag values, optional dependencies
    (lm-eval for --eval_zero_shot), local data paths, and output directories (created and write-tested).
    """
    if not 0.0 <= args.sparsity_ratio < 1.0:
        raise ValueError(
            f"--sparsity_ratio must be in [0, 1), e.g. 0.5 to prune half the weights; got {args.sparsity_ratio}"
        )
    if args.nsamples <= 0:
        raise ValueError(
            f"--nsamples must be a positive number of calibration samples (Wanda uses 128), got {args.nsamples}"
        )
    if args.seqlen is not None and args.seqlen < 2:
        raise ValueError(f"--seqlen must be at least 2 tokens (or left out for the model's maximum), got {args.seqlen}")
    for flag, value in (("--save", args.save), ("--save_model", args.save_model)):
        if value is not None and not value.strip():
            raise ValueError(f"{flag} needs a directory, got an empty string (leave the flag out to skip it)")
    if args.eval_dense and args.eval_dataset.lower() == "none":
        raise ValueError("--eval_dense measures perplexity on --eval_dataset, which is 'none'; drop one of the two")
    if args.eval_batch_size <= 0:
        raise ValueError(f"--eval_batch_size must be positive, got {args.eval_batch_size}")
    if args.calib_batch_size is not None and args.calib_batch_size <= 0:
        raise ValueError(
            f"--calib_batch_size must be positive (or left out to size it from memory), got {args.calib_batch_size}"
        )
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
    if args.backend == "triton" and not torch.cuda.is_available():
        from wanda_kernels._runtime import interpreting

        if not interpreting():
            raise ValueError("--backend triton needs a CUDA GPU (or TRITON_INTERPRET=1 on CPU); use --backend torch")
    if args.eval_zero_shot:
        try:
            import lm_eval  # noqa: F401
        except ImportError:
            raise ValueError(
                "--eval_zero_shot needs lm-eval, which is not installed: pip install -e '.[eval]' "
                "(or run without --eval_zero_shot)"
            ) from None
        _check_zero_shot_tasks(args.zero_shot_tasks, args.zero_shot_include_path)
    if needs_calibration(config):
        _check_data_source("--calib_dataset", _data_source(args.calib_dataset))
    if args.eval_dataset.lower() != "none":
        _check_data_source("--eval_dataset", _data_source(args.eval_dataset))
    if args.save_format == "sparse24" and (args.sparsity_type != "2:4" or not args.save_model):
        raise ValueError(
            "--save_format sparse24 stores 2:4 weights: use it with --sparsity_type 2:4 --sparsity_ratio 0.5 "
            "and --save_model DIR"
        )
    _check_output_paths(args)
    if args.save:
        from pruning.outputs import check_save_dir

        check_save_dir(args.save)
    if args.save_model:
        from pruning.outputs import check_save_model_dir

        check_save_model_dir(args.save_model, args.overwrite)
    return config


def _check_zero_shot_tasks(tasks: str, include_path: str | None) -> None:
    """Resolve the task names now (lm-eval indexes its task YAMLs in a few seconds), not after the pruning."""
    if include_path and not Path(include_path).expanduser().is_dir():
        raise ValueError(f"--zero_shot_include_path {include_path!r}: no such directory of lm-eval task YAMLs")
    names = [t.strip() for t in tasks.split(",") if t.strip()]
    if not names:
        raise ValueError("--zero_shot_tasks is empty; name lm-eval tasks such as boolq,rte")
    from pruning.evaluate import unknown_zero_shot_tasks

    unknown = unknown_zero_shot_tasks(names, include_path)
    if unknown:
        raise ValueError(
            f"--zero_shot_tasks: lm-eval knows no task {', '.join(map(repr, unknown))}; check the names "
            "(`lm-eval ls tasks`) or add their YAMLs with --zero_shot_include_path"
        )


def needs_calibration(config: PruneConfig) -> bool:
    return config.method != "magnitude" and config.sparsity_ratio > 0


def resolve_seqlen(requested: int | None, model_config) -> int:
    max_positions = getattr(model_config, "max_position_embeddings", None) or 2048
    if requested is None:
        # The reference uses max_position_embeddings uncapped: 131072 for Llama-3, a 128 GiB allocation.
        return min(max_positions, 4096)
    if requested > max_positions:
        raise ValueError(
            f"--seqlen {requested} exceeds the model's max_position_embeddings ({max_positions}); "
            f"use --seqlen {max_positions} or less"
        )
    return requested


def load_eval_ids(args: argparse.Namespace, tokenizer, seqlen: int) -> torch.Tensor | None:
    """The evaluation tokens, loaded before pruning so that missing data cannot fail the job at its end."""
    if args.eval_dataset.lower() == "none":
        return None
    from pruning.data import DataError, get_eval_ids

    source = _data_source(args.eval_dataset)
    try:
        ids = get_eval_ids(source, tokenizer, cache_dir=args.cache_dir, seqlen=seqlen)
    except DataError as err:
        raise ValueError(f"--eval_dataset: {err}") from None
    if ids.shape[1] < seqlen:
        raise ValueError(
            f"--eval_dataset {args.eval_dataset!r} has only {ids.shape[1]} tokens, fewer than --seqlen {seqlen}; "
            "use a longer text or a smaller --seqlen"
        )
    return ids


def evaluate_ppl(model, ids: torch.Tensor | None, args: argparse.Namespace, seqlen: int) -> float | None:
    if ids is None:
        return None
    from pruning.adapters import get_adapter
    from pruning.evaluate import perplexity
    from pruning.layerwise import layerwise_perplexity

    adapter = get_adapter(model)
    if _streamed_from_cpu(model, adapter):
        return layerwise_perplexity(model, adapter, ids, seqlen, args.eval_batch_size)
    return perplexity(model, ids, seqlen, batch_size=args.eval_batch_size)


def _streamed_from_cpu(model, adapter) -> bool:
    """The model sits in CPU RAM (--offload) and a GPU is there to run it one decoder layer at a time."""
    from pruning.layerwise import module_device

    return module_device(adapter.layers(model)[0]).type == "cpu" and torch.cuda.is_available()


def evaluate_zero_shot(model, tokenizer, args: argparse.Namespace) -> dict:
    """lm-eval on the in-memory model; a model in CPU RAM runs on the GPU with its layers streamed through it."""
    from pruning.adapters import get_adapter
    from pruning.evaluate import zero_shot
    from pruning.layerwise import compute_device_for, layers_streamed_through

    adapter = get_adapter(model)
    placement = contextlib.nullcontext()
    if _streamed_from_cpu(model, adapter):
        placement = layers_streamed_through(model, adapter, compute_device_for(adapter.layers(model)[0]))
    tasks = [t.strip() for t in args.zero_shot_tasks.split(",") if t.strip()]
    with placement:
        return zero_shot(
            model, tokenizer, tasks, batch_size=args.eval_batch_size, include_path=args.zero_shot_include_path
        )


def run_prune(args: argparse.Namespace) -> dict:
    """Validate, load, prune, save the model (--save_model), evaluate, write --save, then the optional
    zero-shot step."""
    from pruning.data import DataError, get_calibration_ids
    from pruning.driver import prune_model
    from pruning.loading import load_config, load_model, load_tokenizer
    from pruning.outputs import metrics_path, save_model_atomically, versions, write_metrics, write_wanda_log
    from pruning.sparsity import check_sparsity

    started = time.perf_counter()
    config = validate_args(args)
    model_config = load_config(args.model, args.cache_dir)
    if config.sparsity_ratio > 0:  # pruning runs layer by layer, each layer with layer 0's attention mask
        from pruning.adapters import check_one_mask_for_every_layer

        check_one_mask_for_every_layer(model_config)
    seqlen = resolve_seqlen(args.seqlen, model_config)
    tokenizer = load_tokenizer(args.model, args.cache_dir)
    calibration_ids = None
    if needs_calibration(config):
        try:
            calibration_ids = get_calibration_ids(
                _data_source(args.calib_dataset),
                tokenizer,
                args.nsamples,
                seqlen,
                seed=args.seed,
                cache_dir=args.cache_dir,
            )
        except DataError as err:
            raise ValueError(f"--calib_dataset: {err}") from None
    eval_ids = load_eval_ids(args, tokenizer, seqlen)
    torch.manual_seed(args.seed)
    streamed = bool(args.offload or args.device_map)
    with _out_of_memory_as_error("loading the model", "loading", streamed):
        model = load_model(args.model, args.cache_dir, args.dtype, args.device_map, args.offload)
    log.info("loaded %s (%s) in %.1f s", args.model, model_config.model_type, time.perf_counter() - started)
    from pruning.adapters import get_adapter
    from pruning.layerwise import check_layers_placeable

    if config.sparsity_ratio > 0:  # right after loading, not halfway through pruning
        check_layers_placeable(get_adapter(model).layers(model))
    streamed = streamed or _streamed_from_cpu(model, get_adapter(model))  # also when the model did not fit
    if args.save_format == "sparse24":
        from pruning.sparse24 import check_packable

        check_packable(model)  # before the long job, not at the very end

    metrics: dict = {"config": {k: v for k, v in vars(args).items() if k != "func"}, "versions": versions()}
    if args.eval_dense:
        with _out_of_memory_as_error("evaluating the dense model", "evaluating", streamed):
            metrics["ppl_dense"] = evaluate_ppl(model, eval_ids, args, seqlen)
        log.info("dense perplexity: %s", metrics["ppl_dense"])
    with _out_of_memory_as_error("pruning", "pruning", streamed):
        report = prune_model(model, calibration_ids, **{k: getattr(config, k) for k in vars(config)})
    metrics["prune"] = report.to_dict()
    print("*" * 30)
    sparsity = check_sparsity(model)
    print(f"sparsity sanity check {sparsity:.4f}")
    print("*" * 30)
    metrics["actual_sparsity"] = sparsity
    # The pruned model is saved first: it is the costly result, and evaluation can still fail (memory, data).
    kept = []
    if args.save_model:
        target = save_model_atomically(
            model, tokenizer, Path(args.save_model).expanduser(), args.overwrite, args.save_format
        )
        log.info("saved the pruned model to %s", target)
        kept.append(str(target))
    with _out_of_memory_as_error("evaluating perplexity", "evaluating", streamed, kept):
        metrics["ppl_test"] = evaluate_ppl(model, eval_ids, args, seqlen)
    if eval_ids is not None:
        name = "wikitext" if args.eval_dataset == "wikitext2" else args.eval_dataset
        print(f"{name} perplexity {metrics['ppl_test']}")
    metrics["total_seconds"] = time.perf_counter() - started
    # Results are written before zero-shot evaluation (slow, and it downloads task data): it cannot lose them.
    save_dir = Path(args.save).expanduser() if args.save else None
    if save_dir:
        write_wanda_log(save_dir, config.method, sparsity, metrics["ppl_test"])
        metrics_file = write_metrics(metrics_path(save_dir, config.method, config.sparsity_type), metrics)
        log.info("wrote %s and %s", save_dir / f"log_{config.method}.txt", metrics_file)
        kept.insert(0, str(metrics_file))
    if args.eval_zero_shot:
        try:
            metrics["zero_shot"] = evaluate_zero_shot(model, tokenizer, args)
        except Exception as err:
            saved = f"; the pruning results are saved in {', '.join(kept)}" if kept else ""
            raise ValueError(f"zero-shot evaluation failed ({type(err).__name__}: {_first_line(err)}){saved}") from err
        print(f"zero-shot: {metrics['zero_shot']}")
        metrics["total_seconds"] = time.perf_counter() - started
        if save_dir:
            write_metrics(metrics_file, metrics)
    return metrics


@contextlib.contextmanager
def _out_of_memory_as_error(what: str, stage: str, streamed: bool, kept: list[str] = ()) -> Iterator[None]:
    """A GPU out-of-memory error that smaller batches did not cure becomes one line with the flags to change
    (``pruning.oom.out_of_memory_advice``) and where the results already written are."""
    from pruning.oom import out_of_memory_advice

    try:
        yield
    except torch.OutOfMemoryError as err:
        saved = f"; the pruned model is saved in {', '.join(kept)}" if kept else ""
        raise ValueError(f"GPU out of memory while {what}: {out_of_memory_advice(stage, streamed)}{saved}") from err


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


class Terminated(KeyboardInterrupt):
    """SIGTERM (a batch scheduler's time limit, ``timeout``, ``kill``), raised like Ctrl-C so that the same
    clean-up runs: a model being saved is removed from its staging directory, not left half-written."""


def _raise_terminated(_signum, _frame) -> NoReturn:
    raise Terminated


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    in_main_thread = threading.current_thread() is threading.main_thread()  # signal handlers live there only
    if in_main_thread:
        previous_sigterm = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        return _main(argv)
    finally:
        if in_main_thread:  # None: a handler not set from Python; the default is the closest to it
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous_sigterm is None else previous_sigterm)


def _main(argv: list[str]) -> int:
    try:
        if not argv or argv[0] == "demo":
            from pruning.demo import run_demo

            return run_demo(argv[1:])
        if argv[0] == "check":
            from pruning.check import run_check

            return run_check(argv[1:])
        run_prune(build_parser().parse_args(argv))
        return 0
    except (ValueError, OSError, ImportError) as err:
        if os.environ.get("WANDA_DEBUG"):
            raise
        print(f"error: {_first_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as interrupt:
        if os.environ.get("WANDA_DEBUG"):
            raise
        terminated = isinstance(interrupt, Terminated)
        print(f"error: {'terminated (SIGTERM)' if terminated else 'interrupted'}", file=sys.stderr)
        return 143 if terminated else 130


if __name__ == "__main__":
    sys.exit(main())
