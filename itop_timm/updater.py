"""A topology update over every sparse layer: the method's scores, the rule's plans, rank 0's decision.

:class:`TopologyUpdater` runs :func:`~itop_timm.topology.next_layer_mask` on one layer at a time, on
full tensors (a sharded layer is gathered, decided exactly as unsharded, and this rank keeps its
shard), broadcasts rank 0's new mask and stores it in the :class:`~itop_timm.mask_state.MaskState`
(the union follows). An update whose gradients are not finite (AMP overflow) is skipped; a layer
without a gradient keeps its mask when the method grows by gradient.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from .distributed import all_finite, broadcast_masks, full_tensor
from .mask_state import MaskState
from .structure import StructureRule
from .topology import LayerView, next_layer_mask
from .validation import short_repr

__all__ = ["TopologyUpdater"]

_logger = logging.getLogger(__name__)


def _score(method: Any, which: str, view_of: Callable[..., LayerView], mask: torch.Tensor) -> torch.Tensor:
    """The ``which`` (``"drop"`` or ``"grow"``) score of ``method`` for a layer seen with ``mask``;
    a ``ValueError`` naming the method and the layer when it is not a tensor shaped like the weight."""
    view = view_of(mask=mask)
    scores = getattr(method, f"{which}_score")(view)
    if not isinstance(scores, torch.Tensor) or scores.shape != view.weight.shape:
        got = f"shape {tuple(scores.shape)}" if isinstance(scores, torch.Tensor) else short_repr(scores)
        raise ValueError(
            f"method {method.name!r}: its {which} score for layer {view.name!r} must be a tensor shaped "
            f"like the weight, {tuple(view.weight.shape)}, got {got}"
        )
    return scores


class TopologyUpdater:
    """Drop and regrow the weights of every sparse layer, by a method's scores within a rule's plans."""

    def __init__(
        self,
        method: Any,
        structure: StructureRule | None,
        schedule: Callable[[int], float],
        generator: torch.Generator,
    ) -> None:
        self.method = method  # a MethodInfo
        self.structure = structure
        self.schedule = schedule
        self.generator = generator

    def _layers_without_needed_grad(self, step: int, params: Mapping[str, nn.Parameter]) -> list[str]:
        """Sparse layers left unchanged by this update: the method grows by gradient and they have none."""
        if not self.method.needs_grad:
            return []
        names = [name for name, p in params.items() if p.grad is None]
        if names:
            _logger.warning(
                "step %d: %d sparse layer(s) have no gradient (first: %s); method %r grows by gradient, "
                "so they keep their mask in this topology update",
                step,
                len(names),
                names[:3],
                self.method.name,
            )
        return names

    @torch.no_grad()
    def __call__(self, step: int, params: Mapping[str, nn.Parameter], state: MaskState) -> dict[str, Any]:
        """Update every layer's mask in ``state``; returns the stats (``"skipped"`` if nothing was done).
        The caller re-applies the masks and adds the density figures."""
        grads = [p.grad for p in params.values() if p.grad is not None]
        if not all_finite(grads):
            _logger.warning("step %d: gradients are not finite; topology update skipped", step)
            return {"step": step, "skipped": "non-finite gradients"}
        rate = self.schedule(step)
        dropped: dict[str, int] = {}
        grown: dict[str, int] = {}
        changed: dict[str, torch.Tensor] = {}
        no_grad = self._layers_without_needed_grad(step, params)
        for name, p in params.items():
            if name in no_grad:
                continue
            # one layer at a time on full tensors (sharded: gathered here, identical on every rank)
            mask = full_tensor(state.masks[name])
            view_of = functools.partial(
                LayerView,
                name=name,
                weight=full_tensor(p),
                grad=full_tensor(p.grad),
                ever_active=full_tensor(state.ever_active[name]),
                grad_ema=None if state.grad_ema is None else full_tensor(state.grad_ema[name]),
                generator=self.generator,
            )
            plan = None
            if self.structure is not None:
                plan = self.structure.layer_plan(view_of(mask=mask), rate, int(mask.sum()))
            result = next_layer_mask(
                mask,
                rate,
                functools.partial(_score, self.method, "drop", view_of),
                functools.partial(_score, self.method, "grow", view_of),
                plan,
            )
            if result is None:
                continue
            new_mask, dropped[name], grown[name] = result
            changed[name] = (mask & ~new_mask).sum()
            mask.copy_(new_mask)
            broadcast_masks([mask])  # rank 0's decision, layer by layer
            state.store(name, mask)
        moved = {name: int(v) for name, v in changed.items()}
        stats: dict[str, Any] = {
            "step": step,
            "prune_rate": rate,
            "dropped": sum(dropped.values()),
            "grown": sum(grown.values()),
            "replaced": sum(moved.values()),
            "layers": {
                name: {"dropped": dropped[name], "grown": grown[name], "replaced": moved[name]}
                for name in dropped
            },
        }
        if no_grad:
            stats["no_grad_layers"] = no_grad
        return stats
