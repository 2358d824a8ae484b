"""Loading models and tokenizers with ``from_pretrained``, offline-friendly, with one-line errors.

A hub id is only looked up on the Hub when the Hub answers: with ``HF_HUB_OFFLINE=1`` or no network, loading
goes straight to the local cache (``local_files_only``), so an offline machine fails in seconds, not after
minutes of HTTP retries.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from pruning import hub
from pruning.adapters import get_adapter
from pruning.errors import OptionError, quote

log = logging.getLogger(__name__)

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def _looks_like_path(name: str) -> bool:
    # Hub ids look like "org/name"; anything anchored, deeper, or existing on disk is a path.
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or Path(name).expanduser().exists()


def _source(name: str) -> tuple[str, dict]:
    """The name to pass to ``from_pretrained`` (a path with ``~`` expanded) and ``local_files_only`` if needed."""
    path = Path(name).expanduser()
    if _looks_like_path(name):
        return str(path), {"local_files_only": True}
    return name, ({} if hub.models_available() else {"local_files_only": True})


def _first_line(err: Exception) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def _not_found(name: str, cache_dir: str | None, err: Exception, offline: bool) -> ValueError:
    """A one-line error saying why ``name`` did not load and what to pass instead (``offline``: cache only)."""
    path = Path(name).expanduser()
    if _looks_like_path(name):
        if not path.exists():
            return ValueError(
                f"cannot load model {name!r}: no such directory; pass a local model directory "
                "(saved with save_pretrained) or a Hugging Face id such as facebook/opt-125m"
            )
        if not path.is_dir():
            return ValueError(f"cannot load model {name!r}: not a directory; pass the model's directory")
        if not (path / "config.json").is_file():
            return ValueError(
                f"cannot load model {name!r}: the directory has no config.json, so it is not a Hugging Face "
                "model directory; pass the directory that save_pretrained wrote"
            )
        return ValueError(f"cannot load model {name!r}: {_first_line(err)}")
    cache = f"{{cache_dir}} {quote(cache_dir)}" if cache_dir else "the Hugging Face cache"
    if offline:
        why = "offline mode is set" if hub.models_offline() else "the Hugging Face Hub is unreachable"
        return OptionError(
            f"cannot load model {quote(repr(name))}: not in {cache} and {why}; download it where there is network "
            "(or fix the id) and pass its local directory to {model}"
        )
    return ValueError(
        f"cannot load model {name!r} from the Hugging Face Hub ({type(err).__name__}: {_first_line(err)}); "
        "check the id, and log in with `hf auth login` for gated models"
    )


def load_config(name: str, cache_dir: str | None = None):
    """The model's config (cheap: no weights), so an unsupported architecture fails before any download."""
    from transformers import AutoConfig

    source, kwargs = _source(name)
    try:
        config = AutoConfig.from_pretrained(source, cache_dir=cache_dir, **kwargs)
    except (OSError, ValueError) as err:
        raise _not_found(name, cache_dir, err, "local_files_only" in kwargs) from None
    get_adapter(config.model_type)  # raises UnsupportedModelError listing what is supported
    return config


def load_tokenizer(name: str, cache_dir: str | None = None):
    from transformers import AutoTokenizer

    source, kwargs = _source(name)
    advice = "the model directory needs the tokenizer files that tokenizer.save_pretrained writes"
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, cache_dir=cache_dir, **kwargs)
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot load the tokenizer of {name!r}: {_first_line(err)}; {advice}") from None
    # transformers 5 builds an empty tokenizer, without an error, from a directory that has no tokenizer files.
    if not tokenizer("Hello world", add_special_tokens=False)["input_ids"]:
        raise ValueError(f"cannot load the tokenizer of {name!r}: it turns text into no tokens; {advice}")
    return tokenizer


def _safetensors_errors() -> tuple[type[Exception], ...]:
    try:
        from safetensors import SafetensorError
    except ImportError:
        return ()
    return (SafetensorError,)


def resolve_dtype(dtype: str) -> torch.dtype:
    """'auto' -> float16 on CUDA (as locuslab/wanda loads), float32 on CPU (fp16 matmuls are slow there)."""
    if dtype == "auto":
        return torch.float16 if torch.cuda.is_available() else torch.float32
    return DTYPES[dtype]


def _is_sparse24_checkpoint(source: str) -> bool:
    """A local directory written with ``--save_format sparse24`` (its config names the format)."""
    import json

    from pruning.sparse24 import FORMAT

    config_path = Path(source) / "config.json"
    if not config_path.is_file():
        return False
    try:
        spec = json.loads(config_path.read_text()).get("sparsity_config")
    except (OSError, ValueError):
        return False
    return isinstance(spec, dict) and spec.get("format") == FORMAT


def _load_sparse24_as_dense(name: str, source: str, dtype: torch.dtype, device_map: str | None) -> nn.Module:
    """A 2:4-compressed checkpoint as a plain model: ``from_pretrained`` would find no ``weight`` for its
    compressed Linears and initialize them at random (a warning, then wrong results), so it is loaded with
    ``pruning.load_sparse`` and each Linear gets back its exact dense-with-zeros weight."""
    from pruning.sparse24 import decompress_model_24_, load_sparse

    if device_map:
        raise OptionError(
            f"{quote(repr(name))} is a 2:4-compressed (sparse24) checkpoint, which loads whole, without "
            "{device_map}; save the model with {save_format} dense to place it across devices"
        )
    model = load_sparse(source, device="cpu")
    decompress_model_24_(model)
    del model.config.sparsity_config  # dense again: saved from here, it is a plain checkpoint
    log.info("%s: sparse24 checkpoint, Linears decompressed to dense-with-zeros (pruning.load_sparse keeps "
             "them compressed for sparse inference)", name)  # fmt: skip
    return model.to(dtype)


def load_model(
    name: str, cache_dir: str | None = None, dtype: str = "auto", device_map: str | None = None, offload: bool = False
) -> nn.Module:
    """Load a causal LM and place it: whole on the GPU when it fits, otherwise in CPU RAM with decoder layers
    streamed to the GPU one at a time (``offload``), or as accelerate places it (``device_map``)."""
    from transformers import AutoModelForCausalLM

    torch_dtype = resolve_dtype(dtype)
    source, kwargs = _source(name)
    if _is_sparse24_checkpoint(source):
        model = _load_sparse24_as_dense(name, source, torch_dtype, device_map)
    else:
        kwargs.update(cache_dir=cache_dir, dtype=torch_dtype, low_cpu_mem_usage=True)
        if device_map:
            kwargs["device_map"] = device_map
        try:
            model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
        except (OSError, ValueError) as err:
            raise _not_found(name, cache_dir, err, "local_files_only" in kwargs) from None
        except torch.OutOfMemoryError:
            raise
        except (RuntimeError, *_safetensors_errors()) as err:  # a truncated file; weights that do not fit config.json
            raise ValueError(
                f"cannot load model {name!r}: {type(err).__name__}: {_first_line(err)}; the checkpoint may be "
                "incomplete (an interrupted download or copy) or not match its config.json: fetch or save it again"
            ) from err
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
            "one decoder layer at a time to the GPU (offload)",
            size / 2**30,
            free / 2**30,
        )
    return model
