"""The prune command's flags, checked before anything loads: values, optional dependencies, data and output paths.

:func:`validate_args` returns the :class:`pruning.config.PruneConfig`; every error is one line naming the flag.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from pruning.cli.parser import DSNOT_FLAGS, OPTIMIZER_FLAGS
from pruning.config import PruneConfig


def data_source(source: str) -> str:
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
        path = Path(data_source(source))
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
    _check_paths_expand(args)
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
    _check_device_map(args.device_map, args.offload)
    _check_combinations(args)
    from pruning.plan import check_backend

    config = PruneConfig(
        method=args.prune_method,
        sparsity_ratio=args.sparsity_ratio,
        sparsity_type=args.sparsity_type,
        use_variant=args.use_variant,
        true_sequential=args.true_sequential,
        backend=args.backend,
        calib_batch_size=args.calib_batch_size,
        **_tier_and_allocation_options(args),
        **_mask_options(args),
    )
    check_backend(config)
    if args.eval_zero_shot:
        try:
            import lm_eval  # noqa: F401
        except ImportError:
            raise ValueError(
                "--eval_zero_shot needs lm-eval, which is not installed: pip install -e '.[eval]' "
                "(or run without --eval_zero_shot)"
            ) from None
        _check_zero_shot_tasks(args.zero_shot_tasks, args.zero_shot_include_path)
    if config.needs_calibration:
        _check_data_source("--calib_dataset", data_source(args.calib_dataset))
    if args.eval_dataset.lower() != "none":
        _check_data_source("--eval_dataset", data_source(args.eval_dataset))
    if args.save_format == "sparse24" and (args.sparsity_type != "2:4" or not args.save_model):
        raise ValueError(
            "--save_format sparse24 stores 2:4 weights: use it with --sparsity_type 2:4 --sparsity_ratio 0.5 "
            "and --save_model DIR"
        )
    _check_output_paths(args)
    if args.plot:
        if not args.save:
            raise ValueError("--plot writes its PNG next to the metrics file: add --save DIR")
        from pruning.cli.plot import check_plotting

        check_plotting()
    if args.resume and not args.save:
        raise ValueError("--resume keeps its layer checkpoints in the --save directory: add --save DIR")
    from pruning.cli.push import check_push_target

    check_push_target(args.push_to_hub, args.save_model)
    if args.save:
        from pruning.cli.outputs import check_save_dir

        check_save_dir(args.save)
    if args.save_model:
        from pruning.cli.outputs import check_save_model_dir

        check_save_model_dir(args.save_model, args.overwrite)
    return config


def _mask_options(args: argparse.Namespace) -> dict:
    """RIA's and DSnoT's flags as config options, refusing those that the run would ignore."""
    options = {
        "refine": args.refine, "permute_channels": args.permute_channels, "lsa": args.lsa,
        "reconstruction": args.reconstruction, "refit": args.refit,
    }  # fmt: skip
    if args.refit_iters is not None:
        if not args.refit:
            raise ValueError("--refit_iters tunes --refit, which is not given; add it or drop the flag")
        options["refit_iters"] = args.refit_iters
    if args.ria_a is not None:
        if args.prune_method != "ria":
            raise ValueError(f"--ria_a is RIA's exponent; it applies to --prune_method ria, not {args.prune_method}")
        options["ria_a"] = args.ria_a
    for name in OPTIMIZER_FLAGS:
        value = getattr(args, name, None)
        if value is None:
            continue
        owner = "alps" if name.startswith("alps_") else "admm"
        used = args.prune_method == owner or (args.refine == "admm" and name in ("admm_iters", "admm_percdamp"))
        if not used:
            where = "--prune_method alps" if owner == "alps" else "--prune_method admm or --refine admm"
            if name in ("admm_iterative_prune", "admm_per_out"):
                where = "--prune_method admm (with --refine admm the mask is given)"
            raise ValueError(f"--{name} tunes {where}, which is not given; add it or drop the flag")
        options[name] = value
    for name in (*DSNOT_FLAGS, "dsnot_skip_layer"):
        value = getattr(args, name, None)
        if value is None:
            continue
        if args.refine != "dsnot":
            raise ValueError(f"--{name} tunes --refine dsnot, which is not given; add it or drop the flag")
        options[name] = value
    return options


PATH_FLAGS = ("model", "save", "save_model", "calib_dataset", "eval_dataset", "cache_dir", "zero_shot_include_path")


def _check_paths_expand(args: argparse.Namespace) -> None:
    """A ``~user/...`` path whose user does not exist fails here, in one line, not deep in a later step."""
    for name in PATH_FLAGS:
        value = getattr(args, name, None)
        if isinstance(value, str) and value.startswith("~"):
            try:
                Path(value).expanduser()
            except RuntimeError as err:
                raise ValueError(f"--{name} {value!r}: {err}; write the path out in full") from None


# accelerate's named strategies; anything else names one device ("cpu", "cuda", "cuda:1", "1", "disk", ...)
DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


def _check_device_map(device_map: str | None, offload: bool) -> None:
    """A --device_map that names a device must name one this machine has, before anything loads."""
    if device_map is None:
        return
    if offload:
        raise ValueError(
            "--offload and --device_map place the model in two different ways: --offload keeps it in CPU RAM and "
            "streams one layer at a time to the GPU, --device_map lets accelerate place it; pass one of the two"
        )
    if device_map in DEVICE_MAP_STRATEGIES or device_map == "cpu":
        return
    if device_map in ("disk", "meta"):
        raise ValueError(
            f"--device_map {device_map} would leave every decoder layer without weights to run; use --offload to keep "
            "the model in CPU RAM and stream one layer at a time to the GPU"
        )
    name = f"cuda:{device_map}" if device_map.isdigit() else device_map
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(
            f"--device_map {device_map!r} is no device or strategy: use auto, balanced, sequential, cpu, or a GPU "
            "such as cuda:0"
        ) from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"--device_map {device_map} names a GPU, and this machine has none; leave the flag out")
        if device.index is not None and device.index >= count:
            raise ValueError(
                f"--device_map {device_map} names GPU {device.index}, and this machine has {count} "
                f"(cuda:0 to cuda:{count - 1})"
            )
    elif device.type != "cpu":
        raise ValueError(
            f"--device_map {device_map!r}: device type {device.type!r} is not supported here; use cuda or cpu"
        )


THREE_TIER_ONLY = ("top_dense_ratio", "mid_2_4_ratio", "bottom_topk_ratio", "tier_selection")
HYBRID_ONLY = ("top_blocks_ratio", "score_threshold")
TILE_FLAGS = ("block_size", "topk_per_block", *THREE_TIER_ONLY, *HYBRID_ONLY)


def _tier_and_allocation_options(args: argparse.Namespace) -> dict:
    """The tile and OWL flags that were given (None = left out), refusing those that the run would ignore."""
    given = {name for name in (*TILE_FLAGS, "owl_m", "owl_lambda") if getattr(args, name, None) is not None}
    kind = args.sparsity_type
    ignored = sorted(
        name for name in given
        if (name in TILE_FLAGS and kind not in ("three_tier", "hybrid_2_4"))
        or (name in THREE_TIER_ONLY and kind == "hybrid_2_4")
        or (name in HYBRID_ONLY and kind == "three_tier")
    )  # fmt: skip
    if ignored:
        which = "three_tier" if ignored[0] in THREE_TIER_ONLY else "hybrid_2_4" if ignored[0] in HYBRID_ONLY else (
            "three_tier or hybrid_2_4"
        )  # fmt: skip
        raise ValueError(f"--{ignored[0]} applies to --sparsity_type {which}, not {kind}; drop it or change the type")
    owl_flags = sorted(name for name in given if name.startswith("owl_"))
    if owl_flags and args.allocation != "owl":
        raise ValueError(f"--{owl_flags[0]} tunes --allocation owl, which is not given; add it or drop the flag")
    options = {name: getattr(args, name) for name in given}
    options["allocation"] = args.allocation
    return options


def _check_combinations(args: argparse.Namespace) -> None:
    """A flag that would be silently ignored because of another is an error."""
    if args.true_sequential and args.prune_method == "magnitude":
        raise ValueError(
            "--true_sequential orders the calibration passes, and magnitude pruning has none; "
            "drop --true_sequential or use --prune_method wanda or sparsegpt"
        )
    tiered = args.sparsity_type in ("three_tier", "hybrid_2_4")
    if args.true_sequential and args.sparsity_ratio == 0 and not tiered:
        raise ValueError("--true_sequential has nothing to order at --sparsity_ratio 0 (nothing is pruned); drop one")
    if args.overwrite and not args.save_model:
        raise ValueError("--overwrite replaces a --save_model directory, and none is given; drop --overwrite")
    if args.zero_shot_include_path and not args.eval_zero_shot:
        raise ValueError("--zero_shot_include_path adds tasks for --eval_zero_shot, which is not given; add it")


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
