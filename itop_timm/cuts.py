"""Cuts: positions sliced out of parameters when a model shrinks during training, and the slicing of
every tensor shaped like such a parameter (gradients, optimizer state, masks, averaging buffers)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["Cuts", "slice_like", "cut_shape", "shrink_optimizer_state"]

#: ``{parameter name: [(dim, keep), ...]}``: the positions kept along each sliced dimension (a bool
#: tensor over the dimension's size before the cut), in the order they apply
Cuts = dict[str, list[tuple[int, torch.Tensor]]]


def slice_like(t: torch.Tensor, cuts: Sequence[tuple[int, torch.Tensor]]) -> torch.Tensor:
    """``t`` (shaped like the parameter the ``cuts`` were made on) with the same positions removed."""
    for dim, keep in cuts:
        t = t.index_select(dim, keep.nonzero().flatten().to(t.device))
    return t.contiguous()


def cut_shape(shape: Sequence[int], cuts: Sequence[tuple[int, torch.Tensor]]) -> tuple[int, ...]:
    """The shape a tensor of ``shape`` has after ``cuts``."""
    out = list(shape)
    for dim, keep in cuts:
        out[dim] = int(keep.sum())
    return tuple(out)


def shrink_optimizer_state(
    optimizer: torch.optim.Optimizer, params: Mapping[str, nn.Parameter], cuts: Cuts
) -> None:
    """Slice every tensor of ``optimizer.state[p]`` shaped like ``p`` by ``p``'s cuts; scalars (e.g.
    ``step``) stay. Call before :meth:`LiveShrink.apply` (while ``p`` still has its old shape); checks
    every state first and changes nothing when one cannot follow.

    Raises:
        ValueError: naming the parameter and state key, for a state tensor that is neither a scalar nor
            shaped like its parameter (e.g. a factored second moment): it cannot follow the slicing.
    """
    todo: list[tuple[dict[str, Any], str, torch.Tensor, list[tuple[int, torch.Tensor]]]] = []
    for name, param_cuts in cuts.items():
        p = params[name]
        state: dict[str, Any] = optimizer.state.get(p, {})
        for key, value in state.items():
            if not isinstance(value, torch.Tensor) or value.ndim == 0:
                continue
            if value.shape != p.shape:
                raise ValueError(
                    f"shrink: optimizer state {key!r} of {name} has shape {tuple(value.shape)}, not the "
                    f"parameter's {tuple(p.shape)}: {type(optimizer).__name__} cannot follow a shrink"
                )
            todo.append((state, key, value, param_cuts))
    for state, key, value, param_cuts in todo:
        state[key] = slice_like(value, param_cuts)
