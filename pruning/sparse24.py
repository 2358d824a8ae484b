"""2:4 compressed checkpoints and the sparse Linear that runs them.

Saving (``--save_format sparse24``): every decoder-layer Linear is packed into kept values [O, C/2]
(model dtype) + 2-bit indices uint8 [O, C/8] (``wanda_kernels.pack24``): 0.5625x the dense bytes. Other
weights are unchanged. ``config.json`` gains ``sparsity_config`` naming the format and the modules.

Loading: :func:`load_sparse` rebuilds the Hugging Face model with :class:`Sparse24Linear` in place of
those Linears. Its forward picks, per call:
  * CPU: the dense weight (unpacked once and cached; warns once), since nothing sparse is faster there;
  * CUDA, M <= ``decode_max_tokens`` rows: our Triton kernel reading the packed values and indices, or
    cuSPARSELt where it measures faster for that row count;
  * CUDA, larger M: cuSPARSELt through ``torch._cslt_sparse_mm`` with the weight compressed once, the
    best algorithm searched once per shape, the bias fused and the output written contiguous [M, O]
    (``transpose_result``), so the next ops (attention) keep their fast kernels. On sm8x, torch's CUTLASS
    2:4 GEMM is a candidate too.
The choice is timed once per row count (padded to 16 above ``decode_max_tokens``), outside CUDA-graph capture.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

FORMAT = "sparse24"
FORMAT_VERSION = 1
CUSPARSELT_ROW_MULTIPLE = 16  # dense operand rows are padded to this for cuSPARSELt


def _kernels():
    import wanda_kernels.pack24 as pack24
    import wanda_kernels.sparse24_mm as sparse24_mm

    return pack24, sparse24_mm


# RuntimeErrors that say nothing about whether a backend exists (torch.AcceleratorError: torch >= 2.8).
_FATAL_CUDA_ERRORS = (
    torch.OutOfMemoryError,
    *((torch.AcceleratorError,) if hasattr(torch, "AcceleratorError") else ()),
)


class Sparse24Linear(nn.Module):
    """A Linear whose weight is stored 2:4-compressed. Numerically F.linear on the dense-with-zeros weight."""

    decode_max_tokens = 16  # at or below, our Triton GEMV is a candidate (the first); above, the 2:4 GEMMs

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype, device=None):
        super().__init__()
        if in_features % 8:
            raise ValueError(f"Sparse24Linear needs in_features divisible by 8, got {in_features}")
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("values", torch.empty(out_features, in_features // 2, dtype=dtype, device=device))
        self.register_buffer("meta", torch.empty(out_features, in_features // 8, dtype=torch.uint8, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device)) if bias else None
        self._dense_cache: torch.Tensor | None = None
        self._cslt_weight: torch.Tensor | None = None
        self._cslt_alg: dict[int, int] = {}
        self._cutlass_weight: torch.Tensor | None = None
        # row count (padded to 16 above decode_max_tokens) -> "triton" | "cusparselt" | "cutlass" | "dense"
        self._backends: dict[int, str] = {}

    @classmethod
    def from_linear(cls, linear: nn.Linear, name: str = "linear") -> Sparse24Linear:
        """Pack a 2:4-pruned Linear; ValueError naming ``name`` if its weight is not 2:4."""
        weight = linear.weight.data
        try:
            module = cls(linear.in_features, linear.out_features, linear.bias is not None, weight.dtype, weight.device)
            values, meta = _pack(weight)
        except ValueError as err:
            raise ValueError(f"cannot store {name} as 2:4: {err}") from None
        module.values.copy_(values)
        module.meta.copy_(meta)
        if linear.bias is not None:
            module.bias.data.copy_(linear.bias.data)
        return module

    @classmethod
    def concat_rows(cls, modules: list[Sparse24Linear]) -> Sparse24Linear:
        """One module whose output is the concatenation of ``modules``' outputs (same input): the 2:4 format is
        row-wise, so the packed values and indices simply stack."""
        first = modules[0]
        if any(m.in_features != first.in_features or (m.bias is None) != (first.bias is None) for m in modules):
            raise ValueError("only Sparse24Linears with one in_features and all or no biases can be concatenated")
        out_features = sum(m.out_features for m in modules)
        fused = cls(first.in_features, out_features, first.bias is not None, first.values.dtype, first.values.device)
        fused.values.copy_(torch.cat([m.values for m in modules]))
        fused.meta.copy_(torch.cat([m.meta for m in modules]))
        if first.bias is not None:
            fused.bias.data.copy_(torch.cat([m.bias.data for m in modules]))
        return fused

    def to_dense(self) -> torch.Tensor:
        """The dense [O, C] weight with exact zeros."""
        return _unpack(self.values, self.meta)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, 2:4"

    def invalidate_caches(self) -> None:
        """Drop every derived form of the weight (dense, cuSPARSELt, CUTLASS) and the backend choices; call it
        after editing ``values`` or ``meta`` in place. Moves and ``load_state_dict`` call it themselves."""
        self._dense_cache = self._cslt_weight = self._cutlass_weight = None
        self._cslt_alg, self._backends = {}, {}

    def _apply(self, fn, recurse=True):
        self.invalidate_caches()  # a device or dtype move
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs):
        self.invalidate_caches()
        return super()._load_from_state_dict(*args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cuda":
            if self._dense_cache is None:
                warnings.warn("Sparse24Linear on CPU runs the dense weight (no sparse speed-up there)", stacklevel=2)
                self._dense_cache = self.to_dense()
            return F.linear(x, self._dense_cache, self.bias)
        return getattr(self, f"_{self._backend_for(x)}_linear")(x)

    def _backend_for(self, x: torch.Tensor) -> str:
        n_tokens = x.numel() // self.in_features
        small = n_tokens <= self.decode_max_tokens
        key = n_tokens if small else -(-n_tokens // CUSPARSELT_ROW_MULTIPLE) * CUSPARSELT_ROW_MULTIPLE
        backend = self._backends.get(key)
        if backend is None:  # the first call at this row count: everything below runs once
            if small:
                candidates = ["triton", "cusparselt"]
            else:
                candidates = ["cusparselt"]
                if torch.cuda.get_device_capability(x.device)[0] == 8:
                    candidates.append("cutlass")  # torch's CUTLASS 2:4 kernels support sm8x only
            if torch.cuda.is_current_stream_capturing():
                # Nothing can be timed inside a capture, and whatever runs is recorded into the graph: the first
                # candidate, undecided (the runners warm up before capturing, so this is the rare case).
                return candidates[0]
            backend = self._backends[key] = self._pick_backend(x, candidates)
            if backend == "triton" and "cusparselt" not in self._backends.values():
                self._cslt_weight = None  # only tried: free its copy of the weight
                self._cslt_alg.clear()  # in place: copies of this module may share the dict (bench)
        return backend

    def _pick_backend(self, x: torch.Tensor, candidates: list[str]) -> str:
        """The fastest of ``candidates`` for this row count: each is run once (Triton autotuning, weight
        compression, cuSPARSELt's algorithm search), then timed over 3 calls. If none runs (old GPU, missing
        library), the dense weight is used, with a warning."""
        times = {}
        for name in candidates:
            fn = getattr(self, f"_{name}_linear")
            try:
                fn(x)
                if len(candidates) == 1:
                    times[name] = 0.0
                    continue
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(3):
                    fn(x)
                end.record()
                end.synchronize()
                times[name] = start.elapsed_time(end)
            except _FATAL_CUDA_ERRORS:
                raise  # out of memory, or a broken CUDA context: not a missing kernel
            except (RuntimeError, TypeError, ValueError, NotImplementedError) as err:
                warnings.warn(f"Sparse24Linear: {name} is unavailable here ({err})", stacklevel=3)
        if not times:
            warnings.warn("Sparse24Linear: no sparse kernel runs on this GPU; using the dense weight", stacklevel=3)
            return "dense"
        best = min(times, key=times.get)
        log.debug("Sparse24Linear %dx%d, %d rows: %s (%s)", self.out_features, self.in_features,
                  x.numel() // self.in_features, best, times)  # fmt: skip
        return best

    def _triton_linear(self, x: torch.Tensor) -> torch.Tensor:
        """Our 2:4 GEMV (``wanda_kernels.sparse24_mm``): the packed values and indices, read once."""
        _, sparse24_mm = _kernels()
        return sparse24_mm.sparse24_linear(x, self.values, self.meta, self.bias)

    def _cusparselt_linear(self, x: torch.Tensor) -> torch.Tensor:
        """cuSPARSELt: weight compressed once, algorithm searched once per padded row count, bias fused, the
        product written transposed so that the [M, O] result is contiguous."""
        x2d = x.reshape(-1, self.in_features)
        n_tokens = x2d.shape[0]
        padded = -(-n_tokens // CUSPARSELT_ROW_MULTIPLE) * CUSPARSELT_ROW_MULTIPLE
        if self._cslt_weight is None:
            self._cslt_weight = torch._cslt_compress(self.to_dense())
        if padded != n_tokens:
            x2d = F.pad(x2d, (0, 0, 0, padded - n_tokens))
        dense_b = x2d.t()  # [C, M] view: W @ x^T, written back transposed = contiguous [M, O]
        alg = self._cslt_alg.get(padded)
        if alg is None:
            alg = self._cslt_alg[padded] = torch._cslt_sparse_mm_search(
                self._cslt_weight, dense_b, bias=self.bias, transpose_result=True
            )
        y = torch._cslt_sparse_mm(self._cslt_weight, dense_b, bias=self.bias, transpose_result=True, alg_id=alg)
        return y[:n_tokens].contiguous().reshape(*x.shape[:-1], self.out_features)

    def _cutlass_linear(self, x: torch.Tensor) -> torch.Tensor:
        """torch's CUTLASS 2:4 GEMM (sm8x), through its semi-structured tensor subclass."""
        if self._cutlass_weight is None:
            from torch.sparse import SparseSemiStructuredTensorCUTLASS

            self._cutlass_weight = SparseSemiStructuredTensorCUTLASS.from_dense(self.to_dense())
        y = F.linear(x.reshape(-1, self.in_features), self._cutlass_weight, self.bias)
        return y.contiguous().reshape(*x.shape[:-1], self.out_features)

    def _dense_linear(self, x: torch.Tensor) -> torch.Tensor:
        if self._dense_cache is None:
            self._dense_cache = self.to_dense()
        return F.linear(x, self._dense_cache, self.bias)


def _pack(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    from wanda_kernels import reference

    if weight.device.type == "cuda":
        pack24, _ = _kernels()
        return pack24.pack_24(weight)
    return reference.pack_24_torch(weight)


def _unpack(values: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    from wanda_kernels import reference

    if values.device.type == "cuda":
        pack24, _ = _kernels()
        return pack24.unpack_24(values, meta)
    return reference.unpack_24_torch(values, meta)


def check_packable(model: nn.Module) -> None:
    """Every decoder Linear must have in_features divisible by 8 for the packed format (2 groups per byte)."""
    from pruning.adapters import get_adapter

    adapter = get_adapter(model)
    bad = sorted(
        {f"{name} (in_features {m.in_features})" for layer in adapter.layers(model)
         for name, m in layer.named_modules() if isinstance(m, nn.Linear) and m.in_features % 8}
    )  # fmt: skip
    if bad:
        raise ValueError(
            f"--save_format sparse24 needs in_features divisible by 8; not so for {', '.join(bad)}: "
            "save with --save_format dense"
        )


def _pack_decoder_linears(model: nn.Module) -> list[tuple[str, nn.Module, str, nn.Linear, Sparse24Linear]]:
    """(full name, parent module, attribute, Linear, its packed form) for every decoder-layer Linear (a
    Sparse24Linear, as in a model from :func:`load_sparse`, is its own packed form). Raises a ValueError naming
    the first Linear that is not 2:4, before the model is touched."""
    from pruning.adapters import get_adapter

    adapter = get_adapter(model)
    packed = []
    for i, layer in enumerate(adapter.layers(model)):
        for name, module in layer.named_modules():
            if isinstance(module, (nn.Linear, Sparse24Linear)):
                full = f"{adapter.layers_path}.{i}.{name}"
                parent_name, _, attribute = name.rpartition(".")
                parent = layer.get_submodule(parent_name) if parent_name else layer
                sparse = module if isinstance(module, Sparse24Linear) else Sparse24Linear.from_linear(module, full)
                packed.append((full, parent, attribute, module, sparse))
    return packed


def compress_model_24(model: nn.Module) -> list[str]:
    """Replace every decoder-layer Linear with a :class:`Sparse24Linear` (in place). Returns the module
    names. Raises a ValueError naming the first Linear that is not 2:4, before anything is replaced."""
    packed = _pack_decoder_linears(model)
    for _, parent, attribute, _, sparse in packed:
        setattr(parent, attribute, sparse)
    return [full for full, *_ in packed]


@torch.no_grad()
def decompress_model_24_(model: nn.Module) -> list[str]:
    """Replace every :class:`Sparse24Linear` with an ``nn.Linear`` holding its exact dense-with-zeros weight
    (in place): a plain Hugging Face model again, for pruning or evaluation. Returns the module names."""
    names = [name for name, module in model.named_modules() if isinstance(module, Sparse24Linear)]
    for name in names:
        sparse = model.get_submodule(name)
        weight = sparse.to_dense()
        linear = nn.Linear(sparse.in_features, sparse.out_features, bias=sparse.bias is not None,
                           device=weight.device, dtype=weight.dtype)  # fmt: skip
        linear.weight.copy_(weight)
        if sparse.bias is not None:
            linear.bias.copy_(sparse.bias)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, linear)
    return names


def save_sparse(model: nn.Module, tokenizer, directory: Path, max_shard_size: int | str | None = None) -> Path:
    """``save_pretrained`` the model (safetensors) into ``directory`` (which the caller stages and renames
    atomically) with its decoder Linears 2:4-compressed. The model itself is left as it was: the packed
    modules stand in for the Linears only while it is written. ``max_shard_size``: as in ``save_pretrained``."""
    from pruning.fusion import check_not_fused

    check_not_fused(model)
    packed = _pack_decoder_linears(model)
    had_spec, previous_spec = hasattr(model.config, "sparsity_config"), getattr(model.config, "sparsity_config", None)
    try:
        for _, parent, attribute, _, sparse in packed:
            setattr(parent, attribute, sparse)
        model.config.sparsity_config = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "modules": [full for full, *_ in packed],
            "layout": "values [O, C/2] model dtype (kept entries, lower column first); "
            "meta uint8 [O, C/8]: 2-bit column-in-group of kept value 4b+i in bits [2i, 2i+2) of byte b",
        }
        model.save_pretrained(directory, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    finally:
        for _, parent, attribute, linear, _ in packed:
            setattr(parent, attribute, linear)
        if had_spec:
            model.config.sparsity_config = previous_spec
        else:
            del model.config.sparsity_config
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    return directory


def _read_state_dict(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = directory / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    state = {}
    for name in files:
        state.update(load_file(str(directory / name)))
    return state


def load_sparse(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """Load a ``--save_format sparse24`` checkpoint as a Hugging Face model with Sparse24Linear modules."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    directory = Path(path).expanduser()
    if not (directory / "config.json").exists():
        raise ValueError(f"{str(directory)!r} is not a saved model directory (no config.json)")
    config = AutoConfig.from_pretrained(directory)
    spec = getattr(config, "sparsity_config", None)
    if not isinstance(spec, dict) or spec.get("format") != FORMAT:
        raise ValueError(f"{str(directory)!r} is not a sparse24 checkpoint; load it with from_pretrained")
    if spec.get("version") != FORMAT_VERSION:
        raise ValueError(f"sparse24 format version {spec.get('version')} is not supported (this is {FORMAT_VERSION})")
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    for name in spec["modules"]:
        linear = model.get_submodule(name)
        parent_name, _, child = name.rpartition(".")
        sparse = Sparse24Linear(linear.in_features, linear.out_features, linear.bias is not None, dtype, "meta")
        setattr(model.get_submodule(parent_name), child, sparse)
    state = _read_state_dict(directory)
    result = model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    still_meta = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    still_meta += [n for n, b in model.named_buffers() if b.device.type == "meta"]
    if still_meta or result.unexpected_keys:
        raise ValueError(
            f"checkpoint does not match its config: missing {still_meta[:5]}, unexpected {result.unexpected_keys[:5]}"
        )
    for name in spec["modules"]:
        check_meta_order(model.get_submodule(name).meta, name)
    return model.to(device).eval()


def check_meta_order(meta: torch.Tensor, name: str) -> None:
    """The format stores each group's two positions in increasing order, which the GEMV kernel relies on;
    metadata that breaks it is corrupt (or written by something else), and is refused by name."""
    nibbles = torch.stack([meta & 15, meta >> 4], dim=-1).to(torch.int32)
    bad = int(((nibbles & 3) >= (nibbles >> 2)).sum())
    if bad:
        raise ValueError(
            f"{name}: corrupt 2:4 metadata, {bad} groups whose two positions are not in increasing order; "
            "re-export the checkpoint with --save_format sparse24"
        )
