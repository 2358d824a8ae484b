"""The end-of-run summary the CLI prints: what was pruned, how sparse, how good, how long, and where it went.

Human output only (floats rounded); ``metrics_*.json`` keeps every value at full precision.
"""

from __future__ import annotations


def format_summary(metrics: dict, model: str, kept: list[str]) -> str:
    """A few aligned lines from a run's metrics (``pruning.cli.prune.run_prune``) and the files it wrote."""
    prune = metrics.get("prune", {})
    rows = [
        ("model", model),
        ("method", method_line(metrics.get("prune_config", {}))),
        ("sparsity", f"{metrics.get('actual_sparsity', float('nan')):.4f} of the decoder-layer Linears' weights"),
    ]
    error = layer_error_line(prune.get("layers", []))
    if error:
        rows.append(("layer error", error))
    ppl, dense = metrics.get("ppl_test"), metrics.get("ppl_dense")
    if ppl is not None:
        rows.append(("perplexity", f"{ppl:.4f}" + (f" (dense {dense:.4f})" if dense is not None else "")))
    if "zero_shot" in metrics:
        rows.append(("zero-shot", zero_shot_line(metrics["zero_shot"])))
    seconds = prune.get("seconds")
    timing = f"pruning {seconds:.1f} s, " if seconds is not None else ""
    rows.append(("time", f"{timing}whole run {metrics.get('total_seconds', 0):.1f} s"))
    if kept:
        rows.append(("written", ", ".join(kept)))
    width = max(len(name) for name, _ in rows)
    return "\n".join(["summary"] + [f"  {name:<{width}}  {value}" for name, value in rows])


def method_line(config: dict) -> str:
    """``wanda 2:4 at 0.5 + permute_channels, refit``: the method, its pattern and its add-ons, from a prune_config."""
    kind = config.get("sparsity_type", "")
    ratio = "" if kind in ("three_tier", "hybrid_2_4") else f" at {config.get('sparsity_ratio', 0):g}"
    extras = [flag for flag, on in (("permute_channels", config.get("permute_channels")),
                                    (f"refine {config.get('refine')}", config.get("refine") not in (None, "none")),
                                    ("reconstruction", config.get("reconstruction")), ("refit", config.get("refit")),
                                    (f"allocation {config.get('allocation')}", config.get("allocation") == "owl"))
              if on]  # fmt: skip
    return f"{config.get('method', '?')} {kind}{ratio}" + (f" + {', '.join(extras)}" if extras else "")


def layer_errors(layers: list[dict]) -> tuple[list[tuple[str, float]], list[str]]:
    """(every pruned Linear's relative error, labelled ``layer I NAME``; how they were measured), from the
    report's per-layer records."""
    errors = [(f"layer {layer['index']} {name}", value) for layer in layers
              for name, value in (layer.get("errors") or {}).items()]  # fmt: skip
    kinds = sorted({layer.get("error_kind") for layer in layers if layer.get("errors")} - {None})
    return errors, kinds


def layer_error_line(layers: list[dict]) -> str:
    """The mean relative reconstruction error over every pruned Linear, how it was measured, and the worst one."""
    errors, kinds = layer_errors(layers)
    if not errors:
        return ""
    how = {
        "hessian": "exact, from X^T X",
        "norms": "diagonal proxy from ||X_j||",
        "weights": "||dW|| / ||W||, no activations",
    }
    mean = sum(value for _, value in errors) / len(errors)
    worst = max(errors, key=lambda item: item[1])
    measured = "; ".join(how.get(kind, kind) for kind in kinds)
    return f"{mean:.4g} mean over {len(errors)} Linears ({measured}), worst {worst[1]:.4g} at {worst[0]}"


def zero_shot_scores(results) -> dict[str, float]:
    """Each task's accuracy from whatever lm-eval returned (a dict per task, or a number); {} if none."""
    if not isinstance(results, dict):
        return {}
    scores = {}
    for task, value in results.items():
        if isinstance(value, dict):
            value = next((value[k] for k in ("acc,none", "acc", "acc_norm,none") if k in value), None)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            scores[task] = float(value)
    return scores


def zero_shot_mean(results) -> float | None:
    scores = zero_shot_scores(results)
    return sum(scores.values()) / len(scores) if scores else None


def zero_shot_line(results) -> str:
    """Each task's accuracy and their mean."""
    scores = zero_shot_scores(results)
    if not scores:
        return str(results)
    return ", ".join(f"{task} {score:.4f}" for task, score in scores.items()) + f"; mean {zero_shot_mean(results):.4f}"
