"""transformers' ``from_pretrained`` for sparse24 checkpoints: a quantization config and quantizer, registered
through transformers' public API when ``pruning`` is imported.

A sparse24 ``config.json`` carries ``quantization_config = {"quant_method": "sparse24", "version", "modules",
"permuted_modules"}`` beside the older ``sparsity_config``. Before the weights load, the quantizer puts a
``Sparse24Linear`` (values, meta, bias, input_perm) in place of every listed Linear, so transformers' own loader
fills the packed tensors by name (shards, mmap, ``device_map`` and dtype as for any model). Without this package,
transformers refuses the unknown ``quant_method`` by name instead of loading random weights.
"""

from __future__ import annotations

import torch
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

QUANT_METHOD = "sparse24"


class Sparse24Config(QuantizationConfigMixin):
    """The ``quantization_config`` entry of a sparse24 checkpoint."""

    def __init__(self, version: int = 1, modules=(), permuted_modules=(), **kwargs):
        self.quant_method = QUANT_METHOD
        self.version = version
        self.modules = list(modules)
        self.permuted_modules = list(permuted_modules)

    def to_dict(self) -> dict:
        return {
            "quant_method": QUANT_METHOD, "version": self.version, "modules": list(self.modules),
            "permuted_modules": list(self.permuted_modules),
        }  # fmt: skip


class Sparse24Quantizer(HfQuantizer):
    """Loads pre-compressed 2:4 weights into ``Sparse24Linear`` modules; nothing is quantized at load time."""

    requires_calibration = True  # only checkpoints already pruned and packed

    def _process_model_before_weight_loading(self, model, **kwargs):
        from pruning.sparse24 import READABLE_VERSIONS, place_empty_sparse24_, unsupported_version_message

        config = self.quantization_config
        if config.version not in READABLE_VERSIONS:
            raise ValueError(unsupported_version_message(config.version))
        dtype = kwargs.get("dtype") or next(model.parameters()).dtype
        place_empty_sparse24_(model, config.modules, config.permuted_modules, dtype)
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        from pruning.sparse24 import check_meta_order

        for name in self.quantization_config.modules:
            module = model.get_submodule(name)
            if module.meta.dtype != torch.uint8:
                raise ValueError(f"{name}.meta is {module.meta.dtype}, not uint8: the checkpoint is damaged")
            check_meta_order(module.meta, name)
        for name in self.quantization_config.permuted_modules:
            perm = model.get_submodule(name).input_perm
            if perm.dtype != torch.int64 or not torch.equal(torch.sort(perm)[0].cpu(), torch.arange(perm.numel())):
                raise ValueError(f"{name}.input_perm is not a permutation: the checkpoint is damaged; export it again")
        return model

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        return False

    def is_serializable(self, safe_serialization=None) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False


def register() -> None:
    """Register both with transformers (once; a second import is a no-op)."""
    from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(Sparse24Config)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(Sparse24Quantizer)
