"""Where a decoder layer runs: its own device, or the GPU when it sits in CPU RAM (streamed, ``offload``).

Streaming is what lets a model larger than GPU memory be pruned and evaluated: only one decoder layer and the
calibration activations need to be on the GPU at once.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch
from torch import nn

from pruning.adapters import DecoderAdapter
from pruning.errors import OptionError

log = logging.getLogger(__name__)


def to_device(obj, device: torch.device):
    """Move every tensor in a nested tuple/list/dict to ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, tuple):
        return tuple(to_device(o, device) for o in obj)
    if isinstance(obj, list):
        return [to_device(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


def module_device(module: nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    for b in module.buffers():
        return b.device
    return torch.device("cpu")


def compute_device_for(module: nn.Module) -> torch.device:
    """Where a module should run: its own GPU, or the current GPU when it sits in CPU RAM (streamed)."""
    device = module_device(module)
    if device.type == "meta":
        raise OptionError(
            "{device_map} left some decoder layers off the GPUs (accelerate offloads them to CPU RAM or disk, as "
            "meta tensors); prune with {offload} instead (without {device_map}), which keeps the model in CPU RAM "
            "and streams one layer at a time to the GPU"
        )
    if device.type == "cpu" and torch.cuda.is_available():
        if hasattr(module, "_hf_hook"):
            # accelerate's hooks would move inputs back to the CPU behind our back: do not stream these.
            raise OptionError(
                "{device_map} put decoder layers in CPU RAM; prune with {offload} instead (without {device_map}), "
                "which streams one layer at a time to the GPU"
            )
        return torch.device("cuda", torch.cuda.current_device())
    return device


def check_layers_placeable(layers: nn.ModuleList) -> None:
    """Raise now, before any layer is touched, if some decoder layer cannot be run where it sits (the check
    ``compute_device_for`` makes layer by layer): a long job must not fail halfway, with half the layers pruned."""
    for layer in layers:
        compute_device_for(layer)


@contextlib.contextmanager
def on_device(modules: list[nn.Module], device: torch.device) -> Iterator[None]:
    """Temporarily move CPU-resident modules to ``device`` (streaming); modules already placed stay."""
    moved = [m for m in modules if module_device(m).type == "cpu" and device.type != "cpu"]
    for m in moved:
        m.to(device)
    try:
        yield
    finally:
        for m in moved:
            m.to("cpu")


class _LayerOnDeviceForItsForward:
    """Hooks that give a CPU-resident layer GPU copies of its weights for the length of its forward, then point
    it back at the CPU tensors (kept untouched, so nothing is copied back: inference does not change them)."""

    def __init__(self, layer: nn.Module, device: torch.device):
        self.device = device
        self.slots = [(m._parameters, n) for m in layer.modules() for n, p in m._parameters.items() if p is not None]
        self.slots += [(m._buffers, n) for m in layer.modules() for n, b in m._buffers.items() if b is not None]
        self.on_cpu = [tensors[name].data for tensors, name in self.slots]
        self.handles = [layer.register_forward_pre_hook(self.load), layer.register_forward_hook(self.unload)]

    def _point_to(self, new_tensors: list[torch.Tensor]) -> None:
        for (tensors, name), tensor in zip(self.slots, new_tensors, strict=True):
            if isinstance(tensors[name], nn.Parameter):
                tensors[name].data = tensor
            else:
                tensors[name] = tensor

    def load(self, _module, _args) -> None:
        # copy=True: a real copy even when device is the CPU (tests), so on_cpu is never handed out itself
        self._point_to([t.to(self.device, non_blocking=True, copy=True) for t in self.on_cpu])

    def unload(self, _module, _args, _output) -> None:
        self._point_to(self.on_cpu)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self._point_to(self.on_cpu)


@contextlib.contextmanager
def layers_streamed_through(model: nn.Module, adapter: DecoderAdapter, device: torch.device) -> Iterator[None]:
    """Whole-model forwards of a model in CPU RAM (e.g. zero-shot evaluation) at GPU speed: the embeddings and
    head sit on ``device`` for the duration, and each decoder layer holds GPU copies of its weights only during
    its own forward, so GPU memory holds one layer at a time. Everything is in CPU RAM again afterwards."""
    streamers = [_LayerOnDeviceForItsForward(layer, device) for layer in adapter.layers(model)]
    try:
        with on_device(adapter.embedding_modules(model) + adapter.head_modules(model), device):
            yield
    finally:
        for streamer in streamers:
            streamer.remove()


def activation_store(inputs_bytes: int, device: torch.device) -> torch.device:
    """Keep calibration activations on the GPU when two copies (inputs + outputs) fit comfortably."""
    if device.type != "cuda":
        return device
    free, _ = torch.cuda.mem_get_info(device)
    if 2 * inputs_bytes < 0.4 * free:
        return device
    log.info("calibration activations (%.1f GiB) kept in CPU RAM", 2 * inputs_bytes / 2**30)
    return torch.device("cpu")


def streamed_from_cpu(model: nn.Module, adapter: DecoderAdapter) -> bool:
    """The model sits in CPU RAM and a GPU is there to run it one decoder layer at a time."""
    return module_device(adapter.layers(model)[0]).type == "cpu" and torch.cuda.is_available()
