"""Evaluation: perplexity by the published GPTQ/SparseGPT/Wanda protocol, and zero-shot tasks through lm-eval.

Perplexity protocol: the evaluation text is tokenized once into ids [1, N]; ids are cut into N // seqlen disjoint
windows of `seqlen` tokens (the remainder is dropped); each window is scored independently (no context carried over)
on its seqlen - 1 next-token predictions; ppl = exp(mean NLL over all scored tokens). Every window scores the same
number of tokens, so this equals Wanda's exp(sum_w mean_nll_w * seqlen / (n_windows * seqlen)).
A model in CPU RAM with a GPU present is evaluated one decoder layer at a time on the GPU (``model_*``).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from pruning.adapters import DecoderAdapter, check_one_mask_for_every_layer, get_adapter
from pruning.layerwise import capture_layer_inputs, run_layer, with_smaller_batches_on_oom
from pruning.oom import retry_with_half_batch
from pruning.placement import (
    activation_store,
    check_layers_placeable,
    compute_device_for,
    layers_streamed_through,
    on_device,
    streamed_from_cpu,
)

logger = logging.getLogger(__name__)

DEFAULT_ZERO_SHOT_TASKS: tuple[str, ...] = (
    "boolq",
    "rte",
    "hellaswag",
    "winogrande",
    "arc_easy",
    "arc_challenge",
    "openbookqa",
)

# Positions per cross-entropy call: bounds the fp32 copy of the logits to chunk * batch * vocab floats.
_NLL_CHUNK_TOKENS = 512


def input_device(model: torch.nn.Module) -> torch.device:
    """Device where input ids must live: the input embedding's (works with accelerate device maps)."""
    get_emb = getattr(model, "get_input_embeddings", None)
    emb = get_emb() if callable(get_emb) else None
    if emb is not None and getattr(emb, "weight", None) is not None and emb.weight.device.type != "meta":
        return emb.weight.device
    for p in model.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


def summed_next_token_nll(logits: torch.Tensor, ids: torch.Tensor) -> float:
    """Sum over the batch of -log p(ids[:, t+1] | ids[:, :t+1]) for logits [B, T, V] and ids [B, T].

    Computed in fp32 over chunks of positions (never a full fp32 copy of long-sequence logits), summed in fp64.
    """
    labels = ids.to(logits.device)
    total = 0.0
    n_pred = logits.shape[1] - 1
    for start in range(0, n_pred, _NLL_CHUNK_TOKENS):
        stop = min(start + _NLL_CHUNK_TOKENS, n_pred)
        chunk = logits[:, start:stop, :].float()
        target = labels[:, start + 1 : stop + 1]
        nll = F.cross_entropy(chunk.reshape(-1, chunk.shape[-1]), target.reshape(-1), reduction="sum")
        total += float(nll.double())
    return total


def _summed_nll_in_batches(model: torch.nn.Module, windows: torch.Tensor, device, progress: bool, size: int) -> float:
    total = 0.0
    for batch in tqdm(windows.split(size), desc="ppl", disable=None if progress else True, leave=False):
        batch = batch.to(device)
        logits = model(input_ids=batch, use_cache=False).logits
        total += summed_next_token_nll(logits, batch)
        del logits
    return total


@torch.no_grad()
def perplexity(
    model: torch.nn.Module, ids: torch.Tensor, seqlen: int, batch_size: int = 1, progress: bool = True
) -> float:
    """Perplexity of `model` on token ids [1, N] (or [N]) over N // seqlen disjoint windows of `seqlen` tokens."""
    if seqlen < 2:
        raise ValueError(f"seqlen must be >= 2 to score any token, got {seqlen}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    flat = ids.reshape(-1) if ids.dim() == 1 or ids.shape[0] == 1 else None
    if flat is None:
        raise ValueError(f"ids must have shape [1, N] or [N], got {tuple(ids.shape)}")
    n_windows = flat.numel() // seqlen
    if n_windows == 0:
        raise ValueError(f"only {flat.numel()} tokens: need at least seqlen={seqlen} for one window")
    dropped = flat.numel() - n_windows * seqlen
    windows = flat[: n_windows * seqlen].view(n_windows, seqlen)
    device = input_device(model)
    logger.info("perplexity: %d windows of %d tokens (%d trailing tokens dropped)", n_windows, seqlen, dropped)

    was_training = model.training
    model.eval()
    try:
        # Out of GPU memory: scored again from the first window in batches of half the size (down to one
        # window). Every batch has the same shape, so a failure comes at the first one and costs nothing.
        scorer = functools.partial(_summed_nll_in_batches, model, windows, device, progress)
        total_nll = retry_with_half_batch(scorer, batch_size, "scoring perplexity")
    finally:
        model.train(was_training)
    mean_nll = total_nll / (n_windows * (seqlen - 1))
    return math.exp(mean_nll)


@torch.no_grad()
def layerwise_perplexity(
    model: torch.nn.Module, adapter: DecoderAdapter, ids: torch.Tensor, seqlen: int, batch_size: int = 1
) -> float:
    """The published perplexity protocol (disjoint seqlen windows, remainder dropped) computed one decoder
    layer at a time, for models that live in CPU RAM and are streamed through the GPU."""
    if seqlen < 2:
        raise ValueError(f"seqlen must be >= 2 to score any token, got {seqlen}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not (ids.dim() == 1 or (ids.dim() == 2 and ids.shape[0] == 1)):
        raise ValueError(f"ids must have shape [1, N] or [N], got {tuple(ids.shape)}")
    ids = ids.reshape(1, -1)
    n_windows = ids.shape[1] // seqlen
    if n_windows == 0:
        raise ValueError(f"evaluation text has {ids.shape[1]} tokens, fewer than one window of {seqlen}")
    windows = ids[0, : n_windows * seqlen].reshape(n_windows, seqlen)
    layers = adapter.layers(model)
    check_one_mask_for_every_layer(model.config)  # every layer gets layer 0's mask
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


def unknown_zero_shot_tasks(tasks: Sequence[str], include_path: str | None = None) -> list[str]:
    """The names in ``tasks`` that are no task, group or tag lm-eval knows (with ``include_path``'s YAMLs).
    Exact names: ``simple_evaluate`` does not expand wildcards."""
    known = set(_task_manager(include_path).all_tasks)
    return [task for task in tasks if task not in known]


@functools.lru_cache(maxsize=4)
def _task_manager(include_path: str | None):
    """lm-eval's task index (a few seconds to build), once per include path: the CLI checks names up front."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path)


def zero_shot(
    model: Any,
    tokenizer: Any,
    tasks: Sequence[str] = DEFAULT_ZERO_SHOT_TASKS,
    num_fewshot: int = 0,
    batch_size: int = 1,
    limit: int | float | None = None,
    include_path: str | None = None,
) -> dict[str, dict[str, Any]]:
    """Run lm-eval (>= 0.4) tasks on an in-memory HF model.

    ``include_path``: a directory of extra lm-eval task YAMLs (e.g. local-file tasks for offline machines).
    Returns lm-eval's per-task metrics, `simple_evaluate(...)["results"]`, e.g. {"boolq": {"acc,none": ...}}.
    """
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError as exc:
        raise ImportError("zero-shot evaluation needs lm-eval: pip install -e '.[eval]'") from exc

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    results = lm_eval.simple_evaluate(
        model=lm,
        tasks=list(tasks),
        num_fewshot=num_fewshot,
        batch_size=batch_size,
        limit=limit,
        task_manager=_task_manager(include_path),
    )
    if results is None:  # non-zero ranks in distributed runs
        return {}
    return ZeroShotResults(results)


class ZeroShotResults(dict):
    """lm-eval's per-task metrics (``simple_evaluate(...)["results"]``), with what else a report needs: lm-eval's
    own table (``lm_eval.utils.make_table``), each task's version and n-shot, and lm-eval's version."""

    def __init__(self, evaluated: dict):
        super().__init__(evaluated["results"])
        from importlib import metadata

        try:
            from lm_eval.utils import make_table

            self.table = make_table(evaluated)
        except Exception:  # the table is for people; a change in lm-eval's helper must not cost the results
            self.table = None
        self.meta = {
            "lm_eval_version": metadata.version("lm_eval"),
            "task_versions": dict(evaluated.get("versions", {})),
            "n_shot": dict(evaluated.get("n-shot", {})),
        }


def model_perplexity(model: torch.nn.Module, ids: torch.Tensor, seqlen: int, batch_size: int = 1) -> float:
    """:func:`perplexity`, or :func:`layerwise_perplexity` for a model in CPU RAM when a GPU can run its layers."""
    adapter = get_adapter(model)
    if streamed_from_cpu(model, adapter):
        return layerwise_perplexity(model, adapter, ids, seqlen, batch_size)
    return perplexity(model, ids, seqlen, batch_size=batch_size)


def model_zero_shot(model: Any, tokenizer: Any, tasks: Sequence[str], **options) -> dict[str, dict[str, Any]]:
    """:func:`zero_shot`; a model in CPU RAM runs on the GPU with its decoder layers streamed through it."""
    adapter = get_adapter(model)
    placement = contextlib.nullcontext()
    if streamed_from_cpu(model, adapter):
        placement = layers_streamed_through(model, adapter, compute_device_for(adapter.layers(model)[0]))
    with placement:
        return zero_shot(model, tokenizer, tasks, **options)
