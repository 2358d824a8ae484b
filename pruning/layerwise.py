"""Running a causal LM one decoder layer at a time: capture what layer 0 receives, feed and rerun layers.

Works for any adapter; where each layer runs is ``pruning.placement``'s business.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TypeVar

import torch
from torch import nn

from pruning.adapters import DecoderAdapter
from pruning.oom import retry_with_half_batch
from pruning.placement import compute_device_for, module_device, on_device, to_device

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
    Every layer will be handed layer 0's attention mask (``pruning.plan`` checks that this is right).
    A GPU out-of-memory error restarts the capture with half the batch size (down to 1)."""
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
