"""Fewer, larger kernels per decoder layer for inference: the same outputs from fewer launches.

* :func:`fuse_small_ops_` (LLaMA family): one kernel for each RMSNorm (with the residual sum after attention),
  each rotary embedding and each MLP activation ``silu(gate) * up``; the norm within 1 ulp, the rest exact.
* :func:`fuse_projections_`: the Linears that read one input (q/k/v; LLaMA's gate/up) run as one product,
  dense or :class:`pruning.infer.Sparse24Linear`. A fused model is for inference only: it cannot be saved.
``backend`` follows ``wanda_kernels.policy``. Why each fusion pays at decode sizes: docs/inference.md.
"""

from __future__ import annotations

import contextvars
import functools
import sys
import weakref

import torch
from torch import nn

from wanda_kernels.policy import BACKENDS, use_kernel


class FusedRMSNorm(nn.Module):
    """transformers' ``LlamaRMSNorm`` as one kernel where Triton runs; the torch formula elsewhere."""

    def __init__(self, weight: nn.Parameter, eps: float, backend: str = "auto"):
        super().__init__()
        self.weight = weight
        self.variance_epsilon = eps
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from wanda_kernels.reference import rms_norm_torch
        from wanda_kernels.rmsnorm import rms_norm

        op = rms_norm if self.weight.device == x.device and use_kernel(self.backend, x) else rms_norm_torch
        return op(x, self.weight, self.variance_epsilon)

    def add_and_norm(self, residual: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(residual + delta, self(residual + delta))`` with one kernel."""
        from wanda_kernels.reference import add_rms_norm_torch
        from wanda_kernels.rmsnorm import add_rms_norm

        fits = self.weight.device == residual.device and delta.dtype == residual.dtype and delta.shape == residual.shape
        op = add_rms_norm if fits and use_kernel(self.backend, residual) else add_rms_norm_torch
        return op(residual, delta, self.weight, self.variance_epsilon)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}, fused"


def fused_apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1, *, fallback, backend: str = "auto"):
    """``apply_rotary_pos_emb`` through one kernel; ``fallback`` (the model's own function) for what the kernel
    does not cover: another head layout, mixed dtypes, or tensors where the backend runs the reference."""
    from wanda_kernels.rope import rotary

    covered = (
        unsqueeze_dim == 1 and q.ndim == k.ndim == 4 and cos.ndim == sin.ndim == 3
        and cos.shape == sin.shape and cos.shape[0] in (1, q.shape[0]) and cos.shape[1:] == q.shape[2:]
        and k.shape[0] == q.shape[0] and k.shape[2:] == q.shape[2:] and q.shape[-1] % 2 == 0
        and q.dtype == k.dtype == cos.dtype == sin.dtype
        and q.device == k.device == cos.device == sin.device and use_kernel(backend, q)
    )  # fmt: skip
    if not covered:
        return fallback(q, k, cos, sin, unsqueeze_dim)
    return rotary(q, k, cos, sin)


# The backend of the fused attention running in this thread (or task), None outside one.
_FUSED_ROTARY_BACKEND: contextvars.ContextVar[str | None] = contextvars.ContextVar("fused_rotary", default=None)


def _rotary_dispatch(original, *args, **kwargs):
    """Stands, once and for good, for a modeling module's ``apply_rotary_pos_emb``: the model's own function,
    except inside the forward of an attention that :func:`fuse_small_ops_` fused (a context variable, so other
    threads and unfused models are never affected)."""
    backend = _FUSED_ROTARY_BACKEND.get()
    if backend is None:
        return original(*args, **kwargs)
    return fused_apply_rotary_pos_emb(*args, fallback=original, backend=backend, **kwargs)


def _install_rotary_dispatch(modeling) -> None:
    current = modeling.apply_rotary_pos_emb
    if not (isinstance(current, functools.partial) and current.func is _rotary_dispatch):
        modeling.apply_rotary_pos_emb = functools.partial(_rotary_dispatch, current)


def _fused_rotary_forward(forward, backend: str, *args, **kwargs):
    """``forward`` with the fused rotary embedding. Bound with functools.partial, so that a deep copy of the
    model calls the copy's own forward."""
    token = _FUSED_ROTARY_BACKEND.set(backend)
    try:
        return forward(*args, **kwargs)
    finally:
        _FUSED_ROTARY_BACKEND.reset(token)


def fuse_small_ops_(model: nn.Module, backend: str = "auto") -> dict[str, int]:
    """In place, for LLaMA-family models: each RMSNorm becomes a :class:`FusedRMSNorm` (sharing its weight),
    each attention applies the rotary embedding with one kernel, and each MLP its ``silu(gate) * up``. Returns
    how many of each the model now runs fused (zeros for models without them, e.g. OPT). Idempotent. Other
    architectures are refused: the swap finds its targets by name, and a norm or rotary function of the same
    name can compute something else (Gemma's 1 + weight scale, interleaved or partial rotary embeddings).
    ``backend``: ``wanda_kernels.policy``'s, decided per call from the tensors' device."""
    from pruning.adapters import get_adapter
    from pruning.adapters.llama import LLAMA

    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")

    counts = {"rms_norm": 0, "rotary": 0, "silu_mul": 0, "add_rms_norm": 0}
    if get_adapter(model) is not LLAMA:  # raises for an unsupported architecture
        return counts
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, FusedRMSNorm):
                child.backend = backend  # fused again: the backend asked for now
                counts["rms_norm"] += 1
            elif type(child).__name__.endswith("RMSNorm") and hasattr(child, "variance_epsilon"):
                setattr(parent, name, FusedRMSNorm(child.weight, child.variance_epsilon, backend))
                counts["rms_norm"] += 1
    for module in model.modules():
        modeling = sys.modules.get(type(module).__module__)
        is_attention = hasattr(module, "q_proj") and hasattr(module, "k_proj")
        if is_attention and hasattr(modeling, "apply_rotary_pos_emb"):
            _install_rotary_dispatch(modeling)
            forward = module.forward
            if isinstance(forward, functools.partial) and forward.func is _fused_rotary_forward:
                forward = forward.args[0]  # fused before: keep the original forward, take the new backend
            module.forward = functools.partial(_fused_rotary_forward, forward, backend)
            counts["rotary"] += 1
        if _is_silu_gated_mlp(module):
            forward = module.forward
            if not isinstance(forward, functools.partial) or forward.func is _gated_mlp_forward:
                module.forward = functools.partial(_gated_mlp_forward, module, backend)
            counts["silu_mul"] += 1
    for layer in LLAMA.layers(model):
        norms = (getattr(layer, "input_layernorm", None), getattr(layer, "post_attention_layernorm", None))
        if all(isinstance(n, FusedRMSNorm) for n in norms) and hasattr(layer, "self_attn") and hasattr(layer, "mlp"):
            if not isinstance(layer.forward, functools.partial):
                layer.forward = functools.partial(_decoder_layer_forward, layer, layer.forward)
            counts["add_rms_norm"] += 1
    return counts


def _decoder_layer_forward(layer: nn.Module, original_forward, hidden_states: torch.Tensor, *args, **kwargs):
    """transformers' LLaMA-family decoder layer (norm, attention, residual, norm, MLP, residual) with the
    attention's residual sum and the post-attention norm as one kernel. The arguments reach the attention as
    the layer received them; positional ones (not what transformers passes) go to the layer as written."""
    if args:
        return original_forward(hidden_states, *args, **kwargs)
    residual = hidden_states
    hidden_states, _ = layer.self_attn(hidden_states=layer.input_layernorm(hidden_states), **kwargs)
    residual, hidden_states = layer.post_attention_layernorm.add_and_norm(residual, hidden_states)
    return residual + layer.mlp(hidden_states)


def _is_silu_gated_mlp(module: nn.Module) -> bool:
    """LLaMA's MLP: ``down_proj(act_fn(gate_proj(x)) * up_proj(x))`` with SiLU."""
    act = getattr(module, "act_fn", None)
    is_silu = isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation"
    return is_silu and all(hasattr(module, name) for name in ("gate_proj", "up_proj", "down_proj"))


def _gated_mlp_forward(mlp: nn.Module, backend: str, x: torch.Tensor) -> torch.Tensor:
    """The MLP with ``silu(gate) * up`` as one kernel (two in torch)."""
    from wanda_kernels.reference import silu_mul_torch
    from wanda_kernels.silu_mul import silu_mul

    gate, up = mlp.gate_proj(x), mlp.up_proj(x)
    fits = gate.dtype == up.dtype and gate.shape == up.shape
    op = silu_mul if fits and use_kernel(backend, gate) else silu_mul_torch
    return mlp.down_proj(op(gate, up))


class SharedInputLinears(nn.Module):
    """Linears that read one input, run as one ``fused`` module; each original Linear becomes a
    :class:`ProjectionSlice` that returns its columns of the fused output.

    The first slice called with an input computes the fused product; the others, called with that same tensor
    object, take their part of it. Once every part has been taken, the output is released. A slice called with
    another input (or twice) recomputes, so the results are right whatever the call order."""

    def __init__(self, fused: nn.Module, out_sizes: list[int]):
        super().__init__()
        self.fused = fused
        self.bounds = [(sum(out_sizes[:i]), sum(out_sizes[: i + 1])) for i in range(len(out_sizes))]
        self._input: weakref.ref | None = None
        self._output: torch.Tensor | None = None
        self._pending: set[int] = set()

    def part(self, index: int, x: torch.Tensor) -> torch.Tensor:
        if self._input is None or self._input() is not x or index not in self._pending:
            self._output = self.fused(x)
            self._input = weakref.ref(x)
            self._pending = set(range(len(self.bounds)))
        begin, end = self.bounds[index]
        out = self._output[..., begin:end]  # a view: last-dim stride 1, as attention and the MLP need
        self._pending.discard(index)
        if not self._pending:
            self._input = self._output = None
        return out


class ProjectionSlice(nn.Module):
    """Stands where one of the fused Linears was (``q_proj``, ...): its output columns of the shared product."""

    def __init__(self, shared: SharedInputLinears, index: int, in_features: int, out_features: int):
        super().__init__()
        self.shared = shared
        self.index = index
        self.in_features, self.out_features = in_features, out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shared.part(self.index, x)

    def extra_repr(self) -> str:
        return f"part {self.index} of {len(self.shared.bounds)}, in_features={self.in_features}, out_features={self.out_features}"  # noqa: E501


def _concat_linears(modules: list[nn.Module]) -> nn.Module | None:
    from pruning.infer.sparse_linear import Sparse24Linear

    first = modules[0]
    if any(type(m) is not type(first) for m in modules):
        return None
    if isinstance(first, Sparse24Linear):
        return Sparse24Linear.concat_rows(modules)
    if type(first) is not nn.Linear:
        return None
    same = all(m.in_features == first.in_features and (m.bias is None) == (first.bias is None) for m in modules)
    if not same or len({(m.weight.dtype, m.weight.device) for m in modules}) != 1:
        return None
    weight = first.weight
    fused = nn.Linear(first.in_features, sum(m.out_features for m in modules), bias=first.bias is not None,
                      device=weight.device, dtype=weight.dtype)  # fmt: skip
    with torch.no_grad():
        fused.weight.copy_(torch.cat([m.weight for m in modules]))
        if first.bias is not None:
            fused.bias.copy_(torch.cat([m.bias for m in modules]))
    return fused


@torch.no_grad()
def fuse_projections_(model: nn.Module) -> int:
    """In place: in every decoder layer, each group of Linears that read the same input (the adapter's
    ``linear_groups``: q/k/v, LLaMA's gate/up) becomes one module, dense or 2:4. Returns how many groups were
    fused. Groups of mixed kinds, dtypes or bias presence are left as they are. Idempotent."""
    from pruning.adapters import get_adapter

    adapter = get_adapter(model)
    fused_groups = 0
    for layer in adapter.layers(model):
        for names in adapter.linear_groups:
            if len(names) < 2:
                continue
            modules = [layer.get_submodule(name) for name in names]
            fused = _concat_linears(modules)
            if fused is None:
                continue
            shared = SharedInputLinears(fused, [m.out_features for m in modules])
            for index, (name, module) in enumerate(zip(names, modules, strict=True)):
                parent_name, _, child = name.rpartition(".")
                parent = layer.get_submodule(parent_name) if parent_name else layer
                setattr(parent, child, ProjectionSlice(shared, index, module.in_features, module.out_features))
            fused_groups += 1
    return fused_groups


def has_fused_projections(model: nn.Module) -> bool:
    return any(isinstance(m, ProjectionSlice) for m in model.modules())


def check_not_fused(model: nn.Module) -> None:
    """Refuse to save a model whose projections share fused weights (safetensors cannot hold the views)."""
    if has_fused_projections(model):
        raise ValueError(
            "this model's projections are fused for inference (pruning.infer.fuse_projections_); "
            "save it before fusing, or reload it"
        )
