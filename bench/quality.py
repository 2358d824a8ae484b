"""Pruning quality on a real model: WikiText-2 perplexity of SmolLM2-135M, dense and pruned, through one harness.

    python -m bench.quality [--nsamples N] [--seqlen L] [--eval-windows W|all] [--ablations] [--tiers] [--out FILE]

Protocol (SparseGPT / Wanda): the evaluation text is ``"\\n\\n".join(wikitext-2-raw-v1 test)`` tokenized once
and cut into disjoint windows of ``seqlen`` (``--eval-windows``: the first W of them); calibration is ``nsamples``
random windows (seed 0) of WikiText-2 *validation* text, so no evaluated token is also a calibration token.
Every method sees the same calibration ids and the same evaluation windows; each record holds the measured
sparsity and the settings. The published protocol is 128x2048 calibration and the whole test set
(``bench/gpu_check.sh`` runs it where a GPU is); on CPU a smaller calibration and the first windows are used,
and the README says which. Records append to bench/results/ one by one, so a run that is cut off keeps them.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import time
from pathlib import Path

import torch

from bench.records import RESULTS_DIR, environment, write_jsonl

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
EVAL_TEXT = SHARED_DATA / "wikitext2" / "wiki.test.raw.joined.txt"
CALIBRATION_TEXT = SHARED_DATA / "wikitext2" / "wiki.valid.tokens"
METHODS = ("magnitude", "wanda", "sparsegpt")
SETTINGS = [(0.5, "unstructured"), (0.5, "2:4"), (0.5, "4:8"), (0.6, "unstructured"), (0.7, "unstructured")]
# locuslab/wanda's ablations: SparseGPT's weight update with the mask chosen by Wanda's or the magnitude metric
ABLATIONS = ("ablate_mag_seq", "ablate_wanda_seq", "ablate_mag_iter", "ablate_wanda_iter")
ABLATION_SETTINGS = [(0.5, "unstructured"), (0.5, "2:4")]
# Tile pruning (Jiajun-Ji/wanda's shipped setting) and each balanced ingredient; unstructured at the fork's
# measured sparsity ("matched"); OWL against uniform at 60% and 70%.
FORK_TIERS = {"block_size": 16, "top_dense_ratio": 0.35, "mid_2_4_ratio": 0.45, "bottom_topk_ratio": 0.2,
              "topk_per_block": 15}  # fmt: skip
MATCHED = "matched"  # a sparsity ratio resolved to the fork three_tier run's measured sparsity
TIER_CONFIGS = [
    *[("wanda", 0.0, "three_tier", {**FORK_TIERS, "tier_selection": s})
      for s in ("fork", "metric", "bands", "obs", "metric+bands", "balanced", "cost", "metric+bands+cost",
                "metric+bands+cost+obs")],
    ("wanda", 0.0, "hybrid_2_4", {}),
    ("wanda", MATCHED, "unstructured", {}),
    ("sparsegpt", MATCHED, "unstructured", {}),
    ("wanda", 0.5, "2:4", {}),
    *[(method, ratio, "unstructured", {"allocation": allocation})
      for method in ("wanda", "sparsegpt") for ratio in (0.6, 0.7) for allocation in ("uniform", "owl")],
    *[("wanda", 0.0, "three_tier", {**FORK_TIERS, "tier_selection": s, "allocation": "owl"})
      for s in ("fork", "balanced")],
]  # fmt: skip


# Better masks (RIA, channel permutation, DSnoT, the fixed-mask OBS update): each ingredient alone and together,
# for Wanda, RIA and SparseGPT, at 2:4 and 50% unstructured; the rows that decide the recommendation first.
PERM, DSNOT, RECON = {"permute_channels": True}, {"refine": "dsnot"}, {"reconstruction": True}
REFIT = {"refit": True}
MASK_CONFIGS = [
    ("sparsegpt", 0.5, "2:4", {}),
    ("ria", 0.5, "2:4", {**PERM, **DSNOT, **RECON}),
    ("wanda", 0.5, "2:4", {}),
    ("ria", 0.5, "2:4", {}),
    ("wanda", 0.5, "2:4", PERM),
    ("ria", 0.5, "2:4", PERM),
    ("wanda", 0.5, "2:4", DSNOT),
    ("ria", 0.5, "2:4", DSNOT),
    ("ria", 0.5, "2:4", RECON),
    ("ria", 0.5, "2:4", {**PERM, **RECON}),
    ("sparsegpt", 0.5, "2:4", PERM),
    ("sparsegpt", 0.5, "2:4", DSNOT),
    ("sparsegpt", 0.5, "unstructured", {}),
    ("ria", 0.5, "unstructured", {**DSNOT, **RECON}),
    ("wanda", 0.5, "unstructured", {}),
    ("ria", 0.5, "unstructured", {}),
    ("wanda", 0.5, "unstructured", DSNOT),
    ("ria", 0.5, "unstructured", DSNOT),
    ("ria", 0.5, "unstructured", RECON),
    ("sparsegpt", 0.5, "unstructured", DSNOT),
    ("ria", 0.5, "2:4", {**PERM, "lsa": True}),
    ("wanda", 0.5, "2:4", {"refine": "dsnot", "dsnot_skip_layer": "no_skip"}),
    # after the first pass: SparseGPT's own mask choice beats every fixed mask here, so its family goes further
    ("sparsegpt", 0.5, "2:4", {**PERM, "lsa": True}),
    ("ablate_wanda_iter", 0.5, "2:4", {}),
    ("ablate_wanda_iter", 0.5, "2:4", PERM),
    ("wanda", 0.5, "2:4", {**PERM, **RECON}),
    ("wanda", 0.5, "unstructured", RECON),
    ("wanda", 0.5, "unstructured", {**DSNOT, **RECON}),
    ("ablate_wanda_iter", 0.5, "unstructured", {}),
    # the least-squares refit on the final mask (pruning.methods.refit), after SparseGPT's own update
    ("sparsegpt", 0.5, "unstructured", REFIT),
    ("sparsegpt", 0.5, "2:4", {**PERM, **REFIT}),
    ("sparsegpt", 0.5, "2:4", REFIT),
    ("wanda", 0.5, "unstructured", REFIT),
    ("sparsegpt", 0.5, "unstructured", {**REFIT, "refit_iters": 50}),
    ("wanda", 0.5, "2:4", {**PERM, **REFIT}),
    ("sparsegpt", 0.5, "2:4", {**PERM, **REFIT, "refit_iters": 50}),
]

# Optimization-based pruners (ALPS, the ADMM update) against SparseGPT at its settings, and ADMM as a weight update
OPTIMIZER_SETTINGS = [(0.5, "2:4"), (0.7, "unstructured"), (0.6, "unstructured"), (0.5, "unstructured")]
OPTIMIZER_CONFIGS = [
    *[(method, ratio, kind, {}) for ratio, kind in OPTIMIZER_SETTINGS for method in ("sparsegpt", "alps", "admm")],
    *[("wanda", ratio, kind, {"refine": "admm"}) for ratio, kind in OPTIMIZER_SETTINGS],
]


def configs(ablations: bool, tiers: bool = False, masks: bool = False, optimizers: bool = False) -> list[tuple]:
    """(method, sparsity ratio, sparsity type[, options]), the main table first, grouped by setting; ``tiers``:
    only the tile pruning and OWL suite; ``masks``: only the RIA / permutation / DSnoT suite; ``optimizers``: only
    ALPS and ADMM against SparseGPT."""
    if tiers:
        return list(TIER_CONFIGS)
    if masks:
        return list(MASK_CONFIGS)
    if optimizers:
        return list(OPTIMIZER_CONFIGS)
    main = [(method, ratio, kind) for ratio, kind in SETTINGS for method in METHODS]
    extra = [(method, ratio, kind) for ratio, kind in ABLATION_SETTINGS for method in ABLATIONS]
    return main + (extra if ablations else [])


def label(method: str, kind: str, options: dict) -> str:
    """A record's row name: the method, with its tile selection or its allocation."""
    owl = " owl" if options.get("allocation") == "owl" else ""
    if kind in ("three_tier", "hybrid_2_4"):
        return f"{method} {kind}" + (f" {options['tier_selection']}" if "tier_selection" in options else "") + owl
    parts = [method]
    if options.get("permute_channels"):
        parts.append("+perm" + ("+lsa" if options.get("lsa") else ""))
    if options.get("refine") == "dsnot":
        parts.append("+dsnot" + ("(all layers)" if options.get("dsnot_skip_layer") == "no_skip" else ""))
    if options.get("refine") == "admm":
        parts.append("+admm")
    if options.get("reconstruction"):
        parts.append("+recon")
    if options.get("refit"):
        parts.append("+refit" + (f"({options['refit_iters']})" if "refit_iters" in options else ""))
    return " ".join(parts) + owl


def run(
    model_dir: Path,
    out: Path,
    nsamples: int,
    seqlen: int,
    eval_windows: int | None,
    todo: list[tuple[str, float, str]],
    eval_text: Path = EVAL_TEXT,
    calibration_text: Path = CALIBRATION_TEXT,
) -> list[dict]:
    import pruning
    from pruning.data import get_calibration_ids, get_eval_ids
    from pruning.evaluate import perplexity
    from pruning.loading import load_model, load_tokenizer

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = "float16" if device.type == "cuda" else "float32"
    dense = load_model(str(model_dir), dtype=dtype).to(device)
    tokenizer = load_tokenizer(str(model_dir))
    eval_ids = get_eval_ids(str(eval_text), tokenizer)
    available = eval_ids.shape[1] // seqlen
    windows = available if eval_windows is None else min(eval_windows, available)
    eval_ids = eval_ids[:, : windows * seqlen]
    calibration_ids = get_calibration_ids(str(calibration_text), tokenizer, nsamples, seqlen, seed=0)
    common = {
        "suite": "quality", "model": model_dir.name, "dtype": dtype, "seqlen": seqlen, "nsamples": nsamples,
        "calibration": f"{calibration_text.name}, {nsamples} random windows, seed 0", "evaluation": eval_text.name,
        "eval_windows": windows, "eval_windows_available": available, "eval_tokens": int(eval_ids.shape[1]),
        "date": dt.date.today().isoformat(), **environment(device),
    }  # fmt: skip
    import transformers

    common["transformers"] = transformers.__version__

    def measure(model) -> tuple[float, float]:
        t0 = time.perf_counter()
        ppl = perplexity(model, eval_ids, seqlen, batch_size=1 if device.type == "cpu" else 8, progress=False)
        return ppl, time.perf_counter() - t0

    records = []

    def keep(record: dict) -> None:
        records.append(record)
        write_jsonl([record], out)
        print(format_row(record), flush=True)

    ppl, eval_seconds = measure(dense)
    keep({**common, "method": "dense", "sparsity_type": "-", "sparsity_ratio": 0.0, "sparsity": 0.0, "ppl": ppl,
          "prune_seconds": 0.0, "eval_seconds": eval_seconds})  # fmt: skip
    matched = None  # the fork three_tier run's measured sparsity, for the MATCHED rows
    for method, ratio, kind, *rest in todo:
        options = dict(rest[0]) if rest else {}
        if ratio == MATCHED:
            if matched is None:
                raise ValueError("a 'matched' row needs the fork three_tier row before it")
            ratio = round(matched, 4)
        model = copy.deepcopy(dense)
        t0 = time.perf_counter()
        report = pruning.prune_model(model, calibration_ids, method, ratio, kind, **options)
        prune_seconds = time.perf_counter() - t0
        ppl, eval_seconds = measure(model)
        if kind == "three_tier" and options.get("tier_selection") == "fork" and "allocation" not in options:
            matched = report.actual_sparsity
        record = {**common, "method": method, "sparsity_type": kind, "sparsity_ratio": ratio,
                  "sparsity": report.actual_sparsity, "ppl": ppl, "prune_seconds": prune_seconds,
                  "eval_seconds": eval_seconds, "backend": report.backend}  # fmt: skip
        if options or kind in ("three_tier", "hybrid_2_4"):
            record.update(label=label(method, kind, options), options=options)
        if report.tiers is not None:
            record["tiers"] = report.tiers
        if report.allocation == "owl":
            record["layer_sparsities"] = [layer.target_sparsity for layer in report.layers]
        errors = [layer.errors for layer in report.layers]
        if any(errors):
            values = [e for layer in errors for e in layer.values()]
            record.update(error_kind=report.layers[0].error_kind, mean_error=sum(values) / len(values),
                          layer_errors=errors)  # fmt: skip
        keep(record)
        del model
    return records


def setting_label(record: dict) -> str:
    if record["method"] == "dense":
        return "dense"
    kind = record["sparsity_type"]
    return kind if kind != "unstructured" else f"{round(record['sparsity_ratio'] * 100)}%"


def format_row(record: dict) -> str:
    name = record.get("label", record["method"])
    error = f"  error {record['mean_error']:.4f}" if "mean_error" in record else ""
    return (f"{name:32s} {setting_label(record):6s} sparsity {record['sparsity']:.4f}  "
            f"ppl {record['ppl']:10.3f}  prune {record['prune_seconds']:7.1f} s{error}")  # fmt: skip


def format_list(records: list[dict]) -> str:
    """Markdown: one row per record, in run order (the tile and OWL suite)."""
    lines = ["| run | measured sparsity | perplexity | tiles dense / 2:4 / top-k |", "|---|---|---|---|"]
    for r in records:
        name = r.get("label", r["method"]) + ("" if r["method"] == "dense" else f" ({setting_label(r)})")
        if r["sparsity_type"] in ("three_tier", "hybrid_2_4"):
            name = r.get("label") or label(r["method"], r["sparsity_type"], r.get("options", {}))
        tiers = r.get("tiers")
        cell = f"{tiers['dense']} / {tiers['2:4']} / {tiers['topk']}" if tiers else ""
        lines.append(f"| {name} | {100 * r['sparsity']:.2f}% | {r['ppl']:.2f} | {cell} |")
    return "\n".join(lines)


def format_table(records: list[dict]) -> str:
    """Markdown: a row per method, a column per setting; each cell the perplexity (measured sparsity)."""
    columns = ["50%", "2:4", "4:8", "60%", "70%"]
    dense = next((r for r in records if r["method"] == "dense"), None)
    lines = ["| method | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    if dense:
        lines.append(f"| dense | {dense['ppl']:.2f} (0%) |" + " |" * (len(columns) - 1))
    methods = list(dict.fromkeys(r.get("label", r["method"]) for r in records if r["method"] != "dense"))
    for method in methods:
        cells = {setting_label(r): r for r in records if r.get("label", r["method"]) == method}
        row = [f"{cells[c]['ppl']:.2f} ({100 * cells[c]['sparsity']:.1f}%)" if c in cells else "" for c in columns]
        lines.append(f"| {method} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from pruning.smollm2 import Unavailable, smollm2_model_dir

    parser = argparse.ArgumentParser(prog="python -m bench.quality", description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="model folder (default: SmolLM2-135M, fetched)")
    parser.add_argument("--nsamples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--eval-windows", default="all", help="the first W test windows, or 'all'")
    parser.add_argument("--ablations", action="store_true", help="also Wanda's ablate_* methods")
    parser.add_argument("--tiers", action="store_true", help="the tile pruning and OWL suite instead of the table")
    parser.add_argument("--masks", action="store_true", help="the RIA / permutation / DSnoT suite instead")
    parser.add_argument("--optimizers", action="store_true", help="ALPS and ADMM against SparseGPT instead")
    parser.add_argument("--only", default=None, help="comma-separated methods to run (default: all)")
    parser.add_argument("--out", type=Path, default=None, help="JSON-lines file (default: bench/results/)")
    args = parser.parse_args(argv)
    for path in (EVAL_TEXT, CALIBRATION_TEXT):
        if not path.is_file():
            print(f"{path} not found (../shared/data/wikitext2); nothing to measure")
            return 2
    try:
        model_dir = args.model or smollm2_model_dir()
    except Unavailable as err:
        print(f"SmolLM2-135M is not available here: {err}")
        return 2
    windows = None if args.eval_windows == "all" else int(args.eval_windows)
    todo = configs(args.ablations, args.tiers, args.masks, args.optimizers)
    if args.only:
        todo = [c for c in todo if c[0] in args.only.split(",")]
    device = "gpu" if torch.cuda.is_available() else "cpu"
    out = args.out or RESULTS_DIR / f"{dt.date.today().isoformat()}_quality-{model_dir.name.lower()}-{device}.jsonl"
    records = run(model_dir, out, args.nsamples, args.seqlen, windows, todo)
    print("\n" + (format_list(records) if args.tiers or args.masks else format_table(records)))
    print(f"\n{len(records)} records appended to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
