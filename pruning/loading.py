"""Loading models and tokenizers with ``from_pretrained``, offline-friendly, with one-line errors.

A hub id is only looked up on the Hub when the Hub answers: with ``HF_HUB_OFFLINE=1`` or no network, loading
goes straight to the local cache (``local_files_only``), so an offline machine fails in seconds, not after
minutes of HTTP retries.
"""

from __future__ import annotations

import json
import logging
import pickle
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
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        return True
    return Path(name).exists()


def _source(name: str) -> tuple[str, dict]:
    """The name to pass to ``from_pretrained`` (a path with ``~`` expanded) and ``local_files_only`` if needed."""
    try:
        path = Path(name).expanduser()
    except RuntimeError as err:  # ~user of no such user
        raise ValueError(f"cannot load model {name!r}: {err}; write the path out in full") from None
    if _looks_like_path(name):
        if path.is_file() and path.suffix.lower() == GGUF_SUFFIX:
            _check_gguf_reader(name)
            return str(path.parent), {"local_files_only": True, "gguf_file": path.name}
        if path.is_file():
            raise ValueError(
                f"cannot load model {name!r}: it is a file; pass the directory that holds config.json and the "
                f"weights ({str(path.parent)!r}), or a .gguf file"
            )
        return str(path), {"local_files_only": True}
    return name, ({} if hub.models_available() else {"local_files_only": True})


GGUF_SUFFIX = ".gguf"


def _check_gguf_reader(name: str) -> None:
    import importlib.util

    if importlib.util.find_spec("gguf") is None:
        raise ValueError(f"cannot load model {name!r}: reading a .gguf file needs the gguf package: pip install gguf")


def _plain_model(quantized: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A model read from GGUF is dequantized on load but stays marked as GGUF-quantized, which ``save_pretrained``
    refuses: the same weights in a plain model of the same config, built without allocating twice."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with init_empty_weights():
        plain = AutoModelForCausalLM.from_config(config, dtype=dtype)
    result = plain.load_state_dict(quantized.state_dict(), strict=False, assign=True)
    plain.tie_weights()
    still_meta = [n for n, p in plain.named_parameters() if p.device.type == "meta"]
    if still_meta or result.unexpected_keys:
        raise ValueError(f"GGUF weights do not fill the model: missing {still_meta[:3]}, unexpected "
                         f"{result.unexpected_keys[:3]}")  # fmt: skip
    return plain


def _damage(err: Exception) -> str:
    """The line of a loading error that names the tensor (``load_state_dict`` lists them after a header line)."""
    lines = [line.strip() for line in str(err).splitlines()]
    return next((line for line in lines if line.startswith(("size mismatch", "Missing key", "Unexpected key"))),
                _first_line(err))  # fmt: skip


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


def _malformed_config(name: str, err: Exception) -> ValueError:
    return ValueError(
        f"cannot load model {name!r}: its config.json holds a value of the wrong kind ({type(err).__name__}: "
        f"{_first_line(err)}); fix config.json or save the model again"
    )


def load_config(name: str, cache_dir: str | None = None):
    """The model's config (cheap: no weights), so an unsupported architecture fails before any download."""
    from transformers import AutoConfig

    source, kwargs = _source(name)
    try:
        config = AutoConfig.from_pretrained(source, cache_dir=cache_dir, **kwargs)
    except (OSError, ValueError) as err:
        raise _not_found(name, cache_dir, err, "local_files_only" in kwargs) from None
    except _config_errors() as err:
        raise _malformed_config(name, err) from None
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


def _config_errors() -> tuple[type[Exception], ...]:
    """What a config value of the wrong kind raises: transformers 5 validates configs through huggingface_hub's
    strict dataclasses (an Exception that is no ValueError)."""
    try:
        from huggingface_hub.errors import StrictDataclassError
    except ImportError:
        return (TypeError, KeyError, AttributeError)
    return (TypeError, KeyError, AttributeError, StrictDataclassError)


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


FLOAT_DTYPES = ("F16", "BF16", "F32", "F64", "F8_E4M3", "F8_E5M2")


def _tensor_dtypes(directory: Path) -> dict[str, str]:
    """{tensor name: safetensors dtype} of a local safetensors checkpoint, from its headers (no weights)."""
    from safetensors import safe_open

    index = directory / "model.safetensors.index.json"
    try:
        if index.is_file():
            files = sorted(set(json.loads(index.read_text()).get("weight_map", {}).values()))
        else:
            files = ["model.safetensors"] if (directory / "model.safetensors").is_file() else []
        dtypes = {}
        for name in files:
            with safe_open(str(directory / name), "pt") as f:
                dtypes.update({key: f.get_slice(key).get_dtype() for key in f.keys()})
        return dtypes
    except (OSError, ValueError, AttributeError, TypeError, *_safetensors_errors()):
        return {}  # damaged: from_pretrained names the problem


TORCH_FLOATS = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.float64: "F64"}


def _bin_dtypes(model: nn.Module, directory: Path) -> dict[str, str]:
    """{tensor: dtype} of the pytorch_model*.bin files (memory-mapped, weights only), in safetensors' spelling."""
    dtypes = {}
    for path in sorted(directory.glob("pytorch_model*.bin")):
        try:
            state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except (OSError, RuntimeError, pickle.UnpicklingError):
            continue  # from_pretrained read it; a second look that fails proves nothing
        dtypes.update({k: TORCH_FLOATS.get(v.dtype, str(v.dtype).removeprefix("torch.").upper())
                       for k, v in state.items() if isinstance(v, torch.Tensor)})  # fmt: skip
    return dtypes


def _check_floating(name: str, dtypes: dict[str, str]) -> None:
    """transformers would cast integer tensors to the model's dtype without a word: refuse them."""
    bad = sorted(f"{key} ({dtype})" for key, dtype in dtypes.items() if dtype not in FLOAT_DTYPES)
    if bad:
        raise ValueError(
            f"cannot load model {name!r}: its weights must be floating point, and {len(bad)} tensors are not "
            f"({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}); quantized or altered checkpoints are not "
            "pruned here: use the floating-point checkpoint"
        )


def _packed_tensors(names: list[str]) -> list[str]:
    """Modules stored as 2:4 ``values`` + ``meta`` pairs instead of a ``weight``."""
    present = set(names)
    return sorted(
        n.removesuffix(".values") for n in names
        if n.endswith(".values") and f"{n.removesuffix('.values')}.meta" in present
        and f"{n.removesuffix('.values')}.weight" not in present
    )  # fmt: skip


def _is_sparse24_checkpoint(name: str, source: str) -> bool:
    """A local directory written with ``save_format="sparse24"``, recognized by its config's marker and by its
    tensors: a checkpoint whose tensors are packed but whose marker is gone or altered is refused, since
    ``from_pretrained`` would initialize every packed Linear at random."""
    from pruning.sparse24 import FORMAT

    directory = Path(source)
    config_path = directory / "config.json"
    if not config_path.is_file():
        return False
    try:
        spec = json.loads(config_path.read_text()).get("sparsity_config")
    except (OSError, ValueError, AttributeError):
        return False  # from_pretrained names the problem
    if isinstance(spec, dict) and spec.get("format") == FORMAT:
        return True
    dtypes = _tensor_dtypes(directory)
    packed = _packed_tensors(list(dtypes))
    if packed:
        marker = "has no sparsity_config" if spec is None else f"has sparsity_config {repr(spec)[:80]}"
        raise ValueError(
            f"cannot load model {name!r}: {len(packed)} modules ({', '.join(packed[:2])}, ...) are stored "
            f"2:4-compressed, but its config.json {marker} instead of the sparse24 format marker; the checkpoint "
            "was altered: export it again (or restore config.json)"
        )
    _check_floating(name, dtypes)
    return False


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
    decompress_model_24_(model)  # dense again, its config too: saved from here, it is a plain checkpoint
    log.info("%s: sparse24 checkpoint, Linears decompressed to dense-with-zeros (pruning.load_sparse keeps "
             "them compressed for sparse inference)", name)  # fmt: skip
    return model.to(dtype)


def check_loading_report(name: str, report: dict) -> None:
    """Refuse what transformers would fill in at random: weights the checkpoint lacks (missing), holds for another
    architecture (unexpected) or holds in another shape (mismatched)."""
    problems = []
    for kind in ("missing", "unexpected", "mismatched"):
        keys = sorted(str(k[0] if isinstance(k, (tuple, list)) else k) for k in report.get(f"{kind}_keys") or ())
        if keys:
            problems.append(f"{len(keys)} {kind} ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})")
    if problems:
        raise ValueError(
            f"cannot load model {name!r}: its weights do not match its config.json, {'; '.join(problems)}; "
            "transformers would initialize those at random: fetch or save the checkpoint again"
        )


def load_model(
    name: str, cache_dir: str | None = None, dtype: str = "auto", device_map: str | None = None, offload: bool = False
) -> nn.Module:
    """Load a causal LM and place it: whole on the GPU when it fits, otherwise in CPU RAM with decoder layers
    streamed to the GPU one at a time (``offload``), or as accelerate places it (``device_map``)."""
    from transformers import AutoModelForCausalLM

    torch_dtype = resolve_dtype(dtype)
    source, kwargs = _source(name)
    if "gguf_file" not in kwargs and _is_sparse24_checkpoint(name, source):
        try:
            model = _load_sparse24_as_dense(name, source, torch_dtype, device_map)
        except OptionError:
            raise
        except torch.OutOfMemoryError:
            raise
        except (OSError, ValueError, RuntimeError, KeyError, TypeError, AttributeError, *_safetensors_errors()) as err:
            detail = _damage(err)
            advice = "" if "export" in detail else "; it is damaged or does not match its config.json: export it again"
            raise ValueError(
                f"cannot load the sparse24 checkpoint {name!r}: {type(err).__name__}: {detail}{advice}"
            ) from err
    else:
        kwargs.update(cache_dir=cache_dir, dtype=torch_dtype, low_cpu_mem_usage=True)
        if device_map:  # a bare GPU index ("1") is no device name for transformers
            kwargs["device_map"] = f"cuda:{device_map}" if device_map.isdigit() else device_map
        try:
            model, report = AutoModelForCausalLM.from_pretrained(source, output_loading_info=True, **kwargs)
        except (OSError, ValueError) as err:
            raise _not_found(name, cache_dir, err, "local_files_only" in kwargs) from None
        except torch.OutOfMemoryError:
            raise
        except pickle.UnpicklingError as err:  # torch's weights-only loader refused a pickled object
            raise ValueError(
                f"cannot load model {name!r}: its pytorch_model.bin holds objects other than tensors, which torch's "
                f"safe loader refuses ({_first_line(err)[:80]}...); convert it to safetensors where it is trusted"
            ) from None
        except _config_errors() as err:
            raise _malformed_config(name, err) from None
        except (RuntimeError, *_safetensors_errors()) as err:  # a truncated file; weights that do not fit config.json
            raise ValueError(
                f"cannot load model {name!r}: {type(err).__name__}: {_damage(err)}; the checkpoint may be "
                "incomplete (an interrupted download or copy) or not match its config.json: fetch or save it again"
            ) from err
        check_loading_report(name, report)
        if Path(source).is_dir() and not any(Path(source).glob("*.safetensors")):
            _check_floating(name, _bin_dtypes(model, Path(source)))
        if "gguf_file" in kwargs:
            model = _plain_model(model, torch_dtype)
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
