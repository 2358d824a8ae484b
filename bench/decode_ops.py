"""Operations per decoder layer in one decode step: ``python -m bench.decode_ops`` (CPU; no GPU needed).

At decode sizes every operation besides the Linears is a launch of almost no work, so their number per layer
is what the fusions in ``pruning.infer.fusion`` and the decoder's cache writes cut. Counted with a dispatch mode on
tiny configs, one step of ``GreedyDecoder`` after a prefill: every torch operation except views (each about
one GPU kernel), and each of our Triton kernels as one (the torch operations the interpreter runs inside it
are not counted). Transformers versions differ, so the table names the one it ran with.
"""

from __future__ import annotations

import collections
import contextlib
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

VIEWS = {
    "view", "_unsafe_view", "reshape", "expand", "transpose", "t", "unsqueeze", "squeeze", "permute", "slice",
    "select", "as_strided", "alias", "detach", "split", "split_with_sizes", "unbind", "lift_fresh",
    "promote_types", "_to_copy_noop",
}  # fmt: skip
KERNELS = {  # module, function: our Triton kernels the decode step can launch
    ("wanda_kernels.rmsnorm", "rms_norm"),
    ("wanda_kernels.rmsnorm", "add_rms_norm"),
    ("wanda_kernels.rope", "rotary"),
    ("wanda_kernels.kv_cache", "write_kv_cache_"),
    ("wanda_kernels.silu_mul", "silu_mul"),
    ("wanda_kernels.sparse24_mm", "sparse24_linear"),
}


class _LayerOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: list[str] = []
        self.inside_kernel = 0
        self.active = False  # within the counted layer

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not self.inside_kernel and name not in VIEWS:
            self.ops.append(name)
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def _kernels_counted_once(*modes: _LayerOps):
    """Each of our kernels counted as one operation by every active mode. Must be entered before the decoder is
    built: it picks its cache-write function once, at construction."""
    import importlib

    originals = []
    for module_name, function_name in KERNELS:
        module = importlib.import_module(module_name)
        original = getattr(module, function_name)

        def counted(*args, _original=original, _name=function_name, **kwargs):
            for mode in modes:
                if mode.active and not mode.inside_kernel:
                    mode.ops.append(f"triton:{_name}")
                mode.inside_kernel += 1
            try:
                return _original(*args, **kwargs)
            finally:
                for mode in modes:
                    mode.inside_kernel -= 1

        setattr(module, function_name, counted)
        originals.append((module, function_name, original))
    try:
        yield
    finally:
        for module, function_name, original in originals:
            setattr(module, function_name, original)


def layer_ops(family: str, small_ops: bool, projections: bool) -> tuple[list[str], int]:
    """The operations of the second decoder layer in one decode step, and how many the step runs outside its
    decoder layers (embedding, mask, final norm, head, argmax)."""
    from bench.fixtures.models import tiny_model
    from pruning.adapters import get_adapter
    from pruning.infer import GreedyDecoder, fuse_projections_, fuse_small_ops_

    model = tiny_model(family)
    if small_ops:
        fuse_small_ops_(model, backend="triton")  # the kernels, under the interpreter on the CPU
    if projections:
        fuse_projections_(model)
    mode, whole = _LayerOps(), _LayerOps()
    layer = get_adapter(model).layers(model)[1]

    def enter(*_) -> None:  # a pre-hook's return value would replace the layer's inputs
        mode.active = True
        mode.__enter__()

    def leave(*_) -> None:
        mode.__exit__(None, None, None)
        mode.active = False

    with _kernels_counted_once(mode, whole):
        decoder = GreedyDecoder(model, batch=1, max_len=16, use_graph=False, backend="triton")
        decoder.prefill(torch.randint(0, 96, (1, 4), generator=torch.Generator().manual_seed(0)))
        hooks = [layer.register_forward_pre_hook(enter), layer.register_forward_hook(leave)]
        decoder.step()
        for hook in hooks:
            hook.remove()
        whole.active = True
        with whole:
            decoder.step()
    n_layers = len(get_adapter(model).layers(model))
    return mode.ops, len(whole.ops) - n_layers * len(mode.ops)


def main() -> int:
    import transformers

    print(f"operations per decoder layer, one decode step (transformers {transformers.__version__}, torch "
          f"{torch.__version__})")  # fmt: skip
    rows = [("llama", False, False), ("llama", True, False), ("llama", True, True), ("opt", False, False),
            ("opt", False, True)]  # fmt: skip
    for family, small_ops, projections in rows:
        ops, outside = layer_ops(family, small_ops, projections)
        label = (
            f"{family}, "
            + ("fuse_small_ops_" if small_ops else "as written")
            + (", fused projections" if projections else "")
        )
        print(f"{label:48s} {len(ops):3d} per layer, {outside:3d} outside the layers  {dict(collections.Counter(ops))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
