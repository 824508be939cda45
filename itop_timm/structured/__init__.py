"""Structured sparsity: the RMDA optimizer (and ProxSGD), group-LASSO / L1 proximal regularisers,
torch-pruning coupled channel groups, and compaction of zeroed channels into a smaller dense model."""

from .groups import ChannelGroup, ChannelSlice
from .prox import L1, GroupLasso, Regularizer, create_regularizer, group_sparsity
from .rmda import RMDA, ProxSGD, RMDAStages

__all__ = [
    "RMDA",
    "ProxSGD",
    "RMDAStages",
    "GroupLasso",
    "L1",
    "Regularizer",
    "create_regularizer",
    "group_sparsity",
    "ChannelGroup",
    "ChannelSlice",
]
