"""``wanda-prune`` / ``python -m pruning``: dispatch to prune, ``check`` or ``demo``, and the error contract.

    wanda-prune --model facebook/opt-125m --prune_method wanda --sparsity_ratio 0.5 --sparsity_type 2:4 --save out/
    wanda-prune check MODEL      # before a long job: load, show layers and shapes, generate, validate weights
    wanda-prune demo             # prune a real small model on the CPU and compare (no network needed)
    wanda-prune report DIR       # every run's metrics in a --save directory as one table
    wanda-prune --version        # this package's version and git commit; no arguments: the help

Bad input prints one line, ``error: ...``, and exits 2 (WANDA_DEBUG=1 shows the traceback); Ctrl-C exits
130 and SIGTERM 143, after the same clean-up (a model being saved is never left half-written).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import NoReturn

from pruning.cli.parser import build_parser, first_line, parse_prune_args, version_line


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
    from tqdm.contrib.logging import logging_redirect_tqdm

    # On a terminal, log lines go above a progress bar instead of through it; elsewhere there are no bars, ours
    # or transformers' (loading and saving weights) and the Hub's.
    redirect = logging_redirect_tqdm() if sys.stderr.isatty() else contextlib.nullcontext()
    if not sys.stderr.isatty():
        _progress_bars_off()
    try:
        with redirect:
            return _main(argv)
    finally:
        if in_main_thread:  # None: a handler not set from Python; the default is the closest to it
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous_sigterm is None else previous_sigterm)


def _progress_bars_off() -> None:
    with contextlib.suppress(ImportError, AttributeError):
        import transformers

        transformers.utils.logging.disable_progress_bar()
    with contextlib.suppress(ImportError, AttributeError):
        import huggingface_hub.utils

        huggingface_hub.utils.disable_progress_bars()


class _logging_as_asked:
    """``-q`` / ``-v`` set the level of our loggers; ``--log_file`` adds a file handler for the run."""

    def __init__(self, args):
        self.level = logging.WARNING if args.quiet else logging.DEBUG if args.verbose else logging.INFO
        self.log_file = args.log_file
        self.handler = None

    def __enter__(self):
        root = logging.getLogger()
        self.saved_level = root.level
        root.setLevel(self.level)
        if self.log_file:
            try:
                self.handler = logging.FileHandler(Path(self.log_file).expanduser(), encoding="utf-8")
            except OSError as err:
                raise ValueError(f"--log_file {self.log_file!r}: {err.strerror or err}") from None
            self.handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
            root.addHandler(self.handler)
        return self

    def __exit__(self, *exc):
        root = logging.getLogger()
        root.setLevel(self.saved_level)
        if self.handler is not None:
            root.removeHandler(self.handler)
            self.handler.close()


def _main(argv: list[str]) -> int:
    try:
        if not argv:  # a bare command: what it can do, not a 45-second demo
            build_parser().print_help()
            return 0
        if argv[0] in ("--version", "-V"):
            print(version_line())
            return 0
        if argv[0] == "demo":
            from pruning.cli.demo import run_demo

            return run_demo(argv[1:])
        if argv[0] == "check":
            from pruning.cli.check import run_check

            return run_check(argv[1:])
        if argv[0] == "report":
            from pruning.cli.report import run_report

            return run_report(argv[1:])
        from pruning.cli.prune import run_prune

        args = parse_prune_args(argv)
        with _logging_as_asked(args):
            run_prune(args, argv)
        return 0
    except (ValueError, OSError, ImportError) as err:
        if os.environ.get("WANDA_DEBUG"):
            raise
        print(f"error: {first_line(err)}", file=sys.stderr)
        return 2
    except MemoryError:
        if os.environ.get("WANDA_DEBUG"):
            raise
        print(f"error: out of CPU memory (RAM); {CPU_MEMORY_ADVICE}", file=sys.stderr)
        return 2
    except RuntimeError as err:
        if os.environ.get("WANDA_DEBUG") or not _is_cpu_out_of_memory(err):
            raise
        print(f"error: out of CPU memory (RAM): {first_line(err)}; {CPU_MEMORY_ADVICE}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as interrupt:
        if os.environ.get("WANDA_DEBUG"):
            raise
        terminated = isinstance(interrupt, Terminated)
        saved = getattr(interrupt, "saved", None)
        note = f"; what finished before it is saved: {', '.join(saved)}" if saved else ""
        print(f"error: {'terminated (SIGTERM)' if terminated else 'interrupted'}{note}", file=sys.stderr)
        return 143 if terminated else 130


CPU_MEMORY_ADVICE = (
    "use fewer --nsamples or a smaller --seqlen (the calibration activations grow with both), or a machine with "
    "more RAM"
)


def _is_cpu_out_of_memory(err: RuntimeError) -> bool:
    """torch's CPU allocator reports a failed allocation as a RuntimeError (CUDA's is torch.OutOfMemoryError)."""
    text = str(err)
    return "DefaultCPUAllocator" in text or "can't allocate memory" in text


if __name__ == "__main__":
    sys.exit(main())
