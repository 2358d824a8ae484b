"""Layer-sequential pruning of Hugging Face causal LMs (Wanda, SparseGPT, magnitude).

Public API: :func:`prune_model` with a :class:`PruneConfig` (or its fields), ``pruning.plan.plan`` (the up-front
checks), :func:`check_sparsity`, and :func:`load_sparse` for 2:4 checkpoints. Sparse inference: ``pruning.infer``.
"""

from pruning.config import PruneConfig
from pruning.driver import PruneReport, prune_model
from pruning.plan import PrunePlan
from pruning.sparse24 import load_sparse
from pruning.sparsity import check_sparsity, sparsity_by_layer

__all__ = [
    "PrunePlan",
    "PruneConfig",
    "PruneReport",
    "check_sparsity",
    "load_sparse",
    "prune_model",
    "sparsity_by_layer",
]
