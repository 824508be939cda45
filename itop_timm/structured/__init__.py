"""Structured sparsity: the RMDA optimizer (and ProxSGD), group-LASSO / L1 proximal regularisers,
torch-pruning coupled channel groups (and the channel units Chase removes), compaction of zeroed channels
into a smaller dense model, SRigL's condensed linear layers, and a torch-pruning importance that ranks
channels by ITOP masks. The Chase and SRigL methods themselves live in :mod:`itop_timm.methods`.
``MaskImportance`` (which imports torch-pruning, and with it timm) is imported on first access."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .compact import compact, count_macs_and_params
from .compacted import compact_checkpoint, rebuild_compacted
from .condense import CondensedLinear, condense
from .dependency import ChannelGroup, ChannelSlice, coupled_channel_groups
from .prox import L1, GroupLasso, Regularizer, create_regularizer, group_sparsity
from .rmda import RMDA, ProxSGD, RMDAStages

if TYPE_CHECKING:
    from .importance import MaskImportance

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
    "count_macs_and_params",
    "compact_checkpoint",
    "rebuild_compacted",
    "MaskImportance",
    "CondensedLinear",
    "condense",
]


def __getattr__(name: str) -> Any:
    if name == "MaskImportance":
        from .importance import MaskImportance

        return MaskImportance
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
