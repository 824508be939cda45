"""Shrinking a live model: removed channels sliced out of its tensors in place, during training.

A channel a method removed for good (Chase: its producer rows and the columns reading it are masked
until the end) computes nothing; :class:`LiveShrink` takes it out of the model itself, so the rest of
the run computes on a smaller network. For every :class:`~.dependency.units.ChannelUnit` it slices the
channel's positions out of every tensor of its coupled group — producer rows (convolution / linear
weights and biases, BatchNorm affine parameters *and* running statistics, depthwise kernels) and
consumer columns — and updates each layer's size attributes (``out_channels``, ``in_features``,
``num_features``, a depthwise convolution's ``groups``), so the model prints, runs and traces as the
smaller architecture. After every slicing the model carries the architecture record of a compacted
model (``model.itop_timm_pruning_history``: one torch-pruning history entry per unit, its removed
channels in the original coordinates), so ``save_sparse`` writes the smaller network and ``load_sparse``
rebuilds it from timm's architecture.

Each ``nn.Parameter`` keeps its identity (``param.data`` is replaced): the user's optimizer, its
hooks and the sparsifier keep working. Everything else shaped like a parameter — gradients, optimizer
state, masks, union masks, averaging buffers — is sliced by its owner with the same :data:`~itop_timm.cuts.Cuts`
(:func:`itop_timm.cuts.slice_like`, :func:`itop_timm.cuts.shrink_optimizer_state`). Positions are tracked in the original model's
coordinates (:meth:`LiveShrink.present`), so a method keeps its own bookkeeping in those.
"""

from __future__ import annotations

import gc
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..checkpoint import ARCHITECTURE_ATTR
from ..cuts import Cuts, slice_like
from .dependency.units import ChannelUnit

__all__ = ["LiveShrink", "sliceable_reason"]


def _owner(model: nn.Module, param_name: str) -> tuple[nn.Module, str]:
    module_name, _, attr = param_name.rpartition(".")
    return (model.get_submodule(module_name) if module_name else model), attr


def sliceable_reason(model: nn.Module, unit: ChannelUnit) -> str | None:
    """Why the channels of ``unit`` cannot be sliced out of ``model`` in place (``None`` when they can):
    every tensor of the group must belong to a convolution (not transposed; ``groups`` 1 or depthwise
    along its output channels), a linear layer or a BatchNorm layer."""
    for s in unit.slices:
        module, attr = _owner(model, s.param_name)
        if isinstance(module, nn.modules.conv._ConvNd):
            if module.transposed:
                return f"{s.param_name}: a transposed convolution"
            if module.groups > 1 and not (
                module.groups == module.in_channels == module.out_channels and s.role == "producer"
            ):
                return f"{s.param_name}: a grouped convolution (groups={module.groups})"
        elif not isinstance(module, (nn.Linear, nn.modules.batchnorm._BatchNorm)):
            return f"{s.param_name}: a {type(module).__name__} layer (only conv, linear and BatchNorm are sliced)"
    return None


class LiveShrink:
    """Slices removed channels of ``units`` out of ``model`` in place (module docstring).

    Raises:
        ValueError: naming the tensor, when a unit's channels cannot be sliced in place
            (:func:`sliceable_reason`); nothing is changed.
    """

    def __init__(self, model: nn.Module, units: Sequence[ChannelUnit], input_size: Sequence[int]) -> None:
        params = dict(model.named_parameters())
        for unit in units:
            for s in unit.slices:
                if type(params[s.param_name]) is not nn.Parameter:
                    raise ValueError(
                        f"shrink: {s.param_name} is a {type(params[s.param_name]).__name__}, not a plain "
                        "nn.Parameter (e.g. sharded): it cannot be sliced in place"
                    )
        for unit in units:
            why = sliceable_reason(model, unit)
            if why is not None:
                raise ValueError(f"shrink: the channels of {unit.name!r} cannot be sliced in place ({why})")
        self.model = model
        self.units = list(units)
        self.input_size = [int(s) for s in input_size]
        # original positions still present, per (parameter, dim) the units slice
        self._present: dict[tuple[str, int], torch.Tensor] = {
            (s.param_name, s.dim): torch.arange(params[s.param_name].shape[s.dim])
            for unit in self.units
            for s in unit.slices
        }

    def present(self, param_name: str, dim: int) -> torch.Tensor | None:
        """The original positions along ``dim`` that ``param_name`` still holds, in order (``None`` when
        no unit slices that dimension)."""
        return self._present.get((param_name, dim))

    def channels_present(self, unit: ChannelUnit) -> torch.Tensor:
        """Which channels of ``unit`` the model still holds (bool tensor over its channels)."""
        s = unit.slices[0]
        held = torch.isin(s.index, self._present[(s.param_name, s.dim)])
        return torch.zeros(unit.num_channels, dtype=torch.bool).index_fill_(0, s.channel[held], True)

    def cuts_for(self, removed: Mapping[str, torch.Tensor]) -> Cuts:
        """The :data:`~itop_timm.cuts.Cuts` that remove, for every unit, the channels where ``removed[unit.name]`` (a bool
        tensor over the unit's channels) is True and that are still present. Changes nothing."""
        drop: dict[tuple[str, int], set[int]] = {}
        for unit in self.units:
            dead = removed.get(unit.name)
            if dead is None or not bool(dead.any()):
                continue
            for s in unit.slices:
                drop.setdefault((s.param_name, s.dim), set()).update(s.index[dead[s.channel]].tolist())
        cuts: Cuts = {}
        for (name, dim), positions in drop.items():
            present = self._present[(name, dim)]
            keep = ~torch.isin(present, torch.tensor(sorted(positions), dtype=torch.long))
            if not bool(keep.all()):
                cuts.setdefault(name, []).append((dim, keep))
        return cuts

    @torch.no_grad()
    def apply(self, cuts: Cuts) -> None:
        """Slice the model's parameters (identity kept), their gradients, BatchNorm running statistics and
        the layers' size attributes by ``cuts`` (from :meth:`cuts_for`)."""
        params = dict(self.model.named_parameters())
        touched: dict[int, nn.Module] = {}
        for name, param_cuts in cuts.items():
            p = params[name]
            _replace(
                p,
                slice_like(p.detach(), param_cuts),
                None if p.grad is None else slice_like(p.grad, param_cuts),
            )
            module, attr = _owner(self.model, name)
            touched[id(module)] = module
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and attr == "weight":
                for buffer in ("running_mean", "running_var"):
                    value = getattr(module, buffer, None)
                    if value is not None:
                        setattr(module, buffer, slice_like(value, param_cuts))
            for dim, keep in param_cuts:
                present = self._present[(name, dim)]
                self._present[(name, dim)] = present[keep]
        for module in touched.values():
            _resize_attributes(module)
        setattr(self.model, ARCHITECTURE_ATTR, self.architecture())

    def architecture(self) -> dict[str, Any]:
        """The model's architecture as a compacted model's record: ``{"history": [[producer layer, True,
        removed rows], ...], "input_size": [C, H, W]}``, one torch-pruning entry per unit that lost
        channels, in the original coordinates (replayed on a fresh model by
        :func:`~itop_timm.structured.compacted.rebuild_compacted`)."""
        history: list[list[Any]] = []
        for unit in self.units:
            (_, index, channel) = next(r for r in unit.rows if r[0] == unit.scored)
            gone = ~self.channels_present(unit)
            if bool(gone.any()):
                rows = sorted(int(i) for i in index[gone[channel]].tolist())
                history.append([unit.scored.rpartition(".")[0], True, rows])
        return {"history": history, "input_size": list(self.input_size)}


def _replace(p: nn.Parameter, data: torch.Tensor, grad: torch.Tensor | None) -> None:
    """Give the parameter object ``p`` new (smaller) ``data`` and ``grad`` in place. Not ``p.data = ...``:
    autograd caches a leaf's shape in its gradient accumulator, which a live graph (e.g. the last step's
    ``loss`` still referenced) keeps alive, so the next backward would expect the old shape. Swapping the
    tensor implementation (``torch.utils.swap_tensors``) gives ``p`` fresh autograd metadata."""
    if p._use_count() > 2:  # beyond the model and one live graph: maybe a finished trace's cyclic garbage
        gc.collect()
    if p._use_count() > 2:
        raise RuntimeError(
            "shrink: the parameter is referenced outside the model and the last autograd graph (e.g. a "
            "DistributedDataParallel reducer, or a list of losses kept with their graphs), so it cannot be "
            "sliced in place"
        )
    new = nn.Parameter(data, requires_grad=p.requires_grad)
    new.grad = grad
    new.__dict__.update(p.__dict__)  # attributes set on the parameter stay with it
    torch.utils.swap_tensors(p, new)


def _resize_attributes(module: nn.Module) -> None:
    """Make a sliced layer's size attributes agree with its weight again."""
    if isinstance(module, nn.modules.conv._ConvNd):
        out_channels = module.weight.shape[0]
        if module.groups > 1:  # depthwise (sliceable_reason allows no other grouping)
            module.groups = module.in_channels = module.out_channels = out_channels
        else:
            module.out_channels, module.in_channels = out_channels, module.weight.shape[1]
    elif isinstance(module, nn.Linear):
        module.out_features, module.in_features = module.weight.shape
    elif isinstance(module, nn.modules.batchnorm._BatchNorm) and module.weight is not None:
        module.num_features = module.weight.shape[0]
