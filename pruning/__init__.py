"""Layer-sequential pruning of Hugging Face causal LMs (Wanda, SparseGPT, magnitude).

Public API: :func:`prune_model` and :func:`check_sparsity`.
"""

from pruning.driver import PruneReport, prune_model
from pruning.sparsity import check_sparsity, sparsity_by_layer

__all__ = ["PruneReport", "check_sparsity", "prune_model", "sparsity_by_layer"]
