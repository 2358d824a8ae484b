"""Every up-front check of a pruning run, made once, before any weight changes.

:func:`check_config` needs only the configs (run it before loading a model): the backend can run in this
process, and the model's layers share one attention mask. :func:`plan` needs the loaded model: where each
layer runs, N:M group widths, the calibration ids, and the calibration batch size. ``prune_model`` makes a
plan unless it is handed one; the CLI makes it right after loading, so a mistake costs seconds, not a job.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from pruning.adapters import DecoderAdapter, check_one_mask_for_every_layer, get_adapter
from pruning.config import OPTIMIZERS, PruneConfig
from pruning.errors import OptionError
from pruning.memory import host_memory, size
from pruning.placement import activation_store, check_layers_placeable, compute_device_for, module_device
from pruning.statistics import collected_for
from wanda_kernels.policy import resolve_backend


@dataclass(frozen=True)
class PrunePlan:
    """What a checked run will do: the layers and where they run, the kernels, the calibration batches."""

    config: PruneConfig
    adapter: DecoderAdapter
    layers: nn.ModuleList
    device: torch.device  # where decoder layer 0 runs
    backend: str  # "triton" or "torch", resolved for ``device``
    nsamples: int
    seqlen: int
    batch_size: int  # calibration samples per forward (0 when nothing is calibrated)
    streamed: bool  # the model in CPU RAM, one layer at a time on the GPU
    store: torch.device  # where the calibration activations are kept
    host_bytes: int  # estimated host memory the run needs beyond the loaded model
    device_bytes: int  # estimated memory on ``device`` beyond the loaded model (0 on the CPU)
    model_id: int = 0  # id() of the model it was made for

    def check_for(self, model: nn.Module, config: PruneConfig, calibration_ids: torch.Tensor | None) -> None:
        """Refuse to run this plan on another model, config or calibration shape than it was made for."""
        if id(model) != self.model_id or self.layers is not self.adapter.layers(model):
            raise ValueError("plan was made for another model than the one given; make a plan for this one")
        if self.config != config:
            raise ValueError("plan was made for another PruneConfig than the one given")
        shape = tuple(calibration_ids.shape) if isinstance(calibration_ids, torch.Tensor) else None
        if self.config.needs_calibration and shape != (self.nsamples, self.seqlen):
            raise ValueError(
                f"plan was made for calibration_ids of shape {(self.nsamples, self.seqlen)}, got {shape}; make a plan "
                "for these ids"
            )


def _backend_for(backend: str, device: torch.device) -> str:
    try:
        return resolve_backend(backend, device)
    except ValueError:
        raise OptionError(
            "{backend} triton needs a CUDA GPU (or TRITON_INTERPRET=1 on CPU); use {backend} torch"
        ) from None


def check_backend(config: PruneConfig) -> None:
    """The kernels asked for can run in this process (no model needed)."""
    _backend_for(config.backend, torch.device("cuda" if torch.cuda.is_available() else "cpu"))


def check_model_config(config: PruneConfig, model_config) -> None:
    """What the model's config alone decides: pruning runs every layer with layer 0's attention mask."""
    if config.prunes:
        check_one_mask_for_every_layer(model_config)


def check_config(config: PruneConfig, model_config) -> None:
    """The checks that need no weights: run before loading a model."""
    check_backend(config)
    check_model_config(config, model_config)


def plan(
    model: nn.Module, config: PruneConfig, calibration_ids: torch.Tensor | None, config_checked: bool = False
) -> PrunePlan:
    """Check that ``model`` can be pruned as ``config`` says from ``calibration_ids`` and size the work.
    ``config_checked``: :func:`check_config` already ran for this config (the CLI runs it before loading)."""
    if not config_checked:
        check_config(config, model.config)
    adapter = get_adapter(model)
    layers = adapter.layers(model)
    if config.prunes:  # before any layer is pruned (ratio 0 prunes nothing and needs no placement)
        check_layers_placeable(layers)
    device = compute_device_for(layers[0])
    backend = _backend_for(config.backend, device)
    check_nm_divisibility(layers, config)
    needs_data = config.needs_calibration
    nsamples, seqlen = validate_calibration_ids(calibration_ids, model) if needs_data else (0, 0)
    batch_size = config.calib_batch_size or (
        auto_batch_size(model, adapter, nsamples, seqlen, device) if needs_data else 0
    )
    batch_size = min(batch_size, nsamples)  # no forward holds more samples than there are
    streamed = module_device(layers[0]).type == "cpu" and device.type == "cuda"
    element = next(model.parameters()).element_size()
    activations = nsamples * seqlen * model.config.hidden_size * element  # one copy of a layer's inputs
    store = activation_store(activations, device) if needs_data else device
    statistics = statistics_bytes(adapter, layers, config)

    def estimate(store: torch.device) -> tuple[int, int, int]:
        return estimate_memory(
            layers, config, nsamples, seqlen, batch_size, model.config.hidden_size, element, device, store, streamed,
            statistics,
        )  # fmt: skip

    host, on_device, forward = estimate(store)
    if device.type == "cuda" and store.type == "cuda" and not fits_on(device, on_device - forward):
        store = torch.device("cpu")  # the activations go to CPU RAM rather than the run being refused
        host, on_device, forward = estimate(store)
    hessians = statistics if collected_for(config)[0] != "norms" and device.type == "cpu" else 0
    check_host_memory(host, nsamples, seqlen, hessians)
    # The forward is left out: smaller batches cure it (pruning.oom); the rest they cannot.
    check_device_memory(on_device - forward, device, nsamples, seqlen, streamed)
    return PrunePlan(
        dataclasses.replace(config), adapter, layers, device, backend, nsamples, seqlen, batch_size, streamed, store,
        host, on_device, id(model),
    )  # fmt: skip


def estimate_memory(
    layers: nn.ModuleList, config: PruneConfig, nsamples: int, seqlen: int, batch_size: int, hidden: int,
    element: int, device: torch.device, store: torch.device, streamed: bool, statistics: int,
) -> tuple[int, int, int]:  # fmt: skip
    """(host bytes, device bytes, of which one batch's forward) the run keeps alive at once beyond the loaded
    model: the layer inputs and outputs of every calibration sample, one layer's statistics (SparseGPT: a fp32
    [C, C] Hessian per Linear group, plus the factorization's workspace), one batch's forward, and a streamed
    layer's weights."""
    if not config.needs_calibration:
        return 0, 0, 0
    layer = layers[0]
    linears = [m for m in layer.modules() if isinstance(m, nn.Linear)]
    activations = 2 * nsamples * seqlen * hidden * element
    forward = batch_size * seqlen * (8 * hidden + 3 * max(m.out_features for m in linears)) * element
    layer_weights = sum(p.numel() * p.element_size() for p in layer.parameters()) if streamed else 0
    host = activations if store.type == "cpu" else 0
    on_device = statistics + forward + layer_weights + (activations if store.type != "cpu" else 0)
    if device.type == "cpu":
        return host + on_device, 0, 0
    return host, on_device, forward


def statistics_bytes(adapter: DecoderAdapter, layers: nn.ModuleList, config: PruneConfig) -> int:
    """One layer's calibration statistics, all alive during its statistics pass: Wanda, a fp32 norm per input
    feature of each group; SparseGPT (and its ablations), a fp32 [C, C] Hessian per Linear group (q/k/v share
    one) plus the factorization's workspace (ALPS and ADMM: their normalized Gram too); magnitude, none."""
    if not config.needs_calibration:
        return 0
    layer = layers[0]
    modules = dict(layer.named_modules())
    widths = [modules[group[0]].in_features for group in adapter.groups_for(layer)]
    if collected_for(config)[0] == "norms":
        return 4 * sum(widths)
    workspace = 2 * 4 * max(widths) ** 2
    if config.method in OPTIMIZERS or config.refine == "admm":  # float64 eigenvectors, the normalized Gram, the inverse
        workspace += (8 + 4 + 4) * max(widths) ** 2
    return 4 * sum(w * w for w in widths) + workspace


def check_host_memory(needed: int, nsamples: int, seqlen: int, hessians: int = 0) -> None:
    """Refuse now, in one line, a run whose host-memory estimate exceeds what this process may still take."""
    host = host_memory()
    if host.available is None or needed <= host.available:
        return
    if hessians > needed // 2:  # fewer samples would not help
        raise OptionError(
            f"not enough CPU memory (RAM) for SparseGPT's statistics: about {size(needed)} needed beyond the loaded "
            f"model, {size(hessians)} of it fp32 Hessians of the layer's input widths, {size(host.available)} "
            f"available ({host.bound}); use {{method}} wanda, or a machine with more memory"
        )
    raise OptionError(
        f"not enough CPU memory (RAM) for the calibration: about {size(needed)} needed for {nsamples} samples of "
        f"{seqlen} tokens beyond the loaded model, {size(host.available)} available ({host.bound}); use fewer "
        "{nsamples} or a smaller {seqlen}, or a machine with more memory"
    )


def validate_calibration_ids(calibration_ids: torch.Tensor | None, model: nn.Module) -> tuple[int, int]:
    """(nsamples, seqlen) of a [nsamples, seqlen] tensor of token ids, or a ValueError saying what is wrong."""
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


def check_nm_divisibility(layers: nn.ModuleList, config: PruneConfig) -> None:
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


def fits_on(device: torch.device, needed: int) -> bool:
    free, _ = torch.cuda.mem_get_info(device)
    return needed <= free


def check_device_memory(needed: int, device: torch.device, nsamples: int, seqlen: int, streamed: bool = False) -> None:
    """Refuse now a run whose GPU-memory estimate (what smaller batches cannot cure) exceeds the free memory of the
    GPU that runs the layers."""
    if device.type != "cuda" or needed == 0:
        return
    free, _ = torch.cuda.mem_get_info(device)
    if needed <= free:
        return
    fix = "fewer {nsamples} or a smaller {seqlen}" if streamed else (
        "{offload} (the model in CPU RAM, one layer at a time on the GPU), fewer {nsamples} or a smaller {seqlen}"
    )  # fmt: skip
    raise OptionError(
        f"not enough GPU memory on {device} for the calibration: about {size(needed)} needed beyond the loaded model "
        f"(statistics and activations for {nsamples} samples of {seqlen} tokens), {size(free)} free; use " + fix
    )
