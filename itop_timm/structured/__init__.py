"""Structured sparsity: the RMDA optimizer (and ProxSGD), group-LASSO / L1 proximal regularisers,
torch-pruning coupled channel groups (and the channel units Chase removes), compaction of zeroed channels
into a smaller dense model, SRigL's condensed linear layers, and a torch-pruning importance that ranks
channels by ITOP masks. The Chase and SRigL methods themselves live in :mod:`itop_timm.methods`."""

from .compact import compact
from .compacted import compact_checkpoint, rebuild_compacted
from .condense import CondensedLinear, condense
from .dependency import ChannelGroup, ChannelSlice, coupled_channel_groups
from .importance import MaskImportance
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
    "coupled_channel_groups",
    "compact",
    "compact_checkpoint",
    "rebuild_compacted",
    "MaskImportance",
    "CondensedLinear",
    "condense",
]
