"""The sparse24 checkpoint format: 2:4-pruned decoder Linears stored packed, everything else as saved.

Each decoder-layer Linear becomes ``values`` [O, C/2] (model dtype, kept entries, lower column first) and
``meta`` uint8 [O, C/8] (2-bit column-in-group per kept value): 0.5625x the dense bytes.
``config.json`` gains ``sparsity_config`` = {format, version, modules, layout}. :func:`load_sparse` rebuilds
the model with :class:`pruning.infer.Sparse24Linear` modules.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import nn

from pruning import checksums
from pruning.errors import OptionError, quote
from pruning.infer.sparse_linear import Sparse24Linear

log = logging.getLogger(__name__)

FORMAT = "sparse24"
FORMAT_VERSION = 1
PERMUTED_FORMAT_VERSION = 2  # adds input_perm to the Linears listed in "permuted_modules"
READABLE_VERSIONS = (FORMAT_VERSION, PERMUTED_FORMAT_VERSION)


def check_packable(model: nn.Module) -> None:
    """Every decoder Linear must have in_features divisible by 8 for the packed format (2 groups per byte)."""
    from pruning.adapters import get_adapter

    adapter = get_adapter(model)
    bad = sorted(
        {f"{name} (in_features {m.in_features})" for layer in adapter.layers(model)
         for name, m in layer.named_modules() if isinstance(m, nn.Linear) and m.in_features % 8}
    )  # fmt: skip
    if bad:
        raise OptionError(
            f"{{save_format}} sparse24 needs in_features divisible by 8; not so for {', '.join(bad)}: "
            "save with {save_format} dense"
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
    (in place): a plain Hugging Face model again, for pruning or evaluation, its config without the sparse24
    markers. Returns the module names."""
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
    config = getattr(model, "config", None)
    if names and config is not None:  # a plain model now: saved from here, no stale sparse24 label
        if hasattr(config, "sparsity_config"):
            del config.sparsity_config
        quantization = getattr(config, "quantization_config", None)
        method = quantization.get("quant_method") if isinstance(quantization, dict) else getattr(
            quantization, "quant_method", None
        )  # fmt: skip
        if method == FORMAT:
            del config.quantization_config
            for attribute in ("hf_quantizer", "is_quantized", "quantization_method"):
                if hasattr(model, attribute):
                    delattr(model, attribute)
    return names


def save_sparse(model: nn.Module, tokenizer, directory: Path, max_shard_size: int | str | None = None) -> Path:
    """``save_pretrained`` the model (safetensors) into ``directory`` (which the caller stages and renames
    atomically) with its decoder Linears 2:4-compressed. The model itself is left as it was: the packed
    modules stand in for the Linears only while it is written. ``max_shard_size``: as in ``save_pretrained``."""
    from pruning.infer.fusion import check_not_fused

    check_not_fused(model)
    packed = _pack_decoder_linears(model)
    had_spec, previous_spec = hasattr(model.config, "sparsity_config"), getattr(model.config, "sparsity_config", None)
    had_quantization = hasattr(model.config, "quantization_config")
    previous_quantization = getattr(model.config, "quantization_config", None)
    try:
        for _, parent, attribute, _, sparse in packed:
            setattr(parent, attribute, sparse)
        permuted = [full for full, *_, sparse in packed if sparse.input_perm is not None]
        model.config.sparsity_config = {
            "format": FORMAT,
            "version": PERMUTED_FORMAT_VERSION if permuted else FORMAT_VERSION,
            "modules": [full for full, *_ in packed],
            "layout": "values [O, C/2] model dtype (kept entries, lower column first); "
            "meta uint8 [O, C/8]: 2-bit column-in-group of kept value 4b+i in bits [2i, 2i+2) of byte b",
        }
        if permuted:
            model.config.sparsity_config["permuted_modules"] = permuted
            model.config.sparsity_config["permutation"] = (
                "input_perm int64 [C]: values/meta pack W[:, input_perm]; the input is gathered x[..., input_perm]"
            )
        # What transformers' from_pretrained reads (pruning.hf_quantizer); without this package it refuses the
        # unknown quant_method instead of initializing the packed Linears at random.
        model.config.quantization_config = {
            "quant_method": FORMAT, "version": model.config.sparsity_config["version"],
            "modules": [full for full, *_ in packed], "permuted_modules": permuted,
        }  # fmt: skip
        model.save_pretrained(directory, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    finally:
        for _, parent, attribute, linear, _ in packed:
            setattr(parent, attribute, linear)
        if had_spec:
            model.config.sparsity_config = previous_spec
        else:
            del model.config.sparsity_config
        if had_quantization:
            model.config.quantization_config = previous_quantization
        elif hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    checksums.record(Path(directory))
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


def load_sparse(path: str | Path, device: str | torch.device = "cpu", verify: bool = False) -> nn.Module:
    """Load a sparse24 checkpoint as a Hugging Face model with Sparse24Linear modules. ``verify``: first compare
    every file with the checksums recorded at save time (``pruning.checksums``); a difference is a ValueError."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    directory = Path(path).expanduser()
    if verify:
        result = checksums.verify(directory)
        if not result.recorded:
            raise ValueError(f"{str(directory)!r} has no {checksums.MANIFEST}: nothing to verify it against")
        if result.problems:
            more = f" (and {len(result.problems) - 1} more)" if len(result.problems) > 1 else ""
            raise ValueError(f"{str(directory)!r} is damaged: {result.problems[0]}{more}; export it again")
    if not (directory / "config.json").exists():
        raise ValueError(f"{str(directory)!r} is not a saved model directory (no config.json)")
    config = AutoConfig.from_pretrained(directory)
    spec = getattr(config, "sparsity_config", None)
    if not isinstance(spec, dict) or spec.get("format") != FORMAT:
        raise ValueError(f"{str(directory)!r} is not a sparse24 checkpoint; load it with from_pretrained")
    if spec.get("version") not in READABLE_VERSIONS:
        raise ValueError(unsupported_version_message(spec.get("version")))
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    permuted = set(spec.get("permuted_modules", ()))
    place_empty_sparse24_(model, spec["modules"], permuted, dtype)
    state = _read_state_dict(directory)
    packed = set(spec["modules"])
    for name, tensor in state.items():  # what the file holds: load_state_dict(assign=True) keeps its dtypes
        if name.endswith(".meta") and name.removesuffix(".meta") in packed:
            if tensor.dtype != torch.uint8:
                raise ValueError(f"{name} is {tensor.dtype}, not uint8: the checkpoint is damaged; export it again")
        elif name.endswith(".input_perm") and name.removesuffix(".input_perm") in permuted:
            n = tensor.numel()
            if tensor.dtype != torch.int64 or not torch.equal(torch.sort(tensor)[0], torch.arange(n)):
                raise ValueError(
                    f"{name} is not a permutation of 0..{n - 1}: the checkpoint is damaged; export it again"
                )
        elif not tensor.dtype.is_floating_point:
            raise ValueError(
                f"{name} is {tensor.dtype}, not floating point: the checkpoint is damaged; export it again"
            )
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


def place_empty_sparse24_(model: nn.Module, modules, permuted, dtype: torch.dtype) -> None:
    """Put an empty (meta-device) ``Sparse24Linear`` in place of each Linear named in ``modules`` (with
    ``input_perm`` for those in ``permuted``), for a loader to fill; a name the model lacks is a ValueError."""
    permuted = set(permuted)
    for name in modules:
        try:
            linear = model.get_submodule(name)
        except AttributeError:
            raise ValueError(
                f"{name}, stored 2:4-compressed, is not in the model its config.json describes: the checkpoint does "
                "not match its config.json"
            ) from None
        parent_name, _, child = name.rpartition(".")
        sparse = Sparse24Linear(
            linear.in_features, linear.out_features, linear.bias is not None, dtype, "meta", permuted=name in permuted
        )
        setattr(model.get_submodule(parent_name), child, sparse)


def unsupported_version_message(version) -> str:
    same_digits = str(version) == str(FORMAT_VERSION)
    kind = f" (a {type(version).__name__}, not the integer {FORMAT_VERSION})" if same_digits else ""
    return (
        f"sparse24 format version {version!r}{kind} is not supported (this reader knows versions "
        f"{', '.join(map(str, READABLE_VERSIONS))}); export the checkpoint again"
    )


def check_meta_order(meta: torch.Tensor, name: str) -> None:
    """The format stores each group's two positions in increasing order, which the GEMV kernel relies on;
    metadata that breaks it is corrupt (or written by something else), and is refused by name."""
    nibbles = torch.stack([meta & 15, meta >> 4], dim=-1).to(torch.int32)
    bad = int(((nibbles & 3) >= (nibbles >> 2)).sum())
    if bad:
        raise OptionError(
            f"{quote(name)}: corrupt 2:4 metadata, {bad} groups whose two positions are not in increasing order; "
            "re-export the checkpoint with {save_format} sparse24"
        )
