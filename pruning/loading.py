"""Loading models and tokenizers with ``from_pretrained``, offline-friendly, with one-line errors."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from pruning.adapters import get_adapter

log = logging.getLogger(__name__)

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def _looks_like_path(name: str) -> bool:
    # Hub ids look like "org/name"; anything anchored, deeper, or existing on disk is a path.
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or Path(name).expanduser().exists()


def _not_found(name: str, cache_dir: str | None, err: Exception) -> ValueError:
    if _looks_like_path(name) and not Path(name).expanduser().exists():
        return ValueError(f"cannot load model {name!r}: no such directory")
    where = f" or in --cache_dir {cache_dir}" if cache_dir else " or in the Hugging Face cache"
    return ValueError(
        f"cannot load model {name!r}: not found locally{where}, and the hub is unreachable or the id is wrong "
        f"({type(err).__name__}). Download it where there is network and pass its local directory to --model"
    )


def load_config(name: str, cache_dir: str | None = None):
    """The model's config (cheap: no weights), so an unsupported architecture fails before any download."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(name, cache_dir=cache_dir)
    except (OSError, ValueError) as err:
        raise _not_found(name, cache_dir, err) from None
    get_adapter(config.model_type)  # raises UnsupportedModelError listing what is supported
    return config


def load_tokenizer(name: str, cache_dir: str | None = None):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name, cache_dir=cache_dir)
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot load the tokenizer of {name!r}: {err}".splitlines()[0]) from None


def resolve_dtype(dtype: str) -> torch.dtype:
    """'auto' -> float16 on CUDA (as locuslab/wanda loads), float32 on CPU (fp16 matmuls are slow there)."""
    if dtype == "auto":
        return torch.float16 if torch.cuda.is_available() else torch.float32
    return DTYPES[dtype]


def load_model(
    name: str, cache_dir: str | None = None, dtype: str = "auto", device_map: str | None = None, offload: bool = False
) -> nn.Module:
    """Load a causal LM and place it: whole on the GPU when it fits, otherwise in CPU RAM with decoder layers
    streamed to the GPU one at a time (``offload``), or as accelerate places it (``device_map``)."""
    from transformers import AutoModelForCausalLM

    torch_dtype = resolve_dtype(dtype)
    kwargs = {"cache_dir": cache_dir, "dtype": torch_dtype, "low_cpu_mem_usage": True}
    if device_map:
        kwargs["device_map"] = device_map
    try:
        model = AutoModelForCausalLM.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as err:
        raise _not_found(name, cache_dir, err) from None
    model.eval()
    if device_map or not torch.cuda.is_available():
        return model
    if not offload:
        size = sum(p.numel() * p.element_size() for p in model.parameters())
        free, _ = torch.cuda.mem_get_info()
        if size < 0.8 * free:
            return model.to("cuda")
        log.warning(
            "model (%.1f GiB) does not fit in free GPU memory (%.1f GiB): keeping it in CPU RAM and streaming "
            "one decoder layer at a time to the GPU (--offload)",
            size / 2**30,
            free / 2**30,
        )
    return model
