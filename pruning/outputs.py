"""Writing results: Wanda's log file, metrics.json, and a saved model, without losing what exists."""

from __future__ import annotations

import json
import platform
import shutil
import tempfile
from pathlib import Path


def check_save_dir(path: str) -> Path:
    """Create ``--save`` now and prove it is writable, so a long run cannot fail at its very end."""
    directory = Path(path).expanduser()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".write-test-"):
            pass
    except OSError as err:
        raise ValueError(f"cannot write to --save directory {str(directory)!r}: {err.strerror or err}") from None
    return directory


def check_save_model_dir(path: str, overwrite: bool) -> Path:
    target = Path(path).expanduser()
    if target.exists() and not overwrite:
        raise ValueError(f"--save_model directory {str(target)!r} already exists; pass --overwrite to replace it")
    parent = target.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=parent, prefix=".write-test-"):
            pass
    except OSError as err:
        raise ValueError(f"cannot write --save_model into {str(parent)!r}: {err.strerror or err}") from None
    return target


def write_wanda_log(directory: Path, method: str, actual_sparsity: float, ppl_test: float | None) -> Path:
    """``log_{method}.txt`` with locuslab/wanda's columns: method, actual_sparsity, ppl_test."""
    path = directory / f"log_{method}.txt"
    ppl = "nan" if ppl_test is None else f"{ppl_test:.4f}"
    path.write_text(f"method\tactual_sparsity\tppl_test\n{method}\t{actual_sparsity:.4f}\t{ppl}\n", encoding="utf-8")
    return path


def versions() -> dict[str, str | None]:
    import torch
    import transformers

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton_version,
        "transformers": transformers.__version__,
        "cuda": torch.version.cuda,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
    }


def write_metrics(directory: Path, metrics: dict) -> Path:
    path = directory / "metrics.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(metrics, indent=2, sort_keys=True, default=str), encoding="utf-8")
    tmp.replace(path)
    return path


def save_model_atomically(model, tokenizer, target: Path, overwrite: bool) -> Path:
    """Write into a temporary sibling directory, then rename: a crash never leaves a half-written model,
    and an existing directory is only replaced (with --overwrite) once the new one is complete."""
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.partial-"))
    try:
        model.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if target.exists():
        if not overwrite:
            shutil.rmtree(staging, ignore_errors=True)
            raise ValueError(f"--save_model directory {str(target)!r} appeared during the run; not replacing it")
        backup = target.with_name(f".{target.name}.old")
        shutil.rmtree(backup, ignore_errors=True)
        target.rename(backup)
        staging.rename(target)
        shutil.rmtree(backup, ignore_errors=True)
    else:
        staging.rename(target)
    return target
