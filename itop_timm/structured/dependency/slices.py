"""Channel slices: a torch-pruning group item seen as positions of plain parameter tensors."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["ChannelSlice", "group_item_slices", "merge_slices", "per_position", "channel_numel"]

_logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ChannelSlice:
    """Part of one parameter that belongs to a channel group.

    Attributes:
        param_name: name in ``model.named_parameters()``.
        dim: the dimension that is sliced.
        index: positions along ``dim`` that belong to the group (LongTensor).
        channel: for each position in ``index``, the group channel it belongs to (LongTensor, same length).
        role: ``"producer"`` (the channel's values are computed from it: conv/linear output channels, their
            bias, per-channel norm affine parameters, depthwise kernels) or ``"consumer"`` (it reads the
            channel: conv/linear input channels).
    """

    param_name: str
    dim: int
    index: torch.Tensor
    channel: torch.Tensor
    role: str

    def numel_per_position(self, shape: torch.Size) -> int:
        return int(torch.Size(shape).numel() // shape[self.dim])


def per_position(t: torch.Tensor, dim: int, reduce: Callable[..., torch.Tensor] = torch.sum) -> torch.Tensor:
    """Reduce ``t`` over every dimension but ``dim`` (``torch.sum``, ``torch.all``...): one value per
    position along ``dim``. The one per-channel reduction of the structured code."""
    dims = tuple(d for d in range(t.ndim) if d != dim)
    return reduce(t, dim=dims) if dims else t


def channel_numel(
    slices: Sequence[ChannelSlice], params: Mapping[str, torch.Tensor], num_channels: int
) -> torch.Tensor:
    """Elements per channel summed over ``slices`` (LongTensor ``[num_channels]``)."""
    numel = torch.zeros(num_channels, dtype=torch.long)
    for s in slices:
        per = s.numel_per_position(params[s.param_name].shape)
        numel.index_add_(0, s.channel, torch.full((s.index.numel(),), per, dtype=torch.long))
    return numel


def group_item_slices(
    graph: Any, item: Any, param_names: dict[int, str], num_channels: int | None = None
) -> tuple[list[ChannelSlice], str | None]:
    """The parameter slices of one torch-pruning group item, with ``channel`` = the root index.

    Returns the slices and, if the item cannot be described exactly, why (else ``None``). A grouped
    convolution's input-channel slice lists each weight position once, for the channel of its first group
    (the siblings in the other groups share that position and are removed with it).
    """
    from torch_pruning import ops
    from torch_pruning.pruner import function as F

    dep, node = item.dep, item.dep.target
    module, handler = node.module, dep.handler
    pruner = getattr(handler, "__self__", None)
    is_out = handler == getattr(pruner, "prune_out_channels", None)
    limit = num_channels if num_channels is not None else float("inf")
    pairs = [
        (int(i), int(r))
        for i, r in zip(item.idxs, item.root_idxs, strict=True)
        if r is not None and 0 <= int(r) < limit
    ]
    reason = None if len(pairs) == len(item.idxs) else "torch-pruning's index mapping lost some channels"
    out: list[ChannelSlice] = []
    problems: list[str] = []

    def add(param: torch.Tensor | None, dim: int, role: str, pos_of=lambda i: i, keep=lambda i: True) -> None:
        if param is None or id(param) not in param_names:
            return
        dim = dim % param.ndim
        kept = [(pos_of(i), r) for i, r in pairs if keep(i)]
        inside = [(p, r) for p, r in kept if 0 <= p < param.shape[dim]]
        if len(inside) < len(kept):
            problems.append(f"torch-pruning's indices run past {param_names[id(param)]!r} (dim {dim})")
            kept = inside
        if not kept:
            return
        out.append(
            ChannelSlice(
                param_names[id(param)],
                dim,
                torch.tensor([p for p, _ in kept], dtype=torch.long),
                torch.tensor([r for _, r in kept], dtype=torch.long),
                role,
            )
        )

    if isinstance(module, nn.Parameter):
        add(module, node.pruning_dim, "producer")
    elif isinstance(module, ops.TORCH_CONV):
        w, groups, tr = module.weight, module.groups, module.transposed
        if isinstance(pruner, F.DepthwiseConvPruner):
            add(w, 0, "producer")
            add(module.bias, 0, "producer")
            reason = reason or ("a transposed depthwise convolution" if tr else None)
        elif is_out:
            per = module.out_channels // groups
            add(w, 1 if tr else 0, "producer", pos_of=(lambda i: i % per) if tr else (lambda i: i))
            add(module.bias, 0, "producer")
            reason = reason or ("a transposed grouped convolution" if tr and groups > 1 else None)
        else:
            per = module.in_channels // groups
            if tr:
                add(w, 0, "consumer")
                reason = reason or ("a transposed grouped convolution" if groups > 1 else None)
            else:
                add(w, 1, "consumer", keep=lambda i: i < per)
    elif isinstance(module, ops.TORCH_LINEAR):
        add(module.weight, 0 if is_out else 1, "producer" if is_out else "consumer")
        if is_out:
            add(module.bias, 0, "producer")
    elif isinstance(module, (ops.TORCH_BATCHNORM, ops.TORCH_GROUPNORM, ops.TORCH_INSTANCENORM)):
        add(module.weight, 0, "producer")
        add(module.bias, 0, "producer")
    elif isinstance(module, ops.TORCH_LAYERNORM):
        pdim = node.pruning_dim if node.pruning_dim < 0 else node.pruning_dim - len(module.normalized_shape)
        if len(module.normalized_shape) >= -pdim:
            for p in (module.weight, module.bias):
                if p is not None:
                    add(p, p.ndim + pdim, "producer")
    elif isinstance(module, ops.TORCH_PRELU):
        if module.num_parameters > 1:
            add(module.weight, 0, "producer")
    elif isinstance(module, ops.TORCH_EMBED):
        add(module.weight, 1, "producer")
    elif isinstance(module, ops.TORCH_MHA):
        e = module.embed_dim
        for k in range(3):
            add(module.in_proj_weight, 0, "producer", pos_of=lambda i, k=k: i + k * e)
            add(module.in_proj_bias, 0, "producer", pos_of=lambda i, k=k: i + k * e)
        add(module.in_proj_weight, 1, "consumer")
        add(module.out_proj.weight, 0, "producer")
        add(module.out_proj.bias, 0, "producer")
        add(module.out_proj.weight, 1, "consumer")
        reason = reason or "nn.MultiheadAttention is not supported exactly"
    elif isinstance(module, nn.Module) and any(True for _ in module.parameters(recurse=False)):
        reason = reason or f"layer type {type(module).__name__} is not supported exactly"
        _logger.debug("no slices for the parameters of %s", type(module).__name__)
    return out, reason or (problems[0] if problems else None)


def merge_slices(slices: list[ChannelSlice]) -> list[ChannelSlice]:
    """One slice per (parameter, dim, role); duplicate (position, channel) pairs dropped."""
    merged: dict[tuple[str, int, str], dict[tuple[int, int], None]] = {}
    for s in slices:
        pairs = merged.setdefault((s.param_name, s.dim, s.role), {})
        pairs.update(dict.fromkeys(zip(s.index.tolist(), s.channel.tolist(), strict=True)))
    out = []
    for (name, dim, role), pairs in merged.items():
        pos = torch.tensor([p for p, _ in pairs], dtype=torch.long)
        ch = torch.tensor([c for _, c in pairs], dtype=torch.long)
        out.append(ChannelSlice(name, dim, pos, ch, role))
    return out
