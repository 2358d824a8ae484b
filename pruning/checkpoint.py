"""Layer checkpoints, so that a run cut off after layer k resumes there and ends bit for bit where an uninterrupted
run would (``--resume``).

After each decoder layer is pruned, its whole state (and any carried input permutation) is written to
``DIR/layer_NNNN.safetensors``, then ``DIR/manifest.json`` records it with its report, its zero counts and the
calibration batch size its outputs were computed with. Each file is written to a temporary name, flushed and
renamed, so a kill at any moment leaves the last complete layer. Resuming restores layers ``0..k-1`` and recomputes
layer k's inputs by running the restored layers over the calibration batches, the same forwards in the same
batches as the original run (cheaper than storing [nsamples, seqlen, hidden] activations, and exact). The manifest
also holds a fingerprint of everything that decides the result (the config, the calibration tokens' hash, the
model, the batch size, versions); a resume whose fingerprint differs is refused, naming what changed.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from pruning.permutation import PERMUTATION_ATTRIBUTE

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
_PERM_PREFIX = "__input_perm__."


class ResumeMismatchError(ValueError):
    """A checkpoint was written by a run with other settings."""


class LayerCheckpoint:
    """The layer checkpoints of one run in ``directory``; ``fingerprint``: what the caller adds to the driver's."""

    def __init__(self, directory: str | Path, fingerprint: dict | None = None):
        self.directory = Path(directory)
        self.fingerprint = dict(fingerprint or {})
        self.layers: list[dict] = []

    def open(self, fingerprint: dict) -> int:
        """Start or continue: the number of layers already done (0 for a new checkpoint). Raises
        :class:`ResumeMismatchError` when the checkpoint was written with other settings."""
        self.fingerprint = _jsonable({**self.fingerprint, **fingerprint})
        manifest = self.directory / MANIFEST
        if not manifest.is_file():
            self.layers = []
            self.directory.mkdir(parents=True, exist_ok=True)
            self._write_manifest()
            return 0
        try:
            saved = json.loads(manifest.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as err:
            raise ResumeMismatchError(f"the checkpoint in {str(self.directory)!r} is unreadable ({err}); remove it "
                                      "to start over") from None  # fmt: skip
        differences = _differences(saved.get("fingerprint", {}), self.fingerprint)
        if differences:
            raise ResumeMismatchError(
                f"the checkpoint in {str(self.directory)!r} was written with other settings ({'; '.join(differences)});"
                " rerun with the same flags, or remove the checkpoint to start over"
            )
        self.layers = [entry for entry in saved.get("layers", []) if (self.directory / entry["file"]).is_file()]
        for position, entry in enumerate(self.layers):  # only a complete prefix counts
            if entry["index"] != position:
                self.layers = self.layers[:position]
                break
        return len(self.layers)

    def restore_(self, layers: nn.ModuleList, count: int) -> None:
        """Load the first ``count`` checkpointed layers into ``layers`` (in place, exact)."""
        for entry in self.layers[:count]:
            layer = layers[entry["index"]]
            tensors = load_file(self.directory / entry["file"])
            perms = {k[len(_PERM_PREFIX) :]: v for k, v in tensors.items() if k.startswith(_PERM_PREFIX)}
            state = {k: v for k, v in tensors.items() if not k.startswith(_PERM_PREFIX)}
            own = layer.state_dict()
            missing = sorted(set(own) - set(state))
            if missing:
                raise ResumeMismatchError(f"checkpointed layer {entry['index']} lacks {', '.join(missing[:3])}")
            with torch.no_grad():
                for name, value in state.items():
                    own[name].copy_(value.to(own[name].device))
            for name, perm in perms.items():
                setattr(layer.get_submodule(name), PERMUTATION_ATTRIBUTE, perm.to(own_device(layer)))

    def save_layer(self, index: int, layer: nn.Module, record: dict) -> None:
        """Checkpoint a pruned layer (``record``: its report and counts, JSON-ready)."""
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in layer.state_dict().items()}
        for name, module in layer.named_modules():
            perm = getattr(module, PERMUTATION_ATTRIBUTE, None)
            if perm is not None:
                tensors[_PERM_PREFIX + name] = perm.detach().to("cpu").contiguous()
        file = f"layer_{index:04d}.safetensors"
        tmp = self.directory / f".{file}.tmp"
        save_file(_unshared(tensors), tmp)
        _fsync(tmp)
        os.replace(tmp, self.directory / file)
        self.layers = [e for e in self.layers if e["index"] < index] + [{"index": index, "file": file, **record}]
        self._write_manifest()

    def remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)

    def _write_manifest(self) -> None:
        text = json.dumps({"format_version": FORMAT_VERSION, "fingerprint": self.fingerprint, "layers": self.layers},
                          indent=1, sort_keys=True, default=str)  # fmt: skip
        tmp = self.directory / f".{MANIFEST}.tmp"
        tmp.write_text(text, encoding="utf-8")
        _fsync(tmp)
        os.replace(tmp, self.directory / MANIFEST)
        _fsync(self.directory)


def own_device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def _unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors sharing storage: give each its own copy where two share."""
    seen, out = set(), {}
    for name, tensor in tensors.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        out[name] = tensor.clone() if key in seen else tensor
        seen.add(key)
    return out


def _fsync(path: Path) -> None:
    flags = os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _jsonable(value):
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def _differences(saved: dict, now: dict) -> list[str]:
    out = []
    for key in sorted(set(saved) | set(now)):
        before, after = saved.get(key), now.get(key)
        if key == "prune_config" and isinstance(before, dict) and isinstance(after, dict):
            changed = [n for n in sorted(set(before) | set(after)) if before.get(n) != after.get(n)]
            out += [f"{n}: {before.get(n)!r} then, {after.get(n)!r} now" for n in changed]
        elif saved.get(key) != now.get(key):
            out.append(f"{key}: {saved.get(key)!r} then, {now.get(key)!r} now")
    return out
