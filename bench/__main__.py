"""The GPU entry point: ``python -m bench [suite ...] [--smoke] [--out FILE]``.

Suites, all by default in this order: ``kernels`` (each op on real layer shapes, bench/kernels.py), ``e2e``
(whole ``prune_model`` runs on random-weight OPTs against locuslab/wanda's code path, bench/e2e.py) and
``inference`` (2:4 sparse vs dense: per-Linear and whole-model prefill/decode, bench/inference.py).
Without CUDA it runs the smoke mode (tiny shapes, Triton interpreter, plain timer), which exists to keep
the harness itself tested in CI; its timings mean nothing. Each record is appended to bench/results/ (JSON
lines named by date and device) as soon as it is measured; all of them print as a table at the end.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

SUITES = ("kernels", "e2e", "inference")


def _model_list(text: str) -> tuple[str, ...] | None:
    return () if text == "none" else tuple(name for name in text.split(",") if name)


def _token_counts(text: str | None) -> tuple[int, ...] | None:
    """None: the suite's default; (): no per-Linear part."""
    if text is None:
        return None
    if text == "none":
        return ()
    counts = tuple(int(part) for part in text.split(",") if part)
    if not counts or min(counts) < 1:
        raise ValueError(text)
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("suites", nargs="*", default=list(SUITES), help=f"suites to run (default: all of {SUITES})")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes and a plain timer (implied without CUDA)")
    parser.add_argument(
        "--out", type=Path, default=None, help="JSON-lines file (default: bench/results/DATE_DEVICE.jsonl)"
    )
    parser.add_argument("--reps", type=int, default=20, help="kernels: timed repetitions per op")
    parser.add_argument(
        "--inference-models",
        default="opt-6.7b,opt-13b,llama-7b",
        help="inference: comma-separated models for the whole-model part ('none': per-Linear part only)",
    )
    parser.add_argument(
        "--linear-tokens",
        default=None,
        help="inference: comma-separated row counts M for the per-Linear part ('none': skip it; default: "
        "1,4,8,16,32,128,2048,8192)",
    )
    parser.add_argument(
        "--no-fuse",
        action="store_true",
        help="inference: run transformers' layers as written (no one-kernel RMSNorm/rotary, no fused q/k/v)",
    )
    from bench import e2e

    e2e.add_arguments(parser)
    args = parser.parse_args(argv)
    unknown = sorted(set(args.suites) - set(SUITES))
    if unknown:
        parser.error(f"unknown suite(s) {', '.join(unknown)}; choose from {', '.join(SUITES)}")
    try:
        linear_tokens = _token_counts(args.linear_tokens)
    except ValueError:
        parser.error(f"--linear-tokens {args.linear_tokens!r}: expected comma-separated positive integers or 'none'")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    from bench import inference, kernels
    from bench.records import default_results_path, environment, write_jsonl
    from bench.report import format_table, log_record

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    smoke = args.smoke or device.type != "cuda"
    env = environment(device)
    out = args.out or default_results_path({**env, "device": env["device"] if not smoke else "cpu-smoke"})
    suites = {
        "kernels": lambda: kernels.run(device, smoke=smoke, reps=3 if smoke else args.reps),
        "e2e": lambda: e2e.iter_from_args(device, smoke, args),
        "inference": lambda: inference.run(
            device, smoke, models=_model_list(args.inference_models), fuse=not args.no_fuse, tokens=linear_tokens
        ),
    }
    records = []
    for suite in args.suites:
        for r in suites[suite]():
            record = {**r, **env, "mode": "smoke" if smoke else "gpu"}
            write_jsonl([record], out)  # one at a time: a run cut off by a timeout keeps what it measured
            records.append(record)
            log_record(record)
    print(format_table(records))
    print(f"\n{len(records)} records appended to {out}")
    if not all(r["correct"] in (True, None) for r in records):
        print("MISMATCH: some provider disagrees with its reference (column 'correct')", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
