"""Inference runners that remove per-call host overhead: CUDA graphs for prefill and for decode steps
with a static KV cache. Dense and 2:4-sparse models run through the same runner, so comparisons are fair.

On the CPU (or with ``use_graph=False``) the same code runs eagerly, which is how it is tested here.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging

import torch
from torch import nn


def _cache_kwarg(model: nn.Module) -> str:
    """transformers renamed ``past_key_values`` to ``cache`` in 5.2x; accept either version."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


log = logging.getLogger(__name__)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _try_capture(fn, what: str) -> tuple[torch.cuda.CUDAGraph | None, object]:
    """``_capture``, or (None, None) with a warning when the model does something a graph cannot hold (a host
    sync, a data-dependent shape): the runner then stays eager, and says so in ``use_graph``."""
    previous = torch.cuda.current_stream() if torch.cuda.is_available() else None  # None: a CPU test's stand-in
    try:
        return _capture(fn)
    except RuntimeError as err:
        # An invalidated capture fails again in capture_end ("a previous error during capture") before the graph
        # context restores the stream: report the first error, and put the stream back.
        cause = err.__context__ or err
        if previous is not None:
            torch.cuda.set_stream(previous)
        log.warning("CUDA graph capture of the %s failed, running eagerly: %s", what, str(cause).splitlines()[0])
        torch.cuda.synchronize()
        return None, None


def _capture(fn, warmup: int = 2) -> tuple[torch.cuda.CUDAGraph, object]:
    """Run ``fn`` a few times on a side stream (allocations, cuSPARSELt plans, Triton compiles), then capture it."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


CAUSAL_SDPA = "wanda_causal_sdpa"  # SDPA registered with no mask function: causal, unpadded batches only


@functools.cache
def _register_causal_sdpa() -> None:
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    AttentionInterface.register(CAUSAL_SDPA, sdpa_attention_forward)


def _sliding_window_shorter_than(config, seqlen: int) -> int | None:
    """The attention window, when some layer attends through one shorter than ``seqlen`` tokens."""
    window = getattr(config, "sliding_window", None)
    if not window or window >= seqlen:
        return None
    layer_types = getattr(config, "layer_types", None)  # Qwen2/3: per layer; Mistral: every layer
    if layer_types is not None and "sliding_attention" not in layer_types:
        return None
    return window


@contextlib.contextmanager
def _maskless_causal_sdpa(model: nn.Module, seqlen: int):
    """Within this block an SDPA model runs its attention as ``is_causal=True`` with no mask tensor, so SDPA may
    pick its flash kernel, inside a CUDA graph too (why plain ``"sdpa"`` would not: docs/inference.md).
    Right only for what PrefillRunner feeds: no cache, no padding, every sequence starting at position 0, and no
    sliding window shorter than the sequence (plain causal attention would see past it)."""
    config = model.config
    if getattr(config, "_attn_implementation", None) != "sdpa" or _sliding_window_shorter_than(config, seqlen):
        yield
        return
    _register_causal_sdpa()
    config._attn_implementation = CAUSAL_SDPA
    try:
        yield
    finally:
        config._attn_implementation = "sdpa"


class PrefillRunner:
    """``model(input_ids)`` for one [batch, seqlen] shape, returning the last position's logits [batch, vocab]
    (``logits_to_keep=1``: the full [B, T, vocab] projection is not part of a prefill)."""

    def __init__(self, model: nn.Module, batch: int, seqlen: int, use_graph: bool | None = None):
        self.model = model
        device = _device(model)
        self.use_graph = device.type == "cuda" if use_graph is None else use_graph
        self.input_ids = torch.zeros(batch, seqlen, dtype=torch.long, device=device)
        self.graph = None
        window = _sliding_window_shorter_than(model.config, seqlen)
        if window:
            log.warning("prefill with a %d-token sliding window: attention runs with a materialized mask", window)
        if self.use_graph:
            self.graph, self.logits = _try_capture(self._forward, "prefill")
            self.use_graph = self.graph is not None

    @torch.no_grad()
    def _forward(self) -> torch.Tensor:
        with _maskless_causal_sdpa(self.model, self.input_ids.shape[1]):
            return self.model(input_ids=self.input_ids, use_cache=False, logits_to_keep=1).logits[:, -1]

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        self.input_ids.copy_(input_ids)
        if self.graph is None:
            return self._forward()
        self.graph.replay()
        return self.logits


class GreedyDecoder:
    """Greedy decoding with a static KV cache of ``max_len`` positions. The prompt is prefilled eagerly;
    every later one-token step is one CUDA-graph replay (on CPU: the same step, eagerly)."""

    def __init__(
        self, model: nn.Module, batch: int, max_len: int, use_graph: bool | None = None, backend: str = "auto"
    ):
        from transformers import StaticCache

        self.model = model
        self.backend = backend  # the cache-write kernel or its reference (wanda_kernels.policy)
        device = _device(model)
        self.use_graph = device.type == "cuda" if use_graph is None else use_graph
        self.batch, self.max_len = batch, max_len
        # Slots rounded up to a multiple of 16 (unwritten slots are masked): SDPA's memory-efficient kernel pads,
        # in every layer, an attention mask whose row stride is not a multiple of 8 (preprocess_mask in torch).
        cache_len = -(-max_len // 16) * 16
        self.cache = StaticCache(config=model.config, max_cache_len=cache_len)
        self.cache_kwarg = _cache_kwarg(model)
        self.token = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.position = torch.zeros(1, dtype=torch.long, device=device)
        # Every slot is "not padding" (causality hides the unwritten ones); passing a mask keeps the step free of
        # host syncs (without one, OPT sizes one with .item()). Why: docs/inference.md.
        self.attention_mask = torch.ones(batch, cache_len, dtype=torch.long, device=device)
        # Decode steps pass their own additive [1, 1, 1, slots] mask instead: neither transformers nor SDPA then
        # builds or converts a mask per step (docs/inference.md).
        dtype = model.get_input_embeddings().weight.dtype
        self.slots = torch.arange(cache_len, device=device)
        self.mask_open = torch.zeros((), dtype=dtype, device=device)
        self.mask_closed = torch.full((), float("-inf"), dtype=dtype, device=device)
        self.graph = None
        self.length = 0
        self._write_cache_at_positions()

    def _write_cache_at_positions(self) -> None:
        """Plain static-cache layers write where this decoder feeds tokens (a prefill from position 0, then one
        token at ``self.position``), with one kernel (``wanda_kernels.kv_cache``) where transformers' layer takes
        five, at its own device-side counter."""
        from transformers.cache_utils import StaticLayer

        from wanda_kernels.kv_cache import write_kv_cache_
        from wanda_kernels.policy import use_kernel
        from wanda_kernels.reference import write_kv_cache_torch

        # Chosen once, not on every layer's call: the device does not change.
        on_kernels = use_kernel(self.backend, self.position)
        self._write_kv_cache = write_kv_cache_ if on_kernels else write_kv_cache_torch
        for layer in self.cache.layers:
            if type(layer) is StaticLayer:
                layer.update = functools.partial(self._write_cache_layer, layer)
        other = {type(layer).__name__ for layer in self.cache.layers if type(layer) is not StaticLayer}
        self.plain_cache = not other  # every layer keeps all slots (the step's own mask covers them)
        if other and self.use_graph:
            # A sliding-window layer branches on a host-side count (filling, then rolling): one captured step
            # cannot serve every later one.
            log.warning("decoding without CUDA graphs: the static cache has %s layers", ", ".join(sorted(other)))
            self.use_graph = False

    def _write_cache_layer(self, layer, key_states: torch.Tensor, value_states: torch.Tensor, *_args, **_kwargs):
        if not layer.is_initialized:
            layer.lazy_initialization(key_states, value_states)
        if layer.keys.shape != layer.values.shape:  # keys and values of other head sizes: transformers' own update
            return type(layer).update(layer, key_states, value_states, *_args, **_kwargs)
        n_new = key_states.shape[2]
        positions = self.position if n_new == 1 else torch.arange(n_new, device=key_states.device)
        self._write_kv_cache(layer.keys, layer.values, key_states, value_states, positions, layer.cumulative_length)
        return layer.keys, layer.values

    def _run(self, input_ids: torch.Tensor, cache_position: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=cache_position.unsqueeze(0).expand(input_ids.shape[0], -1),
            cache_position=cache_position,
            use_cache=True,
            logits_to_keep=1,
            **{self.cache_kwarg: self.cache},
        )
        return out.logits[:, -1].argmax(dim=-1, keepdim=True)

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Fill the cache with the prompt [batch, T]; returns the first generated token [batch, 1]."""
        if input_ids.ndim != 2 or input_ids.shape[0] != self.batch or not 0 < input_ids.shape[1] < self.max_len:
            raise ValueError(
                f"prompt must be [{self.batch}, T] with 0 < T < {self.max_len}, got {tuple(input_ids.shape)}"
            )
        input_ids = input_ids.to(self.token.device)  # a prompt built on the CPU, for a model on the GPU
        self.cache.reset()
        self.position.fill_(0)  # where a one-token prompt is written (see _write_cache_layer)
        length = input_ids.shape[1]
        positions = torch.arange(length, device=input_ids.device)
        # A [B, T] mask, as generate() passes: transformers then runs SDPA causal without a mask tensor, which
        # rounds differently in bf16 from the masked kernel a cache-sized mask would select. Eager: no graph.
        prompt_mask = torch.ones(input_ids.shape, dtype=torch.long, device=input_ids.device)
        self.token.copy_(self._run(input_ids, positions, prompt_mask))
        self.length = length
        return self.token.clone()

    def _step(self) -> torch.Tensor:
        if not self.plain_cache:  # a sliding window keeps fewer slots: transformers builds the masks
            return self._run(self.token, self.position, self.attention_mask)
        mask = torch.where(self.slots <= self.position, self.mask_open, self.mask_closed)  # -inf as SDPA's own
        return self._run(self.token, self.position, mask.view(1, 1, 1, -1))

    @torch.no_grad()
    def step(self) -> torch.Tensor:
        """Feed the last token, return the next one [batch, 1]."""
        if self.length == 0:
            raise ValueError("no prompt: call prefill (or generate) first")
        if self.length >= self.max_len:
            raise ValueError(f"static cache of {self.max_len} positions is full")
        self.position.fill_(self.length)
        if self.use_graph and self.graph is None:
            # Capture before the first real step. The warm-up runs before the capture execute the step: they write
            # the keys and values the real step writes, where it writes them, but they also move each layer's
            # count of cached tokens, from which the causal mask takes the query's position. Put it back.
            self.graph, self.next_token = _try_capture(self._step, "decode step")
            self.use_graph = self.graph is not None
            for layer in self.cache.layers:
                layer.cumulative_length.fill_(self.length)
        if self.graph is None:
            self.token.copy_(self._step())
        else:
            self.graph.replay()
            self.token.copy_(self.next_token)
        self.length += 1
        return self.token.clone()

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """Greedy continuation [batch, max_new_tokens] of the prompt."""
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
        tokens = [self.prefill(input_ids)]
        for _ in range(max_new_tokens - 1):
            tokens.append(self.step())
        return torch.cat(tokens, dim=1)
