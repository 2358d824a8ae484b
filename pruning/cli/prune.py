"""``wanda-prune --model ... --prune_method ...``: validate the flags, load, prune, save, evaluate, report.

Everything checkable runs before a weight is loaded, and the pruned model is saved before it is evaluated:
a mistake costs seconds, and a failure late in the run never loses the result already written.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from pruning.cli import durable
from pruning.cli.parser import first_line
from pruning.cli.validate import data_source, resolve_seqlen, validate_args
from pruning.config import PruneConfig

log = logging.getLogger("pruning")

ALLOCATOR_HINT = "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True also helps when memory is fragmented"


def load_eval_ids(args: argparse.Namespace, tokenizer, seqlen: int) -> torch.Tensor | None:
    """The evaluation tokens, loaded before pruning so that missing data cannot fail the job at its end."""
    if args.eval_dataset.lower() == "none":
        return None
    from pruning.data import DataError, get_eval_ids

    source = data_source(args.eval_dataset)
    try:
        ids = get_eval_ids(source, tokenizer, cache_dir=args.cache_dir, seqlen=seqlen)
    except DataError as err:
        raise ValueError(f"--eval_dataset: {first_line(err)}") from None
    if ids.shape[1] < seqlen:
        raise ValueError(
            f"--eval_dataset {args.eval_dataset!r} has only {ids.shape[1]} tokens, fewer than --seqlen {seqlen}; "
            "use a longer text or a smaller --seqlen"
        )
    return ids


def evaluate_ppl(model, ids: torch.Tensor | None, args: argparse.Namespace, seqlen: int) -> float | None:
    if ids is None:
        return None
    from pruning.evaluate import model_perplexity

    return model_perplexity(model, ids, seqlen, args.eval_batch_size)


def evaluate_zero_shot(model, tokenizer, args: argparse.Namespace) -> dict:
    """lm-eval on the in-memory model; a model in CPU RAM runs on the GPU with its layers streamed through it."""
    from pruning.evaluate import model_zero_shot

    tasks = [t.strip() for t in args.zero_shot_tasks.split(",") if t.strip()]
    return model_zero_shot(
        model, tokenizer, tasks, batch_size=args.eval_batch_size, include_path=args.zero_shot_include_path
    )


def run_prune(args: argparse.Namespace, argv: list[str] | None = None) -> dict:
    """Validate, load, prune, save the model (--save_model), evaluate, write --save, then the optional
    zero-shot step. The --save_model target is locked for the whole run."""

    started = time.perf_counter()
    config = validate_args(args)
    kept: list[str] = []  # what is already written, for the messages of a failure or an interrupt after it
    try:
        with contextlib.ExitStack() as stack:
            if args.save_model:  # one run at a time into a target, from before loading to the end
                target = Path(args.save_model).expanduser()
                stack.enter_context(durable.target_locked(target))
                existed = target.exists()
                durable.clear_stale_staging(target)
                if target.exists() and not existed and not args.overwrite:
                    raise ValueError(
                        f"--save_model {str(target)!r} held no model, and the previous one was put back from what an "
                        "interrupted run left beside it; pass --overwrite to replace it, or choose another directory"
                    )
            return _run(args, config, started, kept, argv)
    except KeyboardInterrupt as interrupt:
        interrupt.saved = list(kept)  # type: ignore[attr-defined]
        raise


def _run(args: argparse.Namespace, config: PruneConfig, started: float, kept: list[str], argv=None) -> dict:
    from pruning.adapters import get_adapter
    from pruning.cli.outputs import metrics_path, save_model_atomically, versions, write_metrics, write_wanda_log
    from pruning.cli.provenance import provenance, provenance_files, update_model_card
    from pruning.data import DataError, get_calibration_ids
    from pruning.driver import prune_model
    from pruning.loading import load_config, load_model, load_tokenizer
    from pruning.placement import streamed_from_cpu
    from pruning.plan import check_model_config, plan
    from pruning.sparsity import check_sparsity

    if config.tiered and config.sparsity_ratio:
        log.info(
            "--sparsity_ratio %g is not used by --sparsity_type %s: the tier ratios set the sparsity (the run reports "
            "the measured value)", config.sparsity_ratio, config.sparsity_type,
        )  # fmt: skip
    model_config = load_config(args.model, args.cache_dir)
    check_model_config(config, model_config)
    seqlen = resolve_seqlen(args.seqlen, model_config)
    tokenizer = load_tokenizer(args.model, args.cache_dir)
    calibration_ids = None
    if config.needs_calibration:
        try:
            calibration_ids = get_calibration_ids(
                data_source(args.calib_dataset),
                tokenizer,
                args.nsamples,
                seqlen,
                seed=args.seed,
                cache_dir=args.cache_dir,
            )
        except DataError as err:
            raise ValueError(f"--calib_dataset: {first_line(err)}") from None
    eval_ids = load_eval_ids(args, tokenizer, seqlen)
    torch.manual_seed(args.seed)
    streamed = bool(args.offload or args.device_map)
    with _out_of_memory_as_error("loading the model", "loading", streamed):
        model = load_model(args.model, args.cache_dir, args.dtype, args.device_map, args.offload)
    log.info("loaded %s (%s) in %.1f s", args.model, model_config.model_type, time.perf_counter() - started)
    checked = plan(model, config, calibration_ids, config_checked=True)  # right after loading, not halfway
    streamed = streamed or streamed_from_cpu(model, get_adapter(model))  # also when the model did not fit
    if args.save_format == "sparse24":
        from pruning.sparse24 import check_packable

        check_packable(model)  # before the long job, not at the very end

    metrics: dict = {"config": {k: v for k, v in vars(args).items() if k != "func"}, "versions": versions()}
    metrics["prune_config"] = dataclasses.asdict(config)  # every option as used, defaults filled in
    metrics["provenance"] = provenance(argv, calibration_ids, eval_ids, args)
    if args.eval_dense:
        with _out_of_memory_as_error("evaluating the dense model", "evaluating", streamed):
            metrics["ppl_dense"] = evaluate_ppl(model, eval_ids, args, seqlen)
        log.info("dense perplexity: %s", metrics["ppl_dense"])
    checkpoint = None
    if args.resume:
        from pruning.checkpoint import LayerCheckpoint

        fingerprint = {"model": str(args.model), "model_dtype": args.dtype, "calib_dataset": args.calib_dataset}
        checkpoint = LayerCheckpoint(Path(args.save).expanduser() / "resume", fingerprint)
    with _out_of_memory_as_error("pruning", "pruning", streamed):
        report = prune_model(model, calibration_ids, config, plan=checked, checkpoint=checkpoint)
    metrics["prune"] = report.to_dict()
    print("*" * 30)
    sparsity = check_sparsity(model)
    print(f"sparsity sanity check {sparsity:.4f}")
    print("*" * 30)
    metrics["actual_sparsity"] = sparsity
    if report.tiers is not None:
        print(f"tiles - dense: {report.tiers['dense']}, 2:4: {report.tiers['2:4']}, top-k: {report.tiers['topk']}")
    if config.allocation == "owl":
        print("OWL layer sparsities: " + " ".join(f"{layer.target_sparsity:.4f}" for layer in report.layers))
    # The pruned model is saved first: it is the costly result, and evaluation can still fail (memory, data).
    if args.save_model:

        def saved(target: Path) -> None:
            log.info("saved the pruned model to %s", target)
            kept.append(str(target))

        saved_to = save_model_atomically(
            model, tokenizer, Path(args.save_model).expanduser(), args.overwrite, args.save_format, on_saved=saved,
            extra_files=provenance_files(metrics),
        )  # fmt: skip
    with _out_of_memory_as_error("evaluating perplexity", "evaluating", streamed, kept):
        metrics["ppl_test"] = evaluate_ppl(model, eval_ids, args, seqlen)
    if eval_ids is not None:
        name = "wikitext" if args.eval_dataset == "wikitext2" else args.eval_dataset
        print(f"{name} perplexity {metrics['ppl_test']:.4f}")  # full precision in metrics_*.json
    metrics["total_seconds"] = time.perf_counter() - started
    if args.save_model:
        update_model_card(saved_to, metrics)
    # Results are written before zero-shot evaluation (slow, and it downloads task data): it cannot lose them.
    save_dir = Path(args.save).expanduser() if args.save else None
    if save_dir:
        metrics_file = metrics_path(save_dir, config.method, config.sparsity_type)
        write_wanda_log(
            save_dir, config.method, sparsity, metrics["ppl_test"], config.sparsity_type, str(args.model),
            metrics_file.name,
        )  # fmt: skip
        metrics_file = write_metrics(metrics_file, metrics)
        log.info("wrote %s and %s", save_dir / f"log_{config.method}.txt", metrics_file)
        kept.insert(0, str(metrics_file))
        if args.plot:
            from pruning.cli.plot import plot_layers

            png = plot_layers(metrics, metrics_file.with_suffix(".png"))
            if png is not None:
                kept.append(str(png))
    if args.eval_zero_shot:
        try:
            metrics["zero_shot"] = evaluate_zero_shot(model, tokenizer, args)
        except Exception as err:
            saved = f"; the pruning results are saved in {', '.join(kept)}" if kept else ""
            raise ValueError(f"zero-shot evaluation failed ({type(err).__name__}: {first_line(err)}){saved}") from err
        from pruning.cli.summary import zero_shot_line

        table = getattr(metrics["zero_shot"], "table", None)
        if table:
            print(table)
        if getattr(metrics["zero_shot"], "meta", None):
            metrics["zero_shot_meta"] = metrics["zero_shot"].meta
        print(f"zero-shot: {zero_shot_line(metrics['zero_shot'])}")
        metrics["total_seconds"] = time.perf_counter() - started
        if save_dir:
            write_metrics(metrics_file, metrics)
        if args.save_model:
            update_model_card(saved_to, metrics)
    from pruning.cli.summary import format_summary

    print(format_summary(metrics, str(args.model), kept))
    if args.push_to_hub:  # last: every result is written, so a failed upload costs nothing
        from pruning.cli.push import push_model

        push_model(args.push_to_hub, saved_to)
    if checkpoint is not None:  # the run is complete: its layer checkpoints are no longer needed
        checkpoint.remove()
    return metrics


@contextlib.contextmanager
def _out_of_memory_as_error(what: str, stage: str, streamed: bool, kept: list[str] = ()) -> Iterator[None]:
    """A GPU out-of-memory error that smaller batches did not cure becomes one line with the flags to change
    (:func:`out_of_memory_advice`) and where the results already written are."""
    try:
        yield
    except torch.OutOfMemoryError as err:
        saved = f"; the pruned model is saved in {', '.join(kept)}" if kept else ""
        raise ValueError(f"GPU out of memory while {what}: {out_of_memory_advice(stage, streamed)}{saved}") from err


def out_of_memory_advice(stage: str, streamed: bool) -> str:
    """What to change after a GPU out-of-memory error that smaller batches did not cure.
    ``stage``: 'loading', 'pruning' or 'evaluating'; ``streamed``: --offload or --device_map is in use already."""
    if stage == "loading":
        fix = "use --device_map auto to spread the model over several GPUs, or --offload to keep it in CPU RAM"
    elif streamed:
        fix = "use a smaller --seqlen"
    else:
        fix = (
            "use --offload (the model in CPU RAM, one decoder layer at a time on the GPU), --device_map auto "
            "(several GPUs), or a smaller --seqlen"
        )
    if stage == "evaluating":
        fix += " (--eval_dataset none skips perplexity)"
    return f"{fix}; {ALLOCATOR_HINT}"
