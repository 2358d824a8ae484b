"""``--plot`` / ``wanda-prune report DIR --plot``: a run's per-layer sparsity and reconstruction error as a PNG
next to its metrics file (matplotlib, the optional ``plot`` extra); a failure is a warning, never a lost result."""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'wanda-kernels[plot]' (matplotlib)"


def check_plotting() -> None:
    """Before any work: ``--plot`` needs matplotlib."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ValueError(f"--plot draws with matplotlib, which is not installed: {INSTALL_HINT}") from None


def plot_layers(metrics: dict, png: Path) -> Path | None:
    """Draw ``metrics``' per-layer sparsity (measured and asked) and mean error; returns the file, None if it
    could not be written (logged)."""
    layers = (metrics.get("prune") or {}).get("layers") or []
    if not layers:
        log.warning("--plot: %s has no per-layer record (nothing was pruned); no plot", png.with_suffix(".json").name)
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        from pruning.cli.summary import method_line

        index = [layer["index"] for layer in layers]
        figure, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(8, 5.5))
        top.plot(index, [layer["sparsity"] for layer in layers], "o-", label="measured")
        targets = [layer.get("target_sparsity") for layer in layers]
        if any(t is not None for t in targets):
            top.plot(index, targets, "x--", label="asked")
        top.set_ylabel("sparsity")
        top.legend(loc="best")
        errors = [layer.get("errors") or {} for layer in layers]
        mean = [sum(e.values()) / len(e) if e else float("nan") for e in errors]
        worst = [max(e.values()) if e else float("nan") for e in errors]
        bottom.plot(index, mean, "o-", label="mean over the layer's Linears")
        bottom.plot(index, worst, "v:", label="worst Linear")
        kind = next((layer.get("error_kind") for layer in layers if layer.get("error_kind")), "?")
        bottom.set_ylabel(f"relative error ({kind})")
        bottom.set_xlabel("decoder layer")
        bottom.legend(loc="best")
        figure.suptitle(method_line(metrics.get("prune_config") or {}))
        figure.tight_layout()
        figure.savefig(png, dpi=110)
        plt.close(figure)
    except Exception as err:  # a plot is a convenience: it must not cost the results already written
        log.warning("--plot: could not draw %s (%s: %s)", png, type(err).__name__, err)
        return None
    return png
