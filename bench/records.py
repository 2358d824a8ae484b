"""Benchmark records: one JSON line per measurement, with the environment that produced it."""

from __future__ import annotations

import datetime as dt
import json
import re
import subprocess
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


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
