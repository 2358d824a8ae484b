"""Benchmark records: one JSON line per measurement, with the environment that produced it.

``record`` builds every suite's measurement: what was measured (suite, op, provider, label, shape, dtype), its
timing (median/p20/p80 ms, reps), ``gbps`` (``nbytes`` moved per median call), ``x_copy`` (median over a plain
copy's), ``speedup_vs_reference`` (the reference's median over this one), ``correct`` (None: not checked), and
the suite's own fields. ``bench.__main__`` adds the environment and the mode.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import subprocess
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def record(
    suite: str,
    op: str,
    provider: str,
    label: str,
    shape,
    dtype: torch.dtype,
    *,
    timing: dict,
    correct: bool | None,
    reference_ms: float | None = None,
    nbytes: int | None = None,
    copy_ms: float | None = None,
    **fields,
) -> dict:
    """One measurement as a JSON-ready dict; ``timing`` as ``bench.timing.time_op`` returns it (or ``once``'s);
    ratios are None where their denominator's measurement is missing."""
    median = timing["median_ms"]
    return {
        "suite": suite,
        "op": op,
        "provider": provider,
        "label": label,
        "shape": list(shape),
        "dtype": str(dtype).removeprefix("torch."),
        **timing,
        "gbps": nbytes / (median * 1e-3) / 1e9 if nbytes else None,
        "x_copy": median / copy_ms if copy_ms else None,
        "speedup_vs_reference": reference_ms / median if reference_ms else None,
        "correct": correct,
        **fields,
    }


def once(ms: float | None, reps: int) -> dict:
    """The timing of a value measured once (or averaged by the caller over ``reps``): median = p20 = p80."""
    return {"median_ms": ms, "p20_ms": ms, "p80_ms": ms, "reps": reps}


def environment(device: torch.device) -> dict[str, str | None]:
    import triton

    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=RESULTS_DIR.parent, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        sha = None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (triton interpreter)"
    return {
        "device": name,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "git_sha": sha,
    }


def default_results_path(env: dict[str, str | None]) -> Path:
    slug = re.sub(r"[^a-z0-9]+", "-", (env["device"] or "unknown").lower()).strip("-")
    return RESULTS_DIR / f"{dt.date.today().isoformat()}_{slug}.jsonl"


def write_jsonl(records: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, sort_keys=True) + "\n")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
