"""Sparse inference: the runtime 2:4 Linear, kernel fusion, and CUDA-graph runners for prefill and decode."""

from pruning.infer.fusion import fuse_projections_, fuse_small_ops_
from pruning.infer.runner import GreedyDecoder, PrefillRunner
from pruning.infer.sparse_linear import Sparse24Linear

__all__ = ["GreedyDecoder", "PrefillRunner", "Sparse24Linear", "fuse_projections_", "fuse_small_ops_"]
