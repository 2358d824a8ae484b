"""Checksums of a saved checkpoint: SHA-256 of each weight file and of each tensor in it, written at save time
to ``checksums.json`` and verified on request (``wanda-prune check``, ``load_sparse(verify=True)``).

A ``.safetensors`` file is hashed tensor by tensor (the header's ``data_offsets``), in parallel threads; the
file's digest is the SHA-256 of its header's, its tensors' and its tail's digests, so a mismatch names the tensors
that changed. Any other file is one SHA-256. Cost against reading: README ("What happens when things go wrong").
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

MANIFEST = "checksums.json"
ALGORITHM = "sha256"
CHUNK = 16 << 20


def _tensor_ranges(path: Path) -> tuple[int, list[tuple[str, int, int]]] | None:
    """(data start, [(name, begin, end)] in file order) from a safetensors header, or None if it is damaged."""
    try:
        with path.open("rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > path.stat().st_size:
                return None
            header = json.loads(f.read(header_len))
        start = 8 + header_len
        ranges = [(name, *map(int, spec["data_offsets"])) for name, spec in header.items() if name != "__metadata__"]
    except (OSError, ValueError, struct.error, KeyError, TypeError, AttributeError):
        return None
    return start, sorted(ranges, key=lambda r: (r[1], r[2]))


def _hash_range(descriptor: int, begin: int, end: int) -> str:
    digest = hashlib.sha256()
    while begin < end:
        chunk = os.pread(descriptor, min(CHUNK, end - begin), begin)
        if not chunk:
            break  # the file ends early: the recorded size tells
        digest.update(chunk)
        begin += len(chunk)
    return digest.hexdigest()


def hash_file(path: Path, workers: int | None = None) -> dict:
    """{"bytes", "sha256"} of a file; for a readable safetensors file also "tensors": {name: sha256}, and then
    "sha256" is the digest of the header bytes, each tensor's digest in file order, and any bytes after the last
    tensor, so that tensors hash in parallel (hashlib releases the GIL) and one read serves both."""
    size = path.stat().st_size
    layout = _tensor_ranges(path) if path.suffix == ".safetensors" else None
    if layout is not None:
        start, ranges = layout
        if any(b < a_end for (_, _, a_end), (_, b, _) in zip(ranges, ranges[1:], strict=False)):
            layout = None  # overlapping ranges: not a layout to hash tensor by tensor
    descriptor = os.open(path, os.O_RDONLY)
    try:
        if layout is None:
            return {"bytes": size, ALGORITHM: _hash_range(descriptor, 0, size)}
        workers = workers or min(8, os.cpu_count() or 1)
        spans: list[tuple[str | None, int, int]] = [(None, 0, start)]  # (tensor or None for the bytes between)
        position = start
        for name, begin, end in ranges:
            if start + begin > position:
                spans.append((None, position, start + begin))
            spans.append((name, start + begin, start + end))
            position = start + end
        spans.append((None, position, size))
        with ThreadPoolExecutor(max_workers=workers) as pool:
            digests = list(pool.map(lambda span: _hash_range(descriptor, span[1], span[2]), spans))
    finally:
        os.close(descriptor)
    combined = hashlib.sha256("".join(digests).encode())
    tensors = {name: digest for (name, _, _), digest in zip(spans, digests, strict=True) if name is not None}
    return {"bytes": size, ALGORITHM: combined.hexdigest(), "tensors": tensors}


def covered_files(directory: Path) -> list[Path]:
    """What the checksums cover: the weight files, their index and config.json."""
    names = sorted(p.name for p in directory.glob("*.safetensors"))
    names += [n for n in ("model.safetensors.index.json", "config.json") if (directory / n).is_file()]
    return [directory / n for n in names]


def record(directory: Path) -> Path:
    """Hash the checkpoint in ``directory`` and write its ``checksums.json``."""
    files = {path.name: hash_file(path) for path in covered_files(directory)}
    manifest = directory / MANIFEST
    manifest.write_text(json.dumps({"algorithm": ALGORITHM, "files": files}, indent=1, sort_keys=True) + "\n")
    return manifest


@dataclass
class Verification:
    recorded: bool  # a checksums.json was there to verify against
    problems: list[str] = field(default_factory=list)
    files: int = 0
    bytes: int = 0
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.recorded and not self.problems


def _changed_tensors(recorded: dict, now: dict) -> str:
    if "tensors" not in now:
        return "its header is damaged"
    before, after = recorded.get("tensors", {}), now["tensors"]
    changed = sorted(n for n in before if before[n] != after.get(n))
    added = sorted(set(after) - set(before))
    parts = []
    if changed:
        parts.append(f"{len(changed)} tensors differ from when it was saved ({', '.join(changed[:3])}"
                     f"{', ...' if len(changed) > 3 else ''})")  # fmt: skip
    if added:
        parts.append(f"{len(added)} tensors were not there ({', '.join(added[:3])})")
    return "; ".join(parts) or "its header or padding differs from when it was saved"


def verify(directory: Path) -> Verification:
    """Compare the checkpoint in ``directory`` with its ``checksums.json``: every difference is one problem."""
    directory = Path(directory)
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        return Verification(recorded=False)
    started = time.perf_counter()
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
        if manifest.get("algorithm") != ALGORITHM or not isinstance(files, dict):
            raise ValueError
    except (OSError, ValueError, KeyError, TypeError):
        return Verification(recorded=True, problems=[f"{MANIFEST} is damaged; nothing can be verified"])
    result = Verification(recorded=True)
    for name, expected in sorted(files.items()):
        path = directory / name
        if not path.is_file():
            result.problems.append(f"{name} is missing")
            continue
        now = hash_file(path)
        result.files += 1
        result.bytes += now["bytes"]
        if not isinstance(expected, dict) or now[ALGORITHM] == expected.get(ALGORITHM):
            continue
        if now["bytes"] != expected.get("bytes"):
            result.problems.append(f"{name} has {now['bytes']} bytes, {expected.get('bytes')} when it was saved")
        elif path.suffix == ".safetensors":
            result.problems.append(f"{name}: {_changed_tensors(expected, now)}")
        else:
            result.problems.append(f"{name} differs from when it was saved")
    for path in covered_files(directory):
        if path.name not in files:
            result.problems.append(f"{path.name} was not part of the checkpoint when it was saved")
    result.seconds = time.perf_counter() - started
    return result


def tensor_sha256(ids) -> str | None:
    """SHA-256 of a token-id tensor's int64 bytes: which calibration or evaluation tokens a run used, exactly."""
    if ids is None:
        return None
    import torch

    return hashlib.sha256(ids.detach().to("cpu", torch.int64).contiguous().numpy().tobytes()).hexdigest()
