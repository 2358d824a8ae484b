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
