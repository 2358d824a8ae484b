"""The runtime 2:4 Linear: numerically ``F.linear`` on the dense-with-zeros weight, stored packed.

Storage: kept values [O, C/2] (model dtype) and 2-bit indices uint8 [O, C/8] (``wanda_kernels.pack24``); for a
weight that is 2:4 only in a permuted input order (``pruning.permutation``, carried), also ``input_perm`` int64 [C]:
the packed weight is ``W[:, input_perm]`` and the input is gathered ``x[..., input_perm]`` before the product.
Forward: on the CPU the dense weight (unpacked once); on CUDA the fastest of our Triton GEMV (M <= 16 rows),
cuSPARSELt and, on sm8x, torch's CUTLASS 2:4 GEMM, timed once per row count outside graph capture.
Why these candidates and how one is chosen: docs/sparse24.md.
"""

from __future__ import annotations

import logging
import os
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from wanda_kernels import reference
from wanda_kernels.policy import resolve_backend

log = logging.getLogger(__name__)

CUSPARSELT_ROW_MULTIPLE = 16  # dense operand rows are padded to this for cuSPARSELt
CUSPARSELT_SEARCH_ENV = "WANDA_CUSPARSELT_SEARCH"  # "1": run cuSPARSELt's algorithm search (off by default)


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

    def __init__(
        self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype, device=None, permuted: bool = False
    ):
        super().__init__()
        if in_features % 8:
            raise ValueError(f"Sparse24Linear needs in_features divisible by 8, got {in_features}")
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("values", torch.empty(out_features, in_features // 2, dtype=dtype, device=device))
        self.register_buffer("meta", torch.empty(out_features, in_features // 8, dtype=torch.uint8, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device)) if bias else None
        perm = torch.empty(in_features, dtype=torch.long, device=device) if permuted else None
        self.register_buffer("input_perm", perm)  # None: not in the state dict
        self._dense_cache: torch.Tensor | None = None  # CPU: the weight in the original input order
        self._packed_cache: torch.Tensor | None = None  # CUDA's dense fallback: in the packed order
        self._cslt_weight: torch.Tensor | None = None
        self._cslt_alg: dict[int, int] = {}
        self._cutlass_weight: torch.Tensor | None = None
        # row count (padded to 16 above decode_max_tokens) -> "triton" | "cusparselt" | "cutlass" | "dense"
        self._backends: dict[int, str] = {}

    @classmethod
    def from_linear(cls, linear: nn.Linear, name: str = "linear") -> Sparse24Linear:
        """Pack a 2:4-pruned Linear; ValueError naming ``name`` if its weight is not 2:4."""
        weight = linear.weight.data
        perm = getattr(linear, "input_permutation", None)
        try:
            module = cls(
                linear.in_features, linear.out_features, linear.bias is not None, weight.dtype, weight.device,
                permuted=perm is not None,
            )  # fmt: skip
            values, meta = _pack(weight if perm is None else weight[:, perm.to(weight.device)].contiguous())
        except ValueError as err:
            raise ValueError(f"cannot store {name} as 2:4: {err}") from None
        module.values.copy_(values)
        module.meta.copy_(meta)
        if perm is not None:
            module.input_perm.copy_(perm)
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
        if any(not _same_perm(m.input_perm, first.input_perm) for m in modules):
            raise ValueError("only Sparse24Linears with the same input permutation (or none) can be concatenated")
        out_features = sum(m.out_features for m in modules)
        fused = cls(
            first.in_features, out_features, first.bias is not None, first.values.dtype, first.values.device,
            permuted=first.input_perm is not None,
        )  # fmt: skip
        if first.input_perm is not None:
            fused.input_perm.copy_(first.input_perm)
        fused.values.copy_(torch.cat([m.values for m in modules]))
        fused.meta.copy_(torch.cat([m.meta for m in modules]))
        if first.bias is not None:
            fused.bias.data.copy_(torch.cat([m.bias.data for m in modules]))
        return fused

    def to_dense(self) -> torch.Tensor:
        """The dense [O, C] weight with exact zeros, in the input order of the Linear it replaces."""
        packed = self.packed_dense()
        if self.input_perm is None:
            return packed
        dense = torch.empty_like(packed)
        dense[:, self.input_perm] = packed
        return dense

    def packed_dense(self) -> torch.Tensor:
        """The dense form of what is packed: 2:4 in every row, ``W[:, input_perm]`` if permuted."""
        return _unpack(self.values, self.meta)

    def extra_repr(self) -> str:
        permuted = ", input permuted" if self.input_perm is not None else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"2:4{permuted}"
        )

    def invalidate_caches(self) -> None:
        """Drop every derived form of the weight (dense, cuSPARSELt, CUTLASS) and the backend choices; call it
        after editing ``values`` or ``meta`` in place. Moves and ``load_state_dict`` call it themselves."""
        self._dense_cache = self._packed_cache = self._cslt_weight = self._cutlass_weight = None
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
        if self.input_perm is not None:  # one gather of x per call (a cost bench/inference.py measures)
            x = x.index_select(-1, self.input_perm)
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
        compression), then timed over 3 calls. If none runs (old GPU, missing
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
        """cuSPARSELt: weight compressed once, its default algorithm (``_cusparselt_algorithm``), bias fused, the
        product written transposed so that the [M, O] result is contiguous."""
        x2d = x.reshape(-1, self.in_features)
        n_tokens = x2d.shape[0]
        padded = -(-n_tokens // CUSPARSELT_ROW_MULTIPLE) * CUSPARSELT_ROW_MULTIPLE
        if self._cslt_weight is None:
            self._cslt_weight = torch._cslt_compress(self.packed_dense())
        if padded != n_tokens:
            x2d = F.pad(x2d, (0, 0, 0, padded - n_tokens))
        dense_b = x2d.t()  # [C, M] view: W @ x^T, written back transposed = contiguous [M, O]
        alg = self._cslt_alg.get(padded)
        if alg is None:
            alg = self._cslt_alg[padded] = _cusparselt_algorithm(self._cslt_weight, dense_b, self.bias)
        y = torch._cslt_sparse_mm(self._cslt_weight, dense_b, bias=self.bias, transpose_result=True, alg_id=alg)
        return y[:n_tokens].contiguous().reshape(*x.shape[:-1], self.out_features)

    def _cutlass_linear(self, x: torch.Tensor) -> torch.Tensor:
        """torch's CUTLASS 2:4 GEMM (sm8x), through its semi-structured tensor subclass."""
        if self._cutlass_weight is None:
            from torch.sparse import SparseSemiStructuredTensorCUTLASS

            self._cutlass_weight = SparseSemiStructuredTensorCUTLASS.from_dense(self.packed_dense())
        y = F.linear(x.reshape(-1, self.in_features), self._cutlass_weight, self.bias)
        return y.contiguous().reshape(*x.shape[:-1], self.out_features)

    def _dense_linear(self, x: torch.Tensor) -> torch.Tensor:  # x already gathered: the packed order
        if self._packed_cache is None:
            self._packed_cache = self.packed_dense()
        return F.linear(x, self._packed_cache, self.bias)


def _cusparselt_algorithm(compressed: torch.Tensor, dense_b: torch.Tensor, bias: torch.Tensor | None) -> int:
    """cuSPARSELt's algorithm id: 0 (its default, as ``to_sparse_semi_structured`` uses) unless
    ``WANDA_CUSPARSELT_SEARCH=1`` asks for its search: on an H200 with torch 2.11 the search failed with an internal
    error, and the next kernel launched reported an illegal instruction (docs/sparse24.md)."""
    if os.environ.get(CUSPARSELT_SEARCH_ENV) != "1":
        return 0
    return torch._cslt_sparse_mm_search(compressed, dense_b, bias=bias, transpose_result=True)


def _same_perm(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))


def _pack(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if resolve_backend("auto", weight.device) == "triton":
        return _kernels()[0].pack_24(weight)
    return reference.pack_24_torch(weight)


def _unpack(values: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    if resolve_backend("auto", values.device) == "triton":
        return _kernels()[0].unpack_24(values, meta)
    return reference.unpack_24_torch(values, meta)
