"""What checkpoint integrity costs: ``python -m bench.integrity [--model opt-1.3b] [--dtype float16]``.

Saves a random-weight model of a registry shape (dense and sparse24), then times, each the median of a few runs
from the page cache: reading the weight files, hashing them (``pruning.checksums.hash_file``: file and per-tensor
SHA-256 in one pass), ``load_model`` (the CLI's loader, no verification) and ``load_sparse`` with and without
``verify=True``. Prints one JSON line per measurement.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench.fixtures.models import build_random_opt


def _median_seconds(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _read(path: Path) -> None:
    with path.open("rb") as f:
        while f.read(16 << 20):
            pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.integrity", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="opt-1.3b")
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args(argv)

    import pruning
    from pruning import checksums
    from pruning.cli.outputs import save_model_atomically
    from pruning.loading import load_model
    from pruning.sparse24 import load_sparse

    dtype = getattr(torch, args.dtype)
    model = build_random_opt(args.model, torch.device("cpu"), dtype)
    pruning.prune_model(model, None, "magnitude", 0.5, "2:4")
    with tempfile.TemporaryDirectory(prefix="bench-integrity-") as tmp:
        dense, sparse = Path(tmp) / "dense", Path(tmp) / "sparse"
        save_model_atomically(model, None, dense, overwrite=False)
        save_model_atomically(model, None, sparse, overwrite=False, save_format="sparse24")
        del model
        records = []
        for label, directory in (("dense", dense), ("sparse24", sparse)):
            weights = sorted(directory.glob("*.safetensors"))
            size = sum(p.stat().st_size for p in weights)
            read_s = _median_seconds(lambda ws=weights: [_read(p) for p in ws], args.reps)
            hash_s = _median_seconds(lambda ws=weights: [checksums.hash_file(p) for p in ws], args.reps)
            records += [
                {"op": "read", "format": label, "gb": size / 1e9, "seconds": read_s, "gb_per_s": size / 1e9 / read_s},
                {"op": "sha256", "format": label, "gb": size / 1e9, "seconds": hash_s, "gb_per_s": size / 1e9 / hash_s},
            ]
        dtype_name = args.dtype
        load_s = _median_seconds(lambda: load_model(str(dense), dtype=dtype_name), args.reps)
        records.append({"op": "load_model", "format": "dense", "seconds": load_s})
        for verify in (False, True):
            seconds = _median_seconds(lambda v=verify: load_sparse(sparse, verify=v), args.reps)
            records.append({"op": "load_sparse", "format": "sparse24", "verify": verify, "seconds": seconds})
    env = {"model": args.model, "dtype": args.dtype, "torch": torch.__version__, "device": "cpu"}
    for record in records:
        print(json.dumps({**record, **env}, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
