"""Print benchmark records as a table (separate from measuring): ``python -m bench.report FILE``.

One table per suite, in order of first appearance, each with the columns that suite's records carry.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from pathlib import Path

from bench.records import read_jsonl

Column = tuple[str, str | Callable[[object], str]]  # record key, format string or formatter

# What a record is: the columns every table starts with.
IDENTITY: list[Column] = [
    ("suite", "{}"),
    ("op", "{}"),
    ("provider", "{}"),
    ("label", "{}"),
    ("shape", "{}"),
    ("dtype", "{}"),
]

COLUMNS: list[Column] = [
    *IDENTITY,
    ("median_ms", "{:.3f}"),
    ("gbps", "{:.0f}"),
    ("x_copy", "{:.2f}"),
    ("speedup_vs_reference", "{:.1f}x"),
    ("correct", "{}"),
]

# Whole pruning runs: one wall time each, the peak memory, and how far the two providers' masks agree.
E2E_COLUMNS: list[Column] = [
    *IDENTITY,
    ("seconds", "{:.2f}"),
    ("peak_gpu_memory_bytes", lambda v: f"{v / 2**30:.1f} GiB"),
    ("actual_sparsity", "{:.4f}"),
    ("speedup_vs_reference", "{:.2f}x"),
    ("mask_diff_layer0", "{:.1e}"),
    ("mask_diff_fraction", "{:.1e}"),
    ("correct", "{}"),
]


def _decode_profile(profile: dict) -> str:
    """Where a decode token's GPU time went: kernels per token, then GPU microseconds by kind."""
    if "error" in profile:
        return "profile failed"
    parts = [f"{profile['kernels_per_step']:.0f} kernels"]
    for kind in ("linear", "attention", "other"):
        parts.append(f"{kind} {profile[f'{kind}_us_per_step']:.0f} us")
    return ", ".join(parts)


# Sparse vs dense inference: time per call (per token for decode), tokens/s, speed-up over dense.
INFERENCE_COLUMNS: list[Column] = [
    *IDENTITY,
    ("median_ms", "{:.3f}"),
    ("tokens_per_s", "{:.0f}"),
    ("speedup_vs_reference", "{:.2f}x"),
    ("cuda_graph", "{}"),
    ("correct", "{}"),
    ("kernel_profile", _decode_profile),
]

COLUMNS_BY_SUITE: dict[str | None, list[Column]] = {"e2e": E2E_COLUMNS, "inference": INFERENCE_COLUMNS}


def _cell(name: str, fmt, value) -> str:
    if value is None:
        return "-"
    if name == "shape":
        value = "x".join(map(str, value))
    return fmt(value) if callable(fmt) else fmt.format(value)


def _table(records: list[dict], columns: list[Column]) -> str:
    rows = [[name for name, _ in columns]]
    rows += [[_cell(name, fmt, r.get(name)) for name, fmt in columns] for r in records]
    widths = [max(len(row[i]) for row in rows) for i in range(len(columns))]
    lines = ["| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def _superseded(records: list[dict]) -> list[dict]:
    """Drop each record marked ``compared: False`` (written before its reference ran) that a later record of the
    same op, provider and label completes."""

    def key(r: dict) -> tuple:
        return r.get("suite"), r.get("op"), r.get("provider"), r.get("label")

    kept = []
    for i, r in enumerate(records):
        if r.get("compared") is False and any(key(later) == key(r) for later in records[i + 1 :]):
            continue
        kept.append(r)
    return kept


def log_record(record: dict) -> None:
    """One line per record as it is measured (the log then holds the numbers even if the JSON file is lost)."""
    columns = COLUMNS_BY_SUITE.get(record.get("suite"), COLUMNS)
    cells = [f"{name}={_cell(name, fmt, record.get(name))}" for name, fmt in columns if record.get(name) is not None]
    logging.getLogger("bench").info("record: %s", " ".join(cells))


def format_table(records: list[dict]) -> str:
    by_suite: dict[str | None, list[dict]] = {}
    for r in _superseded(records):
        by_suite.setdefault(r.get("suite"), []).append(r)
    if not by_suite:
        return _table([], COLUMNS)
    return "\n\n".join(_table(rs, COLUMNS_BY_SUITE.get(suite, COLUMNS)) for suite, rs in by_suite.items())


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m bench.report RESULTS.jsonl", file=sys.stderr)
        return 2
    print(format_table(read_jsonl(Path(args[0]))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
