"""The command line's parser (locuslab/wanda's flags and ours) and how library option names are spelled as flags."""

from __future__ import annotations

import argparse
from typing import NoReturn

from pruning.config import METHODS
from pruning.errors import OptionError
from wanda_kernels.policy import BACKENDS

# Library parameter -> flag, where they differ (the rest are "--" + the name).
FLAG_FOR = {"method": "--prune_method", "model": "--model"}


def flag(option: str) -> str:
    return FLAG_FOR.get(option, f"--{option}")


def first_line(err: BaseException) -> str:
    """The message of ``err`` with library option names spelled as flags, first line only."""
    text = err.spelled(flag) if isinstance(err, OptionError) else str(err)
    return (text.strip().splitlines() or [type(err).__name__])[0]


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the CLI's error contract: one line, ``error: ...``, exit status 2 (no usage block), and no
    abbreviated flags (``--device`` would be taken for ``--device_map``)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see '{self.prog} --help')\n")


class _PrintVersion(argparse.Action):
    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        print(version_line())
        parser.exit()


def version_line() -> str:
    """``wanda-prune VERSION (git SHA)``: the installed distribution's version, and the checkout's commit if any."""
    version, sha = package_version()
    return f"wanda-prune {version}" + (f" (git {sha})" if sha else "")


def package_version() -> tuple[str, str]:
    """(this distribution's version, the checkout's git commit or "")."""
    import subprocess
    from importlib import metadata
    from pathlib import Path

    try:
        version = metadata.version("wanda-kernels")
    except metadata.PackageNotFoundError:
        version = "unknown (not installed)"
    checkout = Path(__file__).resolve().parents[2]
    try:
        sha = subprocess.run(["git", "-C", str(checkout), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=5).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return version, sha


EXAMPLES = """examples:
  wanda-prune --model facebook/opt-125m --prune_method wanda --sparsity_ratio 0.5 --save out/
  wanda-prune --model meta-llama/Llama-2-7b-hf --prune_method sparsegpt --sparsity_ratio 0.5 --sparsity_type 2:4 \\
      --save_model pruned/llama-2-7b-24 --save_format sparse24
  wanda-prune --model meta-llama/Llama-2-7b-hf --prune_method alps --sparsity_ratio 0.7 --save out/
  wanda-prune --config pruned/llama-2-7b-24/pruning_config.json --save_model pruned/again   # replay a run

subcommands: wanda-prune check MODEL | report DIR | demo (each with --help); wanda-prune --version
Every underscore flag also has a dashed spelling (--sparsity-ratio = --sparsity_ratio)."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The description and examples as written; each flag's default appended where it has a real one."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        unset = default is None or default is False or default == argparse.SUPPRESS
        if unset or "default" in text or not action.option_strings:
            return text
        return f"{text} (default: {default})"


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="wanda-prune",
        description="Prune a Hugging Face causal LM with Wanda, SparseGPT, magnitude, RIA, ALPS or ADMM, with "
        "locuslab/wanda's flags.",
        epilog=EXAMPLES,
        formatter_class=HelpFormatter,
    )
    p.add_argument("-V", "--version", action=_PrintVersion, help="this package's version and git commit")
    p.add_argument(
        "--config", default=None, metavar="FILE",
        help="flags from a JSON or YAML file (a saved model's pruning_config.json replays its run); flags on the "
        "command line override it",
    )  # fmt: skip
    wanda = p.add_argument_group("locuslab/wanda's flags (same meanings and defaults)")
    wanda.add_argument("--model", required=True, help="HF model id, local directory or .gguf file")
    wanda.add_argument("--prune_method", choices=METHODS, required=True)
    wanda.add_argument("--sparsity_ratio", type=float, default=0.0, help="fraction of weights to prune")
    wanda.add_argument(
        "--sparsity_type",
        default="unstructured",
        help="unstructured, N:M such as 2:4 or 4:8, or the tile types three_tier and hybrid_2_4 (Jiajun-Ji/wanda)",
    )
    wanda.add_argument("--nsamples", type=int, default=128, help="number of calibration samples")
    wanda.add_argument("--seed", type=int, default=0, help="seed for sampling the calibration data")
    wanda.add_argument("--cache_dir", default="llm_weights", help="Hugging Face cache directory")
    wanda.add_argument("--use_variant", action="store_true", help="Wanda's per-row cumulative-alpha variant")
    wanda.add_argument("--save", default=None, help="directory for log_{method}.txt and a metrics_*.json per run")
    wanda.add_argument("--save_model", default=None, help="directory to save the pruned model and tokenizer")
    wanda.add_argument("--eval_zero_shot", action="store_true", help="lm-eval zero-shot tasks (needs .[eval])")
    data = p.add_argument_group("data and evaluation")
    data.add_argument("--seqlen", type=int, default=None, help="calibration/eval length (default: model max, <= 4096)")
    data.add_argument("--calib_dataset", default="c4", help="c4, wikitext2, or a local text file/directory")
    data.add_argument("--eval_dataset", default="wikitext2", help="wikitext2, c4, a local text file, or 'none'")
    data.add_argument("--eval_dense", action="store_true", help="also measure the dense model's perplexity first")
    data.add_argument(
        "--eval_batch_size", type=int, default=1, help="perplexity windows / zero-shot requests per forward"
    )
    data.add_argument(
        "--zero_shot_tasks",
        default="boolq,rte,hellaswag,winogrande,arc_easy,arc_challenge,openbookqa",
        help="comma-separated lm-eval tasks for --eval_zero_shot (default: Wanda's seven)",
    )
    data.add_argument("--zero_shot_include_path", default=None, help="directory of extra lm-eval task YAMLs (offline)")
    hardware = p.add_argument_group("placement and speed")
    hardware.add_argument("--device_map", default=None, help="accelerate device map, e.g. 'auto' for several GPUs")
    hardware.add_argument("--offload", action="store_true", help="keep the model in CPU RAM, stream layers to the GPU")
    hardware.add_argument("--dtype", choices=["auto", "float16", "bfloat16", "float32"], default="auto",
                          help="weights dtype")  # fmt: skip
    hardware.add_argument("--backend", choices=BACKENDS, default="auto", help="mask kernels: triton (GPU) or torch")
    hardware.add_argument(
        "--calib_batch_size", type=int, default=None, help="samples per forward (default: from memory)"
    )
    hardware.add_argument(
        "--true_sequential", action="store_true", help="statistics after earlier sublayers are pruned"
    )
    output = p.add_argument_group("output and logging")
    output.add_argument(
        "--save_format",
        choices=["dense", "sparse24"],
        default="dense",
        help="--save_model format: dense (from_pretrained) or sparse24 (2:4 compressed; pruning.load_sparse)",
    )
    output.add_argument("--overwrite", action="store_true", help="replace an existing --save_model directory")
    output.add_argument("--push_to_hub", default=None, metavar="REPO",
                        help="last, upload the --save_model directory to this Hub repo (user/name)")  # fmt: skip
    output.add_argument(
        "--resume", action="store_true",
        help="checkpoint each pruned layer in --save DIR/resume and continue a run cut off there (the same flags; "
        "bit for bit the uninterrupted result); removed when the run completes",
    )  # fmt: skip
    output.add_argument("--plot", action="store_true",
                        help="a PNG of each layer's sparsity and error next to the metrics file (needs --save, "
                        "matplotlib)")  # fmt: skip
    output.add_argument("--log_file", default=None, help="also write the log (every level shown) to this file")
    verbosity = output.add_mutually_exclusive_group()
    verbosity.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    verbosity.add_argument("-v", "--verbose", action="store_true", help="debug messages too")
    add_tier_flags(p.add_argument_group("tile pruning (Jiajun-Ji/wanda) and layer allocation (OWL)"))
    add_mask_flags(p.add_argument_group("better masks and weight updates (RIA, DSnoT, permutation, refit, ALPS, ADMM)"))
    add_dashed_aliases(p)
    return p


def add_dashed_aliases(parser: argparse.ArgumentParser) -> None:
    """``--sparsity-ratio`` for ``--sparsity_ratio``, for every underscore flag (Wanda's spellings stay first)."""
    for action in list(parser._actions):
        for option in list(action.option_strings):
            if option.startswith("--") and "_" in option:
                dashed = option.replace("_", "-")
                if dashed not in parser._option_string_actions:  # parsed, not listed: the help stays one name each
                    parser._option_string_actions[dashed] = action


# RIA, DSnoT and channel permutation (their repositories' flag names are accepted as aliases). Defaults are None,
# as above: a DSnoT flag without --refine dsnot is an error; the values used when left out are the published ones.
DSNOT_FLAGS = {  # flag name -> (aliases, type, help)
    "dsnot_update_threshold": (("--update_threshold",), float, "--refine dsnot: stop a row at this |error| (0.1)"),
    "dsnot_max_cycles": (("--max_cycle_time",), int, "--refine dsnot: swap cycles per row at most (50)"),
    "dsnot_pow_of_var_regrowing": (("--pow_of_var_regrowing",), float, "--refine dsnot: variance power (1)"),
}


def add_mask_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ria_a", "--a", dest="ria_a", type=float, default=None,
                   help="--prune_method ria: exponent of the activation norm (default 0.5)")  # fmt: skip
    p.add_argument("--refine", choices=["none", "dsnot", "admm"], default="none",
                   help="refine the mask: dsnot (training-free prune-and-grow, Zhang et al. 2024), or the weights on "
                   "it: admm (Boza 2024's ADMM update)")  # fmt: skip
    for name, (aliases, kind, text) in DSNOT_FLAGS.items():
        p.add_argument(f"--{name}", *aliases, dest=name, type=kind, default=None, help=text)
    p.add_argument(
        "--dsnot_skip_layer", "--skip_layer", dest="dsnot_skip_layer", default=None,
        choices=["mlp", "self_attn", "no_skip"],
        help="--refine dsnot: Linears left as the method pruned them (default mlp: refine attention only)",
    )  # fmt: skip
    p.add_argument(
        "--permute_channels", "--reallocation", dest="permute_channels", action="store_true",
        help="N:M: reorder input channels first (RIA's channel reallocation), folded into the model",
    )  # fmt: skip
    p.add_argument("--lsa", action="store_true", help="--permute_channels: refine by linear sum assignment (scipy)")
    p.add_argument(
        "--reconstruction", action="store_true",
        help="update the kept weights with SparseGPT's OBS step, the final mask fixed (RIA's flag)",
    )  # fmt: skip
    p.add_argument(
        "--refit", action="store_true",
        help="last, refit the kept weights to the layer's least-squares optimum on their mask (conjugate gradients "
        "on the Hessian; any method)",
    )  # fmt: skip
    p.add_argument("--refit_iters", type=int, default=None, help="--refit: at most this many CG steps (default 10)")
    for name, (kind, text) in OPTIMIZER_FLAGS.items():
        if kind is bool:
            p.add_argument(f"--{name}", action="store_true", default=None, help=text)
        else:
            p.add_argument(f"--{name}", type=kind, default=None, help=text)


# ALPS's and the ADMM update's settings (None when left out: the published values, and an error where unused)
OPTIMIZER_FLAGS = {  # flag name -> (type, help)
    "alps_rho": (float, "--prune_method alps: initial ADMM penalty rho (default 0.1)"),
    "alps_max_iter": (int, "--prune_method alps: ADMM steps at most (default 300)"),
    "alps_update_iter": (int, "--prune_method alps: rho updated every this many steps (default 3)"),
    "alps_switch_iter": (int, "--prune_method alps: stop on a stable support after this step (default 30)"),
    "alps_cg_iters": (int, "--prune_method alps: CG steps of the final refit (default 10)"),
    "admm_iters": (int, "--prune_method admm / --refine admm: ADMM steps (default 20)"),
    "admm_iterative_prune": (int, "--prune_method admm: steps that choose the mask again (default 15)"),
    "admm_percdamp": (float, "--prune_method admm / --refine admm: damping, times the mean diagonal (default 0.1)"),
    "admm_per_out": (bool, "--prune_method admm, unstructured: sparsity per output row, not per matrix"),
}


# Tile pruning and layer allocation. Defaults are None so that a flag given where it does nothing is an error;
# the values used when they are left out are the library's (Jiajun-Ji/wanda's and luuyin/OWL's).
TIER_FLAGS = {  # flag name -> (type, help)
    "block_size": (int, "three_tier/hybrid_2_4: tile edge (default 16)"),
    "top_dense_ratio": (float, "three_tier: fraction of tiles kept dense (default 0.4)"),
    "mid_2_4_ratio": (float, "three_tier: fraction of tiles pruned 2:4 (default 0.4)"),
    "bottom_topk_ratio": (float, "three_tier: fraction of tiles keeping top-k (default 0.2)"),
    "topk_per_block": (int, "three_tier/hybrid_2_4: weights kept per top-k tile (default 10)"),
    "top_blocks_ratio": (float, "hybrid_2_4: fraction of tiles that try 2:4 (default 0.6)"),
    "score_threshold": (float, "hybrid_2_4: 2:4 where it keeps this share of the tile's metric (default 0.8)"),
}
ALLOCATION_FLAGS = {
    "owl_m": (float, "--allocation owl: outliers are scores above M times the layer's mean (default 5)"),
    "owl_lambda": (float, "--allocation owl: layer sparsities span sparsity_ratio +- 2 lambda at most (default 0.08)"),
}
TIER_SELECTIONS_HELP = (
    "three_tier's selection: fork (Jiajun-Ji/wanda, bit for bit; default), balanced (ours: metric+bands+obs+cost), or "
    "ingredients joined by '+': metric (rank inside tiles by Wanda's metric), bands (tiers per band of block_size "
    "rows), obs (SparseGPT's update with the tier mask fixed), cost (tiers by the squared metric each would prune)"
)


def add_tier_flags(p: argparse.ArgumentParser) -> None:
    for name, (kind, text) in TIER_FLAGS.items():
        p.add_argument(f"--{name}", type=kind, default=None, help=text)
    p.add_argument("--tier_selection", default=None, help=TIER_SELECTIONS_HELP)
    p.add_argument(
        "--allocation",
        choices=["uniform", "owl"],
        default="uniform",
        help="layer sparsities: uniform, or owl (outlier-weighted, Yin et al. 2024; unstructured only)",
    )
    for name, (kind, text) in ALLOCATION_FLAGS.items():
        p.add_argument(f"--{name}", type=kind, default=None, help=text)


# Flags a replayed pruning_config.json does not carry over: where this run writes, and how it logs.
RUN_LOCAL_FLAGS = ("config", "save", "save_model", "overwrite", "log_file", "quiet", "verbose", "push_to_hub",
                   "resume", "plot")  # fmt: skip


def parse_prune_args(argv: list[str]) -> argparse.Namespace:
    """The prune command's flags, with ``--config FILE``'s values as defaults that the command line overrides."""
    parser = build_parser()
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(argv)
    if known.config:
        values = load_flag_file(known.config, parser)
        for action in parser._actions:
            if action.dest in values:
                action.required = False
        parser.set_defaults(**values)
    return parser.parse_args(argv)


def load_flag_file(path: str, parser: argparse.ArgumentParser) -> dict:
    """``{flag name: value}`` from a JSON or YAML mapping, or from a pruning_config.json (its ``flags``); an unknown
    name or a wrong type is one line naming it."""
    import json
    from pathlib import Path

    file = Path(path).expanduser()
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"--config {path!r}: {getattr(err, 'strerror', None) or err}") from None
    try:
        if file.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as err:  # json.JSONDecodeError, yaml.YAMLError: the parser's own message
        raise ValueError(
            f"--config {path!r} is not valid {file.suffix.lstrip('.') or 'JSON'}: {first_line(err)}"
        ) from None
    if isinstance(data, dict) and isinstance(data.get("flags"), dict):  # a saved model's pruning_config.json
        data = {k: v for k, v in data["flags"].items() if k not in RUN_LOCAL_FLAGS}
    if not isinstance(data, dict):
        raise ValueError(f"--config {path!r} must hold a mapping of flag names to values, got {type(data).__name__}")
    actions = {action.dest: action for action in parser._actions}
    values = {}
    for key, value in data.items():
        name = str(key).lstrip("-").replace("-", "_")
        action = actions.get(name)
        if action is None or name in ("help", "version", "config"):
            raise ValueError(f"--config {path!r}: unknown flag {key!r} (see 'wanda-prune --help')")
        if value is not None and action.type is not None and not isinstance(value, bool):
            try:
                value = action.type(value)
            except (TypeError, ValueError):
                raise ValueError(f"--config {path!r}: {key} must be {action.type.__name__}, got {value!r}") from None
        if action.choices is not None and value is not None and value not in action.choices:
            raise ValueError(f"--config {path!r}: {key} must be one of {', '.join(map(str, action.choices))}")
        values[name] = value
    return values
