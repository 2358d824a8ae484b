"""The GPU entry point: ``python -m bench [suite ...] [--smoke] [--out FILE]``.

Without CUDA it runs the smoke mode (tiny shapes, Triton interpreter, plain timer), which exists to keep
the harness itself tested in CI; its timings mean nothing. Results append to bench/results/ as JSON
lines named by date and device, then print as a table.
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

SUITES = ("kernels",)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("suites", nargs="*", default=list(SUITES), help=f"suites to run (default: all of {SUITES})")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes and a plain timer (implied without CUDA)")
    parser.add_argument(
        "--out", type=Path, default=None, help="JSON-lines file (default: bench/results/DATE_DEVICE.jsonl)"
    )
    parser.add_argument("--reps", type=int, default=20)
    args = parser.parse_args(argv)
    unknown = sorted(set(args.suites) - set(SUITES))
    if unknown:
        parser.error(f"unknown suite(s) {', '.join(unknown)}; choose from {', '.join(SUITES)}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    from bench import kernels
    from bench.records import default_results_path, environment, write_jsonl
    from bench.report import format_table

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    smoke = args.smoke or device.type != "cuda"
    env = environment(device)
    records = []
    for suite in args.suites:
        suite_records = {"kernels": kernels.run}[suite](device, smoke=smoke, reps=3 if smoke else args.reps)
        records += [{**r, **env, "mode": "smoke" if smoke else "gpu"} for r in suite_records]
    out = args.out or default_results_path({**env, "device": env["device"] if not smoke else "cpu-smoke"})
    write_jsonl(records, out)
    print(format_table(records))
    print(f"\n{len(records)} records appended to {out}")
    if not all(r["correct"] in (True, None) for r in records):
        print("MISMATCH: some provider disagrees with the torch reference (column 'correct')", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
