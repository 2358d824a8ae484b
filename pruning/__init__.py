"""Layer-sequential pruning of Hugging Face causal LMs (Wanda, SparseGPT, magnitude).

Public API: :func:`prune_model`, :func:`check_sparsity` and :func:`load_sparse` (2:4 checkpoints).
"""

from pruning.driver import PruneReport, prune_model
from pruning.sparse24 import load_sparse
from pruning.sparsity import check_sparsity, sparsity_by_layer

__all__ = ["PruneReport", "check_sparsity", "load_sparse", "prune_model", "sparsity_by_layer"]
