"""Running a causal LM one decoder layer at a time: capture layer-0 inputs, stream layers to the GPU.

This is what lets a model larger than GPU memory be pruned (and evaluated): only one decoder layer and
the [nsamples, seqlen, hidden] activations need to be on the GPU at once. Works for any adapter.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TypeVar

import torch
from torch import nn

from pruning.adapters import DecoderAdapter, check_one_mask_for_every_layer
from pruning.oom import retry_with_half_batch

log = logging.getLogger(__name__)

T = TypeVar("T")


class StopForward(Exception):
    """Raised by a hook once it has what it needs: the rest of the forward pass is skipped."""


@dataclass
class LayerInputs:
    """Per calibration batch: the hidden states entering a layer and the keyword arguments the model's
    own forward passed with them (attention mask, position ids, rotary position_embeddings, ...)."""

    hidden: list[torch.Tensor] = field(default_factory=list)
    args: list[tuple] = field(default_factory=list)
    kwargs: list[dict] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.hidden)

    @property
    def n_samples(self) -> int:
        return sum(h.shape[0] for h in self.hidden)

    @property
    def max_batch(self) -> int:
        return max((h.shape[0] for h in self.hidden), default=0)

    def limit_batch(self, batch_size: int) -> None:
        """Split every batch of more than ``batch_size`` samples (views, no copy): the hidden states and the
        per-sample tensors among its arguments, i.e. those with at least two dimensions whose leading one is
        the batch's size. The rest (position ids [1, T], rotary tables [1, T, D], flags) is shared."""
        hidden, args, kwargs = [], [], []
        for h, a, k in zip(self.hidden, self.args, self.kwargs, strict=True):
            size = h.shape[0]
            for start in range(0, size, batch_size):
                part = slice(start, min(start + batch_size, size))
                hidden.append(h[part])
                args.append(_per_sample_slice(a, size, part))
                kwargs.append(_per_sample_slice(k, size, part))
        self.hidden, self.args, self.kwargs = hidden, args, kwargs


def _per_sample_slice(obj, batch: int, part: slice):
    if isinstance(obj, torch.Tensor):
        return obj[part] if obj.ndim >= 2 and obj.shape[0] == batch else obj
    if isinstance(obj, (tuple, list)):
        return type(obj)(_per_sample_slice(o, batch, part) for o in obj)
    if isinstance(obj, dict):
        return {key: _per_sample_slice(value, batch, part) for key, value in obj.items()}
    return obj


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
        raise ValueError(
            "--device_map left some decoder layers off the GPUs (accelerate offloads them to CPU RAM or disk, as "
            "meta tensors); prune with --offload instead (without --device_map), which keeps the model in CPU RAM "
            "and streams one layer at a time to the GPU"
        )
    if device.type == "cpu" and torch.cuda.is_available():
        if hasattr(module, "_hf_hook"):
            # accelerate's hooks would move inputs back to the CPU behind our back: do not stream these.
            raise ValueError(
                "--device_map put decoder layers in CPU RAM; prune with --offload instead (without --device_map), "
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


@contextlib.contextmanager
def no_kv_cache(model: nn.Module) -> Iterator[None]:
    config = getattr(model, "config", None)
    previous = getattr(config, "use_cache", None)
    if config is not None:
        config.use_cache = False
    try:
        yield
    finally:
        if config is not None:
            config.use_cache = previous


@torch.no_grad()
def capture_layer_inputs(
    model: nn.Module, adapter: DecoderAdapter, input_ids: torch.Tensor, batch_size: int, store: torch.device
) -> LayerInputs:
    """Run the model up to decoder layer 0 on each batch of ``input_ids`` and keep what layer 0 receives.
    A GPU out-of-memory error restarts the capture with half the batch size (down to 1)."""
    check_one_mask_for_every_layer(model.config)  # layer 0's mask is handed to every layer
    return retry_with_half_batch(
        lambda size: _capture(model, adapter, input_ids, size, store), batch_size, "capturing layer-0 inputs"
    )


def _capture(
    model: nn.Module, adapter: DecoderAdapter, input_ids: torch.Tensor, batch_size: int, store: torch.device
) -> LayerInputs:
    layers = adapter.layers(model)
    first = layers[0]
    device = compute_device_for(first)
    captured = LayerInputs()

    def grab(module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        kwargs = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "past_key_value", "cache")}
        captured.hidden.append(hidden.to(store))
        captured.args.append(to_device(tuple(args[1:]), store))
        captured.kwargs.append(to_device(kwargs, store))
        raise StopForward

    handle = first.register_forward_pre_hook(grab, with_kwargs=True)
    embeddings = adapter.embedding_modules(model)
    try:
        with on_device(embeddings, device), no_kv_cache(model):
            embed_device = module_device(embeddings[0])
            for batch in input_ids.split(batch_size):
                with contextlib.suppress(StopForward):
                    model(input_ids=batch.to(embed_device), use_cache=False)
    finally:
        handle.remove()
    return captured


def with_smaller_batches_on_oom(inputs: LayerInputs, run: Callable[[], T], what: str) -> T:
    """``run()`` over ``inputs``; after a GPU out-of-memory error the batches are split in halves (for good:
    later layers keep the smaller batches) and ``run`` starts again, so it must not keep state from a failed
    try."""

    def attempt(batch_size: int) -> T:
        inputs.limit_batch(batch_size)
        return run()

    return retry_with_half_batch(attempt, inputs.max_batch, what)


def feed_layer(layer: nn.Module, inputs: LayerInputs, device: torch.device) -> None:
    """Run the layer on every batch for its hooks only; a hook may end a batch early with StopForward."""
    for hidden, args, kwargs in zip(inputs.hidden, inputs.args, inputs.kwargs, strict=True):
        with contextlib.suppress(StopForward):
            layer(hidden.to(device), *to_device(args, device), **to_device(kwargs, device))


def run_layer(layer: nn.Module, inputs: LayerInputs, device: torch.device, store: torch.device) -> list[torch.Tensor]:
    """The layer's outputs for every batch (inputs read from and outputs written to ``store``)."""
    outputs = []
    for hidden, args, kwargs in zip(inputs.hidden, inputs.args, inputs.kwargs, strict=True):
        out = layer(hidden.to(device), *to_device(args, device), **to_device(kwargs, device))
        out = out[0] if isinstance(out, (tuple, list)) else out
        outputs.append(out.to(store))
    return outputs


def activation_store(inputs_bytes: int, device: torch.device) -> torch.device:
    """Keep calibration activations on the GPU when two copies (inputs + outputs) fit comfortably."""
    if device.type != "cuda":
        return device
    free, _ = torch.cuda.mem_get_info(device)
    if 2 * inputs_bytes < 0.4 * free:
        return device
    log.info("calibration activations (%.1f GiB) kept in CPU RAM", 2 * inputs_bytes / 2**30)
    return torch.device("cpu")


@torch.no_grad()
def layerwise_perplexity(
    model: nn.Module, adapter: DecoderAdapter, ids: torch.Tensor, seqlen: int, batch_size: int = 1
) -> float:
    """The published perplexity protocol (disjoint seqlen windows, remainder dropped) computed one decoder
    layer at a time, for models that live in CPU RAM and are streamed through the GPU."""
    import math

    from pruning.evaluate import summed_next_token_nll

    ids = ids.reshape(1, -1)
    n_windows = ids.shape[1] // seqlen
    if n_windows == 0:
        raise ValueError(f"evaluation text has {ids.shape[1]} tokens, fewer than one window of {seqlen}")
    windows = ids[0, : n_windows * seqlen].reshape(n_windows, seqlen)
    layers = adapter.layers(model)
    check_layers_placeable(layers)  # before the capture, not at the first layer that cannot run
    device = compute_device_for(layers[0])
    hidden_bytes = windows.numel() * model.config.hidden_size * next(model.parameters()).element_size()
    store = activation_store(hidden_bytes, device)
    inputs = capture_layer_inputs(model, adapter, windows, batch_size, store)
    for index, layer in enumerate(layers):
        layer_device = compute_device_for(layer)
        with on_device([layer], layer_device):
            inputs.hidden = with_smaller_batches_on_oom(
                inputs, functools.partial(run_layer, layer, inputs, layer_device, store), f"evaluating layer {index}"
            )
    head = adapter.head_modules(model)
    head_device = compute_device_for(head[-1])
    total_nll = 0.0
    with on_device(head, head_device):
        start = 0  # batches may have been split after an out-of-memory error: pair them with windows by count
        for hidden in inputs.hidden:
            batch_ids = windows[start : start + hidden.shape[0]]
            start += hidden.shape[0]
            x = hidden.to(head_device)
            for module in head:
                x = module(x)
            total_nll += summed_next_token_nll(x, batch_ids)
    return math.exp(total_nll / (n_windows * (seqlen - 1)))
