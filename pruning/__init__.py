"""Layer-sequential pruning of Hugging Face causal LMs (Wanda, SparseGPT, magnitude).

Public API: :func:`prune_model` with a :class:`PruneConfig` (or its fields), ``pruning.plan.plan`` (the up-front
checks), :func:`check_sparsity`, and :func:`load_sparse` for 2:4 checkpoints, which transformers' own
``from_pretrained`` also opens once ``pruning`` is imported (``pruning.hf_quantizer``). Sparse inference:
``pruning.infer``.
"""

from pruning.config import PruneConfig
from pruning.driver import PruneReport, prune_model
from pruning.hf_quantizer import register as _register_sparse24_with_transformers
from pruning.plan import PrunePlan
from pruning.sparse24 import load_sparse
from pruning.sparsity import check_sparsity, sparsity_by_layer

_register_sparse24_with_transformers()  # AutoModelForCausalLM.from_pretrained(sparse24 directory) works from here on

__all__ = [
    "PrunePlan",
    "PruneConfig",
    "PruneReport",
    "check_sparsity",
    "load_sparse",
    "prune_model",
    "sparsity_by_layer",
]
