"""Removable channel units: the channel groups a method may remove from a live model (Chase).

A unit is one torch-pruning coupled channel group (:func:`.groups.trace_channel_groups`) with one
producer convolution/linear layer (depthwise convolutions on the same channels allowed) whose channels
are read only by sparse layers: the inner channels of a block. Never the stem (timm's ``first_conv``
and its module), the residual stream (several producers), the classifier, or a group whose removal is
not exact (LayerNorm, attention). :func:`removable_units` also says, for every other group, why not.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .groups import trace_channel_groups
from .slices import ChannelSlice

__all__ = [
    "ChannelUnit",
    "removable_units",
    "positions_left",
    "default_input_size",
]


@dataclass
class ChannelUnit:
    """One removable channel group: ``scored`` is the producer weight whose rows give UMM; ``rows`` and
    ``cols`` are ``(parameter, positions, channel of each position)`` along dim 0 / dim 1 of the sparse
    parameters; ``slices`` every parameter slice of the group (biases and norm parameters too)."""

    name: str
    num_channels: int
    scored: str
    rows: list[tuple[str, torch.Tensor, torch.Tensor]]
    cols: list[tuple[str, torch.Tensor, torch.Tensor]]
    slices: list[ChannelSlice]

    def magnitudes(self, weight: torch.Tensor, present: torch.Tensor | None = None) -> torch.Tensor:
        """UMM of every channel: the mean ``|w|`` of its rows of the producer ``weight`` (zeros included).
        ``present``: for a shrunk ``weight``, the original row of each of its rows (removed rows count 0)."""
        per_row = weight.detach().abs().float().reshape(weight.shape[0], -1).mean(1).cpu()
        (_, index, channel) = next(r for r in self.rows if r[0] == self.scored)
        if present is not None:
            full = torch.zeros(max(int(index.max()), int(present.max())) + 1)
            per_row = full.index_copy_(0, present, per_row)
        total = torch.zeros(self.num_channels).index_add_(0, channel, per_row[index])
        return total / torch.zeros(self.num_channels).index_add_(
            0, channel, torch.ones(len(index))
        ).clamp_min(1)


def _stem_prefix(model: nn.Module) -> str | None:
    first = (getattr(model, "pretrained_cfg", None) or {}).get("first_conv")
    if not isinstance(first, str):
        return None
    return first.rsplit(".", 1)[0] + "." if "." in first else first + "."


def _is_depthwise(model: nn.Module, param_name: str) -> bool:
    module = model.get_submodule(param_name.rsplit(".", 1)[0]) if "." in param_name else model
    return isinstance(module, nn.modules.conv._ConvNd) and module.groups > 1


def default_input_size(model: nn.Module) -> tuple[int, ...]:
    """``(C, H, W)`` for tracing: timm's ``pretrained_cfg`` size (a ViT's own ``patch_embed.img_size``),
    with the channels of the model's first convolution/linear layer."""
    size = list((getattr(model, "pretrained_cfg", None) or {}).get("input_size") or (3, 224, 224))
    img = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if isinstance(img, (tuple, list)) and len(img) == 2:
        size[1:] = list(img)
    first = next((m for m in model.modules() if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))), None)
    if isinstance(first, nn.modules.conv._ConvNd):
        size[0] = first.in_channels
    return tuple(int(s) for s in size)


def removable_units(
    model: nn.Module, sparse: set[str], input_size: Sequence[int]
) -> tuple[list[ChannelUnit], dict[str, str]]:
    """The removable channel units of ``model`` (module docstring) and, for every other traced group,
    why it is not one. ``sparse``: names of the sparse parameters; ``input_size``: ``(C, H, W)``."""
    ref = next((p for p in model.parameters() if p.is_floating_point()), None)
    x = (
        torch.zeros(1, *input_size)
        if ref is None
        else torch.zeros(1, *input_size, dtype=ref.dtype, device=ref.device)
    )
    trace = trace_channel_groups(model, x)
    stem = _stem_prefix(model)
    units: list[ChannelUnit] = []
    skipped: dict[str, str] = {}
    for traced in trace.groups:
        group = traced.group
        rows = [
            (s.param_name, s.index, s.channel)
            for s in group.slices
            if s.role == "producer" and s.param_name in sparse
        ]
        cols = [(s.param_name, s.index, s.channel) for s in group.slices if s.role == "consumer"]
        producers = [p for p, _, _ in rows if not _is_depthwise(model, p)]
        why = None
        if not group.exact:
            why = f"removal is not exact ({traced.reason})"
        elif bool(traced.pinned.any()) or not torch.equal(traced.classes, torch.arange(group.num_channels)):
            why = "grouped convolution channels"
        elif len(producers) != 1:
            why = f"{len(producers)} producer layers (residual stream)" if producers else "no sparse producer"
        elif stem is not None and (producers[0] + ".").startswith(stem):
            why = "the stem"
        elif not cols:
            why = "its channels are not read by a layer"
        elif any(p not in sparse for p, _, _ in cols):
            why = f"read by the dense parameter {next(p for p, _, _ in cols if p not in sparse)!r}"
        elif any(s.dim != (0 if s.role == "producer" else 1) for s in group.slices if s.param_name in sparse):
            why = "channels along an unexpected dimension"
        if why is None:
            units.append(ChannelUnit(group.name, group.num_channels, producers[0], rows, cols, group.slices))
        else:
            skipped[group.name] = why
    return units, skipped


def positions_left(
    units: Sequence[ChannelUnit], alive: Mapping[str, torch.Tensor], shapes: Mapping[str, tuple[int, ...]]
) -> tuple[dict[str, torch.Tensor], dict[str, tuple[int, ...]]]:
    """With only the ``alive`` channels of each unit left: ``allowed`` (a bool tensor broadcastable to the
    weight, for every parameter that lost rows or columns) and every parameter's effective shape."""
    rows: dict[str, torch.Tensor] = {}
    cols: dict[str, torch.Tensor] = {}
    for unit in units:
        dead = ~alive[unit.name]
        for table, slices, dim in ((rows, unit.rows, 0), (cols, unit.cols, 1)):
            for param, index, channel in slices:
                keep = table.setdefault(param, torch.ones(shapes[param][dim], dtype=torch.bool))
                keep[index[dead[channel]]] = False
    allowed: dict[str, torch.Tensor] = {}
    effective: dict[str, tuple[int, ...]] = {}
    for name, shape in shapes.items():
        r = rows.get(name, torch.ones(shape[0], dtype=torch.bool))
        c = cols.get(name, torch.ones(shape[1], dtype=torch.bool)) if len(shape) > 1 else None
        if name in rows or name in cols:
            positions = r.view(-1, *[1] * (len(shape) - 1))
            if c is not None:
                positions = positions & c.view(1, -1, *[1] * (len(shape) - 2))
            allowed[name] = positions
        effective[name] = (int(r.sum()), *((int(c.sum()),) if c is not None else ()), *shape[2:])
    return allowed, effective
