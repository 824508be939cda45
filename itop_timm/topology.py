"""One layer's topology update: drop the lowest-scored active weights, grow the highest-scored others.

The mechanism every method shares (REFERENCE §1). A method's score functions see the layer through a
:class:`LayerView`; a structure rule may constrain the result with a :class:`LayerPlan` (which
positions may hold weights, how many, how many per row); :func:`next_layer_mask` computes the layer's
new mask. Pure functions of tensors: no model, optimizer or process group here.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = ["LayerView", "LayerPlan", "next_layer_mask", "top_indices"]


@dataclass(frozen=True)
class LayerView:
    """What a score function may read about one sparse tensor at a topology update.

    Attributes:
        name: parameter name as in ``model.named_parameters()``.
        weight: the parameter's current values (do not modify).
        grad: dense gradient of the last backward pass, or ``None`` if there was none.
        mask: bool mask of active weights (for the grow score: after this update's drop).
        ever_active: bool union of every weight ever active (R_s bookkeeping).
        grad_ema: EMA of dense gradients if the method asked for one (``grad_ema_beta``), else ``None``.
        generator: the sparsifier's seeded CPU generator; draw randomness only through :meth:`uniform`.
    """

    name: str
    weight: torch.Tensor
    grad: torch.Tensor | None
    mask: torch.Tensor
    ever_active: torch.Tensor
    grad_ema: torch.Tensor | None
    generator: torch.Generator

    def uniform(self) -> torch.Tensor:
        """Uniform [0, 1) scores shaped like the weight, drawn on the CPU from the seeded generator
        (so masks do not depend on the device) and moved to the weight's device."""
        return torch.rand(self.weight.shape, generator=self.generator).to(self.weight.device)

    def grad_or_zeros(self) -> torch.Tensor:
        return self.grad if self.grad is not None else torch.zeros_like(self.weight)


@dataclass(frozen=True)
class LayerPlan:
    """How one layer's mask may look after a topology update (see the module docstring).

    Attributes:
        allowed: bool tensor broadcastable to the weight (e.g. ``[rows, 1, 1, 1]``); ``None``: everywhere.
        count: active weights after the update; ``None``: as many as before.
        row_k: exactly this many active weights in every row that ``allowed`` leaves open.
    """

    allowed: torch.Tensor | None = None
    count: int | None = None
    row_k: int | None = None


def _rowwise(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1)


def top_indices(scores: torch.Tensor, n: int, largest: bool = True) -> torch.Tensor:
    """Indices of the ``n`` highest (``largest=False``: lowest) of the 1-D ``scores``; among values tied
    with the ``n``-th, the lowest indices. So the choice does not depend on how ``torch.topk`` breaks
    ties, and a tensor with positions sliced out (a live shrink) chooses the same weights."""
    if n <= 0:
        return torch.zeros(0, dtype=torch.long, device=scores.device)
    values = torch.topk(scores, n, largest=largest, sorted=False).values
    nth = values.min() if largest else values.max()
    better = (scores > nth) if largest else (scores < nth)
    chosen = better.nonzero().flatten()
    ties = (scores == nth).nonzero().flatten()[: n - chosen.numel()]
    return torch.cat([chosen, ties])


def _cap_per_row(scores: torch.Tensor, eligible: torch.Tensor, k: int) -> torch.Tensor:
    """Of ``eligible`` (2-D, rows), the at most ``k`` highest-scored positions of every row."""
    ranked = torch.where(eligible, scores, scores.new_full((), -math.inf))
    top = torch.topk(ranked, min(k, ranked.shape[1]), dim=1)
    capped = torch.zeros_like(eligible)
    capped.scatter_(1, top.indices, top.values > -math.inf)
    return capped


@torch.no_grad()
def next_layer_mask(
    mask: torch.Tensor,
    rate: float,
    drop_score: Callable[[torch.Tensor], torch.Tensor],
    grow_score: Callable[[torch.Tensor], torch.Tensor],
    plan: LayerPlan | None = None,
) -> tuple[torch.Tensor, int, int] | None:
    """One layer's topology update: ``(new mask, dropped, grown)``, or ``None`` when nothing is due.

    Without a plan: the ``k = ceil(rate * active)`` active weights with the lowest drop score go, the
    ``k`` inactive positions with the highest grow score (scored after the drop) come. With a plan, the
    same, within ``plan.allowed``: the layer keeps at most ``active - k`` of its allowed active weights
    (at most ``row_k`` per row) and ``plan.count`` of them at most, then grows to ``plan.count`` (or
    every allowed row to ``row_k``). ``drop_score(mask)`` / ``grow_score(mask)`` score every position.
    """
    flat = mask.reshape(-1)
    active_idx = flat.nonzero().squeeze(1)  # host sync once per layer and update, never per step
    active = active_idx.numel()
    k = min(math.ceil(rate * active), active, flat.numel() - active)
    if plan is None:
        if k <= 0:
            return None
        drop = drop_score(mask).reshape(-1)[active_idx].float()  # rank the active weights only
        new = flat.clone()
        new[active_idx[top_indices(drop, k, largest=False)]] = False
        grow = grow_score(new.view(mask.shape)).reshape(-1).float()
        grow = torch.where(new, grow.new_full((), -math.inf), grow)  # candidates: inactive positions
        new[top_indices(grow, k)] = True
        return new.view(mask.shape), k, k

    allowed = (
        torch.ones_like(mask) if plan.allowed is None else plan.allowed.expand(mask.shape).to(mask.device)
    )
    room = int(allowed.sum())
    target = min(room, active if plan.count is None else plan.count)
    if plan.row_k is not None:
        target = min(target, plan.row_k * int(_rowwise(allowed).any(1).sum()))
    candidates = mask & allowed
    drop = drop_score(mask).float()
    if plan.row_k is not None:
        candidates = _cap_per_row(_rowwise(drop), _rowwise(candidates), plan.row_k).view(mask.shape)
    keep_n = min(active - max(k, 0), int(candidates.sum()), target)
    ranked = torch.where(candidates, drop, drop.new_full((), -math.inf)).reshape(-1)
    kept = torch.zeros_like(flat)
    if keep_n > 0:
        kept[top_indices(ranked, keep_n)] = True
    kept = kept.view(mask.shape)
    grow = grow_score(kept).float()
    if plan.row_k is not None:  # kept weights rank first, then the best open positions of the row
        scores = torch.where(kept, grow.new_full((), math.inf), grow)
        new = _cap_per_row(_rowwise(scores), _rowwise(allowed), plan.row_k).view(mask.shape)
    else:
        new = kept.clone()
        grow_n = target - keep_n
        if grow_n > 0:
            open_scores = torch.where(allowed & ~kept, grow, grow.new_full((), -math.inf)).reshape(-1)
            new.view(-1)[top_indices(open_scores, grow_n)] = True
    if torch.equal(new, mask):
        return None
    return new, active - keep_n, int(new.sum()) - keep_n
