"""Registry of real Linear shapes [out_features, in_features] per model, as data (gpt-fast style)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DecoderShape:
    hidden: int
    ffn: int
    n_layers: int
    kv_dim: int | None = None  # grouped-query attention: k/v projection width
    gated: bool = False  # LLaMA's gate/up/down MLP instead of OPT's fc1/fc2
    n_heads: int = 0  # attention heads (what a random-weight model of these dims needs; bench/fixtures/models.py)

    def linears(self) -> dict[str, tuple[int, int]]:
        """Linear name -> (out_features, in_features) for one decoder layer."""
        kv = self.kv_dim or self.hidden
        attn = {"q_proj": (self.hidden, self.hidden), "k_proj": (kv, self.hidden), "v_proj": (kv, self.hidden)}
        if self.gated:
            attn["o_proj"] = (self.hidden, self.hidden)
            mlp = {
                "gate_proj": (self.ffn, self.hidden),
                "up_proj": (self.ffn, self.hidden),
                "down_proj": (self.hidden, self.ffn),
            }
        else:
            attn["out_proj"] = (self.hidden, self.hidden)
            mlp = {"fc1": (self.ffn, self.hidden), "fc2": (self.hidden, self.ffn)}
        return {**attn, **mlp}

    def fused_linears(self) -> dict[str, tuple[int, int]]:
        """The products ``pruning.infer.fusion.fuse_projections_`` makes of Linears that share an input."""
        kv = self.kv_dim or self.hidden
        fused = {"qkv_proj": (self.hidden + 2 * kv, self.hidden)}
        if self.gated:
            fused["gate_up_proj"] = (2 * self.ffn, self.hidden)
        return fused


MODELS: dict[str, DecoderShape] = {
    "opt-125m": DecoderShape(768, 3072, 12, n_heads=12),
    "opt-350m": DecoderShape(1024, 4096, 24, n_heads=16),
    "opt-1.3b": DecoderShape(2048, 8192, 24, n_heads=32),
    "opt-2.7b": DecoderShape(2560, 10240, 32, n_heads=32),
    "opt-6.7b": DecoderShape(4096, 16384, 32, n_heads=32),
    "opt-13b": DecoderShape(5120, 20480, 40, n_heads=40),
    "opt-30b": DecoderShape(7168, 28672, 48, n_heads=56),
    "opt-66b": DecoderShape(9216, 36864, 64, n_heads=72),
    "llama-7b": DecoderShape(4096, 11008, 32, gated=True, n_heads=32),
    "llama-13b": DecoderShape(5120, 13824, 40, gated=True, n_heads=40),
    "llama-30b": DecoderShape(6656, 17920, 60, gated=True, n_heads=52),
    "llama-65b": DecoderShape(8192, 22016, 80, gated=True, n_heads=64),
    "llama-2-70b": DecoderShape(8192, 28672, 80, kv_dim=1024, gated=True, n_heads=64),
}

# The matrices the kernel suite times on a GPU: the anchors of ../shared/GPU_NOTES.md plus the
# widest rows of each family (register vs chunked selection paths).
KERNEL_SUITE: list[tuple[str, str]] = [
    ("opt-6.7b", "q_proj"),
    ("opt-13b", "fc1"),
    ("opt-13b", "fc2"),
    ("opt-66b", "fc2"),
    ("llama-7b", "down_proj"),
    ("llama-2-70b", "k_proj"),
    ("llama-2-70b", "down_proj"),
]
# Tiny stand-ins for the CPU smoke mode (Triton interpreter): same code paths, seconds not hours.
SMOKE_SUITE: list[tuple[str, tuple[int, int]]] = [("smoke-a", (16, 64)), ("smoke-b", (8, 96))]


def linear_shape(model: str, linear: str) -> tuple[int, int]:
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}; known: {', '.join(MODELS)}")
    layers = {**MODELS[model].linears(), **MODELS[model].fused_linears()}
    if linear not in layers:
        raise ValueError(f"{model} has no Linear {linear!r}; it has {', '.join(layers)}")
    return layers[linear]
