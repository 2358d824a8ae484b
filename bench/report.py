"""Print benchmark records as a table (separate from measuring): ``python -m bench.report FILE``."""

from __future__ import annotations

import sys
from pathlib import Path

from bench.records import read_jsonl

COLUMNS = [
    ("suite", "{}"),
    ("op", "{}"),
    ("provider", "{}"),
    ("label", "{}"),
    ("shape", "{}"),
    ("dtype", "{}"),
    ("median_ms", "{:.3f}"),
    ("gbps", "{:.0f}"),
    ("x_copy", "{:.2f}"),
    ("speedup_vs_reference", "{:.1f}x"),
    ("correct", "{}"),
]


def format_table(records: list[dict]) -> str:
    rows = [[name for name, _ in COLUMNS]]
    for r in records:
        cells = []
        for name, fmt in COLUMNS:
            value = r.get(name)
            cells.append("-" if value is None else fmt.format("x".join(map(str, value)) if name == "shape" else value))
        rows.append(cells)
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    lines = ["| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m bench.report RESULTS.jsonl", file=sys.stderr)
        return 2
    print(format_table(read_jsonl(Path(args[0]))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
