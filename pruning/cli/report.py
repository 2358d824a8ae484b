"""``wanda-prune report DIR``: every ``metrics_*.json`` of a ``--save`` directory as one table, oldest first.

One row per run: model, method with its add-ons, pattern, measured sparsity, perplexity (and dense), zero-shot
mean, the mean per-Linear reconstruction error and how it was measured, pruning seconds, the file. ``--layers``
adds each run's per-layer sparsity and mean error; ``--csv`` writes the rows as CSV instead of Markdown.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
from pathlib import Path

from pruning.cli.summary import layer_errors, method_line, zero_shot_mean

log = logging.getLogger(__name__)

COLUMNS = ("model", "method", "sparsity", "ppl", "ppl_dense", "zero_shot_mean", "layer_error", "error_kind",
           "prune_s", "file")  # fmt: skip


def build_report_parser() -> argparse.ArgumentParser:
    from pruning.cli.parser import ArgumentParser

    p = ArgumentParser(
        prog="wanda-prune report",
        description="Tabulate every metrics_*.json in a --save directory (one row per run, oldest first).",
        epilog="examples: wanda-prune report out/ --layers; wanda-prune report sweeps/ -r --csv > runs.csv",
    )
    p.add_argument("directory", help="a --save directory (its metrics_*.json files; subdirectories with -r)")
    p.add_argument("-r", "--recursive", action="store_true", help="also the metrics files of subdirectories")
    p.add_argument("--layers", action="store_true", help="also each run's per-layer sparsity and mean error")
    p.add_argument("--csv", action="store_true", help="CSV on stdout instead of a Markdown table")
    p.add_argument("--plot", action="store_true", help="a PNG per run next to its metrics file (matplotlib)")
    return p


def run_report(argv: list[str]) -> int:
    args = build_report_parser().parse_args(argv)
    directory = Path(args.directory).expanduser()
    if not directory.is_dir():
        raise ValueError(f"report: {args.directory!r} is not a directory; give the --save directory of a run")
    found = directory.rglob("metrics_*.json") if args.recursive else directory.glob("metrics_*.json")
    files = sorted(found, key=_started)
    runs = [(path, metrics) for path in files if (metrics := _read(path)) is not None]
    if not runs:
        raise ValueError(
            f"report: no readable metrics_*.json in {args.directory!r}"
            + ("" if args.recursive else " (add -r for subdirectories)")
        )
    rows = [report_row(path.relative_to(directory), metrics) for path, metrics in runs]
    print(format_csv(rows) if args.csv else format_markdown(rows), end="" if args.csv else "\n")
    if args.plot:
        from pruning.cli.plot import check_plotting, plot_layers

        check_plotting()
        drawn = [png for path, metrics in runs if (png := plot_layers(metrics, path.with_suffix(".png")))]
        log.info("report: %d plot(s) written next to their metrics files", len(drawn))
    if args.layers and not args.csv:
        for (_path, metrics), row in zip(runs, rows, strict=True):
            print(f"\n{row['file']}: {row['method']}\n" + format_layers(metrics))
    return 0


def _started(path: Path) -> tuple:
    """Oldest first: the UTC time in the name (``metrics_{method}_{type}_{time}.json``), then the file's mtime."""
    stamp = next((part for part in reversed(path.stem.split("_")) if part.endswith("Z") and "T" in part), "")
    try:
        mtime = path.stat().st_mtime_ns
    except OSError:
        mtime = 0
    return stamp, mtime, str(path)


def _read(path: Path) -> dict | None:
    try:
        metrics = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        log.warning("report: skipping %s: %s", path, err)
        return None
    if not isinstance(metrics, dict):
        log.warning("report: skipping %s: not a metrics object", path)
        return None
    return metrics


def report_row(path: Path, metrics: dict) -> dict:
    """One run's row (numbers as numbers; None where the run did not measure it)."""
    prune = metrics.get("prune") or {}
    labelled, kinds = layer_errors(prune.get("layers", []))
    errors = [value for _, value in labelled]
    return {
        "model": (metrics.get("config") or {}).get("model"),
        "method": method_line(metrics.get("prune_config") or {}),
        "sparsity": metrics.get("actual_sparsity"),
        "ppl": metrics.get("ppl_test"),
        "ppl_dense": metrics.get("ppl_dense"),
        "zero_shot_mean": zero_shot_mean(metrics.get("zero_shot")),
        "layer_error": sum(errors) / len(errors) if errors else None,
        "error_kind": "+".join(kinds) or None,
        "prune_s": prune.get("seconds"),
        "file": str(path),
    }


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1000 else f"{value:.1f}"
    return str(value)


def format_markdown(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cell(row[c]) for c in COLUMNS) + " |" for row in rows]
    return "\n".join(lines)


def format_csv(rows: list[dict]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows({c: ("" if row[c] is None else row[c]) for c in COLUMNS} for row in rows)
    return out.getvalue()


def format_layers(metrics: dict) -> str:
    layers = (metrics.get("prune") or {}).get("layers", [])
    if not layers:
        return "  (no per-layer record: nothing was pruned)"
    lines = ["  layer  sparsity  target  mean error  worst Linear"]
    for layer in layers:
        errors = layer.get("errors") or {}
        worst = max(errors.items(), key=lambda item: item[1]) if errors else None
        target = layer.get("target_sparsity")
        lines.append(
            f"  {layer.get('index', '?'):>5}  {layer.get('sparsity', float('nan')):.4f}  "
            f"{'-' if target is None else f'{target:.4f}':>6}  "
            f"{(sum(errors.values()) / len(errors)) if errors else float('nan'):>10.4g}  "
            + (f"{worst[0]} {worst[1]:.4g}" if worst else "-")
        )
    return "\n".join(lines)
