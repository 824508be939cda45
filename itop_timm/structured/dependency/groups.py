"""Coupled channel groups: the units of structured sparsity that can really be removed.

A :class:`ChannelGroup` is one torch-pruning dependency group (channels coupled across residual adds,
BatchNorm, depthwise convolutions, concatenations...) seen as plain tensor slices: for every
parameter it touches, which positions along which dimension belong to which channel of the group.
Group-LASSO regularisers (``prox.GroupLasso``) shrink each channel's slices jointly, and
``compact`` removes channels whose slices are all zero, so a zeroed group is removable as one unit.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .classes import channel_classes
from .exactness import inexact_reason
from .slices import ChannelSlice, channel_numel, group_item_slices, merge_slices
from .tracing import build_graph, classifier_modules, model_label, run_example, tracing_state

__all__ = ["ChannelGroup", "TracedGroup", "ChannelTrace", "trace_channel_groups", "coupled_channel_groups"]

_logger = logging.getLogger(__name__)


@dataclass
class ChannelGroup:
    """One coupled group of ``num_channels`` channels.

    Attributes:
        name: the root layer (as named in the model) the group was traced from.
        num_channels: channels in the group.
        slices: every parameter slice coupled to these channels.
        exact: False when removing a zero channel would still change the outputs (e.g. the group runs
            through a LayerNorm/GroupNorm that normalises across channels); such groups are regularised
            but never removed.
        numel: elements per channel summed over all slices (``sqrt(numel)`` scales the group-LASSO threshold).
    """

    name: str
    num_channels: int
    slices: list[ChannelSlice] = field(default_factory=list)
    exact: bool = True
    numel: torch.Tensor | None = None  # LongTensor [num_channels]


@dataclass
class TracedGroup:
    """A :class:`ChannelGroup` together with the torch-pruning group it was made from (for ``compact``).

    Attributes:
        group: the plain-tensor view of the group.
        tp_group: the torch-pruning ``Group`` over all channels; its first item is the root operation.
        reason: why the group is not exact (``None`` when it is).
        classes: LongTensor ``[num_channels]``; channels with the same value can only be removed together
            (a grouped convolution must keep the same number of channels in each of its groups). The value
            is the smallest channel of the class.
        pinned: BoolTensor ``[num_channels]``; channels that can never be removed (their grouped-convolution
            siblings lie outside this group).
    """

    group: ChannelGroup
    tp_group: Any
    reason: str | None
    classes: torch.Tensor
    pinned: torch.Tensor


@dataclass
class ChannelTrace:
    """The torch-pruning ``DependencyGraph`` of a model and its traced channel groups.

    ``untraced`` names layers with parameters that ran in the forward pass but are missing from
    torch-pruning's graph (their output was detached or computed without autograd): pruning the channels
    they read would break them, so ``compact`` refuses such models.
    """

    graph: Any
    groups: list[TracedGroup]
    untraced: list[str] = field(default_factory=list)


def _ignored_ids(model: nn.Module, ignored_layers: Iterable[nn.Module] | None) -> set[int]:
    own = {id(m) for m in model.modules()}
    ignored: set[int] = set()
    for layer in [*(ignored_layers or []), *classifier_modules(model)]:
        if not isinstance(layer, nn.Module):
            raise ValueError(
                f"ignored_layers must hold nn.Module layers of the model, got {type(layer).__name__}"
            )
        if id(layer) not in own:
            raise ValueError(
                f"ignored layer {type(layer).__name__} is not a submodule of {model_label(model)}"
            )
        ignored.update(id(m) for m in layer.modules())
    return ignored


def _iter_tp_groups(graph: Any, model: nn.Module, ignored: set[int]) -> Iterable[Any]:
    """torch-pruning's ``get_all_groups(root_module_types=(conv, linear))``, naming the layer on failure."""
    from torch_pruning import ops

    names = {id(m): n for n, m in model.named_modules()}
    visited: set[int] = set()
    for module in list(graph.module2node):
        if id(module) in ignored or id(module) in visited:
            continue
        if not isinstance(module, (ops.TORCH_CONV, ops.TORCH_LINEAR)):
            continue
        pruner = graph.get_pruner_of_module(module)
        if pruner is None or pruner.get_out_channels(module) is None:
            continue
        try:
            tp_group = graph.get_pruning_group(
                module, pruner.prune_out_channels, list(range(pruner.get_out_channels(module)))
            )
        except Exception as err:
            raise ValueError(
                f"torch-pruning cannot group the channels of layer {names.get(id(module))!r} "
                f"in {model_label(model)}: {type(err).__name__}: {err}"
            ) from err
        prunable = True
        for item in tp_group:
            if graph.is_out_channel_pruning_fn(item.dep.handler):
                visited.add(id(item.dep.target.module))
                prunable &= id(item.dep.target.module) not in ignored
        if prunable:
            yield tp_group


def trace_channel_groups(
    model: nn.Module, example_inputs: Any, *, ignored_layers: Iterable[nn.Module] | None = None
) -> ChannelTrace:
    """Trace ``model`` with torch-pruning and describe every coupled channel group (see
    :func:`coupled_channel_groups`); also returns the ``DependencyGraph`` and torch-pruning groups."""
    ignored = _ignored_ids(model, ignored_layers)
    names = {id(m): n for n, m in model.named_modules()}
    params = dict(model.named_parameters())
    param_names = {id(p): n for n, p in params.items()}
    traced: list[TracedGroup] = []
    called: list[nn.Module] = []
    with tracing_state(model):
        run_example(model, example_inputs, called)
        graph = build_graph(model, example_inputs)
        untraced = _untraced_layers(graph, called, names, ignored)
        if untraced:
            _logger.warning(
                "%s: layers %s ran but are not in torch-pruning's graph (detached output?); their channels "
                "are not grouped",
                model_label(model),
                untraced[:5],
            )
        for tp_group in _iter_tp_groups(graph, model, ignored):
            root = tp_group[0].dep.target.module
            num = graph.get_out_channels(root)
            slices: list[ChannelSlice] = []
            reason = None
            for item in tp_group:
                item_slices, item_reason = group_item_slices(graph, item, param_names, num)
                slices += item_slices
                reason = reason or item_reason
            slices = merge_slices(slices)
            reason = reason or inexact_reason(graph, tp_group, names)
            classes, pinned = channel_classes(graph, tp_group, num)
            group = ChannelGroup(
                name=names.get(id(root), type(root).__name__),
                num_channels=num,
                slices=slices,
                exact=reason is None,
                numel=channel_numel(slices, params, num),
            )
            traced.append(TracedGroup(group, tp_group, reason, classes, pinned))
    return ChannelTrace(graph, traced, untraced)


def _untraced_layers(
    graph: Any, called: list[nn.Module], names: dict[int, str], ignored: set[int]
) -> list[str]:
    """Layers (or their own unwrapped parameters) that ran but are missing from the graph."""
    from torch_pruning import ops

    layer_types = (
        ops.TORCH_CONV,
        ops.TORCH_LINEAR,
        ops.TORCH_BATCHNORM,
        ops.TORCH_LAYERNORM,
        ops.TORCH_GROUPNORM,
        ops.TORCH_INSTANCENORM,
        ops.TORCH_PRELU,
        ops.TORCH_EMBED,
        ops.TORCH_MHA,
        ops.TORCH_LSTM,
    )
    in_graph = {id(m) for m in graph.module2node}
    unwrapped = {id(p) for p, _ in graph.unwrapped_parameters}
    out: dict[str, None] = {}
    for module in called:
        name = names.get(id(module))
        if not name or id(module) in ignored:
            continue
        if isinstance(module, layer_types):
            if id(module) not in in_graph:
                out[name] = None
        elif any(id(p) in unwrapped and id(p) not in in_graph for p in module.parameters(recurse=False)):
            out[name] = None
    return list(out)


def coupled_channel_groups(
    model: nn.Module, example_inputs: Any, *, ignored_layers: Iterable[nn.Module] | None = None
) -> list[ChannelGroup]:
    """torch-pruning's coupled channel groups of ``model`` as :class:`ChannelGroup` s.

    One group per torch-pruning dependency group rooted at a convolution or linear layer
    (``get_all_groups(root_module_types=(conv, linear))``), skipping groups that would prune the classifier's
    outputs (``model.get_classifier()`` for timm models) or an ``ignored_layers`` layer. Each group lists,
    for every parameter it touches, the positions along the pruned dimension and the group channel of each
    position (through torch-pruning's index mapping: concatenations, flattening, splits), with the role
    ``"producer"`` (output channels, biases, norm affine parameters, depthwise kernels, layer-scale
    ``gamma``) or ``"consumer"`` (input channels of convolutions / linear layers). Each position is listed
    once: a grouped convolution's input position is shared by the same slot of every group and is listed
    for the channel of the first group; a position torch-pruning reaches from several channels (GhostNet's
    ``cat([x, depthwise(x)])``) is listed for the first of them. ``compact`` removes such channels together
    (:class:`TracedGroup` ``classes``), so a single one of them is not removable on its own.

    ``exact`` is True only when removing a zero channel provably leaves the outputs unchanged: every
    operation the channels pass through is channel-wise and known (convolutions, linear layers, batch /
    instance norm, zero-preserving activations, additions, products, pooling, flattening, channel
    concatenation), a channel whose producer slices are all zero is zero wherever it is read, and the
    channels are not model outputs. LayerNorm / GroupNorm (they normalise across channels), attention
    (torch-pruning only approximates it), unknown operations and reshapes that may mix channels make a
    group non-exact.

    The model is traced in eval mode (torch-pruning follows autograd, so the tracing pass records a graph
    but never runs backward); each module's train/eval mode and each parameter's ``requires_grad`` are
    restored afterwards.

    Args:
        model: the model (a timm model or any ``nn.Module``).
        example_inputs: an input batch, e.g. ``torch.randn(1, 3, 224, 224)`` (a tuple/list is unpacked).
        ignored_layers: layers whose output channels must not be pruned (their groups are left out).

    Raises:
        ValueError: if the example input does not run through the model, or torch-pruning cannot trace
            it (naming the model and, where known, the layer).
    """
    return [
        t.group for t in trace_channel_groups(model, example_inputs, ignored_layers=ignored_layers).groups
    ]
