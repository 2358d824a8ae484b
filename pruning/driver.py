"""The layer-sequential pruner (Wanda's semantics, shared by every method).

1. Capture the inputs of decoder layer 0 for all calibration samples (batched).
2. For each layer: run it densely with hooks that collect statistics for every Linear group (inputs
   shared by q/k/v, or LLaMA's gate/up, are accumulated once); prune every Linear from those statistics;
   recompute the layer's outputs with the pruned weights and feed them to the next layer.
   ``true_sequential``: one statistics pass per group, after the earlier groups are pruned.
Magnitude needs no calibration and skips the forward passes.
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from pruning.adapters import DecoderAdapter, UnsupportedModelError, get_adapter
from pruning.config import PruneConfig
from pruning.layerwise import (
    LayerInputs,
    StopForward,
    activation_store,
    capture_layer_inputs,
    check_layers_placeable,
    compute_device_for,
    feed_layer,
    module_device,
    on_device,
    run_layer,
    with_smaller_batches_on_oom,
)
from pruning.methods import (
    accumulate_ablate_scaler_,
    accumulate_hessian_,
    kernel_ops,
    prune_ablate_,
    prune_magnitude_,
    prune_sparsegpt_,
    prune_wanda_,
    sparsegpt_inverse_hessian,
)
from pruning.sparsity import check_sparsity, linear_zero_counts

log = logging.getLogger(__name__)


@dataclass
class LayerReport:
    index: int
    seconds: float
    sparsity: float


@dataclass
class PruneReport:
    method: str
    sparsity_type: str
    sparsity_ratio: float
    backend: str
    nsamples: int
    seqlen: int
    calib_batch_size: int
    streamed_layers: bool  # model in CPU RAM, one layer at a time on the GPU
    actual_sparsity: float = 0.0
    seconds: float = 0.0
    peak_gpu_memory_bytes: int | None = None
    layers: list[LayerReport] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def resolve_backend(backend: str, device: torch.device) -> str:
    """'auto' -> Triton on CUDA, the torch reference on CPU (Triton only runs there under its interpreter)."""
    from wanda_kernels._runtime import interpreting

    if backend == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if backend == "triton" and device.type != "cuda" and not interpreting():
        raise ValueError("--backend triton needs a CUDA GPU (or TRITON_INTERPRET=1 on CPU); use --backend torch")
    return backend


def validate_calibration_ids(calibration_ids: torch.Tensor | None, model: nn.Module) -> tuple[int, int]:
    if not isinstance(calibration_ids, torch.Tensor) or calibration_ids.ndim != 2:
        got = tuple(calibration_ids.shape) if isinstance(calibration_ids, torch.Tensor) else calibration_ids
        raise ValueError(
            f"calibration_ids must be a LongTensor [nsamples, seqlen] of token ids (see "
            f"pruning.data.get_calibration_ids), got {got!r}"
        )
    if calibration_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"calibration_ids must hold token ids (int64), got {calibration_ids.dtype}")
    nsamples, seqlen = calibration_ids.shape
    if nsamples <= 0 or seqlen <= 0:
        raise ValueError(f"calibration_ids is empty: shape {tuple(calibration_ids.shape)}")
    max_positions = getattr(model.config, "max_position_embeddings", None)
    if max_positions is not None and seqlen > max_positions:
        raise ValueError(f"seqlen {seqlen} exceeds the model's max_position_embeddings {max_positions}")
    return nsamples, seqlen


def _check_nm_divisibility(layers: nn.ModuleList, config: PruneConfig) -> None:
    """N:M groups run along in_features: refuse up front (not after hours of pruning) when one does not divide."""
    n, m = config.nm
    if not m:
        return
    bad = sorted(
        {f"{name} (in_features {mod.in_features})" for layer in layers for name, mod in layer.named_modules()
         if isinstance(mod, nn.Linear) and mod.in_features % m}
    )  # fmt: skip
    if bad:
        raise ValueError(f"{config.sparsity_type} needs in_features divisible by {m}; not so for {', '.join(bad)}")


def auto_batch_size(model: nn.Module, adapter: DecoderAdapter, nsamples: int, seqlen: int, device: torch.device) -> int:
    """Calibration samples per layer forward, from a budget of a quarter of the free GPU memory."""
    if device.type != "cuda":
        return min(nsamples, 8)
    layer = adapter.layers(model)[0]
    widths = [m.out_features for m in layer.modules() if isinstance(m, nn.Linear)]
    hidden = model.config.hidden_size
    elem = next(model.parameters()).element_size()
    heads = getattr(model.config, "num_attention_heads", 1)
    # Live activations of one sample through a layer: residual + q/k/v/attn + MLP intermediates, plus
    # a [heads, T, T] score matrix in case attention falls back to the math path.
    per_sample = seqlen * (8 * hidden + 3 * max(widths)) * elem + heads * seqlen * seqlen * elem
    free, _ = torch.cuda.mem_get_info(device)
    return int(max(1, min(nsamples, 64, (free // 4) // per_sample)))


class _GroupStatistics:
    """Calibration statistics of one Linear group, fed by a forward hook on the group's first module."""

    def __init__(self, method: str, n_features: int, device: torch.device, backend: str):
        self.method = method
        self.ops = kernel_ops(backend)
        self.ablate_scaler = None
        self.samples_in_batch = 0  # set per batch: a Linear may see its input flattened to [samples * T, C] (OPT)
        self.inputs_seen = 0  # batches
        if method == "wanda":
            self.act_sq_norms = torch.zeros(n_features, dtype=torch.float32, device=device)
        else:  # SparseGPT and Wanda's ablations of it
            self.hessian = torch.zeros(n_features, n_features, dtype=torch.float32, device=device)
            self.n_seen = 0
            if method.startswith("ablate_wanda"):
                self.ablate_scaler = torch.zeros(n_features, dtype=torch.float32, device=device)

    def add(self, x: torch.Tensor) -> None:
        self.inputs_seen += 1
        if self.method == "wanda":
            self.ops.accumulate_sq_norms_(self.act_sq_norms, x)
            return
        if x.ndim == 2 and self.samples_in_batch > 1:  # count samples as the reference does (one per sequence)
            x = x.reshape(self.samples_in_batch, -1, x.shape[-1])
        if self.ablate_scaler is not None:
            accumulate_ablate_scaler_(self.ablate_scaler, x, self.n_seen)
        self.n_seen = accumulate_hessian_(self.hessian, x, self.n_seen)


MAX_TRITON_SPARSEGPT_BLOCK = 512  # the block kernel keeps a row tile of this many columns in registers


def _prune_linear(
    linear: nn.Linear, stats: _GroupStatistics | None, config: PruneConfig, backend: str, hinv=None
) -> None:
    n, m = config.nm
    weight = linear.weight.data
    if config.method == "magnitude":
        prune_magnitude_(weight, config.sparsity_ratio, n, m, backend=backend)
    elif config.method == "wanda":
        prune_wanda_(weight, stats.act_sq_norms, config.sparsity_ratio, n, m, config.use_variant, backend=backend)
    else:
        sparsegpt_backend = backend if config.blocksize <= MAX_TRITON_SPARSEGPT_BLOCK else "torch"
        if config.method == "sparsegpt":
            prune_sparsegpt_(
                weight, None, config.sparsity_ratio, n, m, config.blocksize, hinv=hinv, backend=sparsegpt_backend
            )
        else:
            prune_ablate_(weight, config.method, hinv, stats.ablate_scaler, config.sparsity_ratio, n, m,
                          config.blocksize, backend=sparsegpt_backend)  # fmt: skip


def _collect_statistics(
    layer: nn.Module, groups: list[list[str]], inputs: LayerInputs, config: PruneConfig, backend: str,
    device: torch.device,
) -> dict[str, _GroupStatistics]:  # fmt: skip
    """One pass of the layer over every batch, with a hook on each group's first Linear; starts from zeros,
    so a pass cut short (out of memory) is simply run again."""
    modules = dict(layer.named_modules())
    stats = {
        group[0]: _GroupStatistics(config.method, modules[group[0]].in_features, device, backend) for group in groups
    }
    seen_in_batch: set[str] = set()

    def collect(name: str, _module: nn.Module, args: tuple) -> None:
        stats[name].add(args[0])
        seen_in_batch.add(name)
        # Once every group has its input, the rest of the layer (the last group's own GEMMs, e.g. fc2 /
        # down_proj, a third of a layer's FLOPs) only feeds nothing. Counted, not "at the last group": a Linear
        # the adapter does not list runs wherever the model calls it.
        if len(seen_in_batch) == len(stats):
            raise StopForward

    def start_batch(_layer, args) -> None:
        seen_in_batch.clear()
        for group_stats in stats.values():
            group_stats.samples_in_batch = args[0].shape[0]

    handles = [modules[name].register_forward_pre_hook(functools.partial(collect, name)) for name in stats]
    handles.append(layer.register_forward_pre_hook(start_batch))
    try:
        feed_layer(layer, inputs, device)
    finally:
        for h in handles:
            h.remove()
    unseen = sorted(name for name, group_stats in stats.items() if group_stats.inputs_seen == 0)
    if unseen:  # pruning on empty statistics would zero these weights (SparseGPT) or rank them at random (Wanda)
        raise UnsupportedModelError(
            f"{', '.join(unseen)} received no input when the decoder layer ran on the calibration data, so it "
            "cannot be pruned from activations; this layer's forward skips it (use --prune_method magnitude)"
        )
    return stats


def _collect_and_prune(
    layer: nn.Module,
    groups: list[list[str]],
    inputs: LayerInputs,
    config: PruneConfig,
    backend: str,
    device: torch.device,
    what: str,
) -> None:
    modules = dict(layer.named_modules())
    stats = with_smaller_batches_on_oom(
        inputs, lambda: _collect_statistics(layer, groups, inputs, config, backend, device), what
    )
    for group in groups:
        group_stats = stats[group[0]]
        hinv = None
        if config.method != "wanda":  # SparseGPT and its ablations
            # One damped Cholesky factorization per input group (q/k/v share it); the Hessian's storage
            # is its workspace, since nothing reads the Hessian afterwards.
            hinv = sparsegpt_inverse_hessian(group_stats.hessian, config.percdamp, inplace=True)
            group_stats.hessian = None
        for name in group:
            _prune_linear(modules[name], group_stats, config, backend, hinv)
        del hinv
    del stats


@torch.no_grad()
def prune_model(
    model: nn.Module,
    calibration_ids: torch.Tensor | None,
    method: str = "wanda",
    sparsity_ratio: float = 0.5,
    sparsity_type: str = "unstructured",
    **options,
) -> PruneReport:
    """Prune every Linear of every decoder layer of ``model`` in place; return a :class:`PruneReport`.

    ``calibration_ids``: LongTensor [nsamples, seqlen] (unused by magnitude). Options are the fields of
    :class:`pruning.config.PruneConfig` (use_variant, true_sequential, backend, calib_batch_size, ...).
    The model is pruned where it sits: on a GPU, across GPUs (``device_map``), or in CPU RAM, in which
    case each decoder layer is streamed to the GPU when there is one.
    """
    config = PruneConfig.from_options(
        method=method, sparsity_ratio=sparsity_ratio, sparsity_type=sparsity_type, **options
    )
    adapter = get_adapter(model)
    layers = adapter.layers(model)
    if sparsity_ratio > 0:  # before any layer is pruned (ratio 0 prunes nothing and needs no placement)
        check_layers_placeable(layers)
    first_device = compute_device_for(layers[0])
    backend = resolve_backend(config.backend, first_device)
    _check_nm_divisibility(layers, config)
    needs_data = config.method != "magnitude" and config.sparsity_ratio > 0  # ratio 0: nothing is pruned
    nsamples, seqlen = validate_calibration_ids(calibration_ids, model) if needs_data else (0, 0)
    batch_size = config.calib_batch_size or (
        auto_batch_size(model, adapter, nsamples, seqlen, first_device) if needs_data else 0
    )
    streamed = module_device(layers[0]).type == "cpu" and first_device.type == "cuda"
    report = PruneReport(
        config.method, config.sparsity_type, config.sparsity_ratio, backend, nsamples, seqlen, batch_size, streamed
    )
    if first_device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(first_device)
    model.eval()
    start = time.perf_counter()
    if config.sparsity_ratio == 0:
        log.info("sparsity_ratio 0: nothing to prune")
    else:
        _prune_layers(model, adapter, layers, calibration_ids, config, backend, batch_size, report)
    report.seconds = time.perf_counter() - start
    if not report.layers:  # nothing pruned: measure what the model holds
        report.actual_sparsity = check_sparsity(model, log_layers=False)
    if first_device.type == "cuda":
        report.peak_gpu_memory_bytes = torch.cuda.max_memory_allocated(first_device)
    log.info("pruned to %.4f sparsity in %.1f s", report.actual_sparsity, report.seconds)
    return report


def _prune_layers(model, adapter, layers, calibration_ids, config, backend, batch_size, report) -> None:
    inputs = None
    store = None
    if config.method != "magnitude":
        device = compute_device_for(layers[0])
        hidden_bytes = calibration_ids.numel() * model.config.hidden_size * next(model.parameters()).element_size()
        store = activation_store(hidden_bytes, device)
        inputs = capture_layer_inputs(model, adapter, calibration_ids, batch_size, store)
    zeros = total = 0
    for index, layer in enumerate(tqdm(layers, desc=f"{config.method} {config.sparsity_type}", unit="layer")):
        t0 = time.perf_counter()
        device = compute_device_for(layer)
        with on_device([layer], device):
            groups = adapter.groups_for(layer)
            if config.method == "magnitude":
                modules = dict(layer.named_modules())
                for name in (n for g in groups for n in g):
                    _prune_linear(modules[name], None, config, backend)
            else:
                for stage in [[g] for g in groups] if config.true_sequential else [groups]:
                    what = f"collecting layer {index}'s statistics"
                    _collect_and_prune(layer, stage, inputs, config, backend, device, what)
                recompute = functools.partial(run_layer, layer, inputs, device, store)
                inputs.hidden = with_smaller_batches_on_oom(inputs, recompute, f"recomputing layer {index}'s outputs")
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds = time.perf_counter() - t0
            layer_zeros, layer_total = linear_zero_counts(layer)  # counted where the layer is (GPU if streamed)
        zeros, total = zeros + layer_zeros, total + layer_total
        sparsity = layer_zeros / max(layer_total, 1)
        report.layers.append(LayerReport(index, seconds, sparsity))
        log.info("layer %d: %.2f s, sparsity %.4f", index, seconds, sparsity)
    report.actual_sparsity = zeros / max(total, 1)
    if inputs is not None:
        report.calib_batch_size = inputs.max_batch  # smaller than asked if a batch ran out of memory
