"""Command line: ``wanda-prune`` / ``python -m pruning``. (The layer-sequential pruner lands next.)"""

from __future__ import annotations

import os
import sys
import time

import torch


def kernel_demo() -> int:
    """Prune one random [256 x 512] matrix with every kernel and check each against its torch reference."""
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import wanda_kernels as wk
    from wanda_kernels import reference as ref

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"wanda_kernels demo on {device} ({'GPU' if device.type == 'cuda' else 'Triton interpreter'})")
    gen = torch.Generator(device=device).manual_seed(0)
    weight = torch.randn(64, 512, generator=gen, device=device).to(torch.float16)
    acts = torch.randn(4, 128, 512, generator=gen, device=device).to(torch.float16)
    act_sq_norms = wk.accumulate_sq_norms_(torch.zeros(512, device=device), acts)
    for label, (sparsity, n, m) in {"unstructured 50%": (0.5, 0, 0), "2:4": (0.5, 2, 4), "4:8": (0.5, 4, 8)}.items():
        w, w_ref = weight.clone(), weight.clone()
        t0 = time.perf_counter()
        mask = wk.wanda_prune_(w, act_sq_norms, sparsity, n, m)
        elapsed = time.perf_counter() - t0
        same = torch.equal(mask, ref.wanda_prune_torch(w_ref, act_sq_norms, sparsity, n, m)) and torch.equal(w, w_ref)
        print(f"  wanda {label:17s} sparsity {(w == 0).float().mean().item():.3f}  {elapsed * 1e3:8.1f} ms  "
              f"equal to torch reference: {same}")
        if not same:
            return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    return kernel_demo()


if __name__ == "__main__":
    sys.exit(main())
