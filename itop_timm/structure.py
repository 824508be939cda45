"""Structure rules: the one extension a method needs to shape its masks by rows and channels.

A method (:mod:`itop_timm.methods`) is a pair of score functions; the topology update drops the
lowest-scored active weights of each layer and grows the highest-scored inactive ones. A method that
also constrains *where* weights may live registers a :class:`StructureRule` class with it
(``MethodInfo(..., structure=ChaseRule)``). The same update then reads, per layer, a :class:`LayerPlan`:

* ``allowed`` — positions that may hold weights (Chase: rows and columns of channels still alive;
  SRigL: rows not ablated); active weights outside it are dropped first;
* ``count`` — active weights the layer holds after the update (Chase: the global budget redistributed
  over the shrunken shapes; default: as many as now);
* ``row_k`` — every allowed row holds exactly ``k`` active weights (SRigL's constant fan-in).

A rule is a dataclass whose fields are the method's options (``sparsify(..., method_options={...})``,
the recipe's ``sparsity.method_options``): each field carries its meaning and source in
``metadata["help"]`` and its default, validated in ``__post_init__`` before anything is modified. Its
hooks (all optional): :meth:`~StructureRule.bind` (check the model, before any change),
:meth:`~StructureRule.initial_mask`, :meth:`~StructureRule.after_step` (changes on its own schedule),
:meth:`~StructureRule.last_update_step`, :meth:`~StructureRule.state_dict` for exact resume.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, ClassVar

import torch

if TYPE_CHECKING:
    from torch import nn

    from .config import SparsityConfig
    from .methods import LayerView
    from .sparsifier import Sparsifier

__all__ = [
    "LayerPlan",
    "StructureRule",
    "next_layer_mask",
    "rule_options",
    "describe_options",
    "check_fraction",
]


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


class StructureRule:
    """Base of a method's structure rule; subclasses are dataclasses whose fields are its options."""

    #: whether the trained model loses whole channels that ``structured.compact`` slices out (the recipe
    #: then also writes the compacted checkpoint)
    compacts: ClassVar[bool] = False

    def bind(self, model: nn.Module, shapes: Mapping[str, tuple[int, ...]], config: SparsityConfig) -> None:
        """Check ``model`` and remember what the rule needs; called before the sparsifier changes anything
        (raise ``ValueError`` naming the layer for an architecture the rule cannot handle)."""

    def initial_mask(
        self, name: str, shape: tuple[int, ...], count: int, generator: torch.Generator
    ) -> torch.Tensor | None:
        """The layer's initial mask with ``count`` active weights, or ``None`` for a uniform random one."""
        return None

    def layer_plan(self, view: LayerView, rate: float, count: int) -> LayerPlan:
        """The plan for one layer at a topology update (``count``: its active weights now)."""
        return LayerPlan()

    def after_step(self, sparsifier: Sparsifier) -> None:
        """Called after every training step's re-masking, before a due topology update."""

    def last_update_step(self, total_steps: int | None) -> int | None:
        """The last step at which a topology update may run (``None``: no limit of the rule's own)."""
        return None

    def stats(self) -> dict[str, Any]:
        """JSON-able figures for the update log (``last_update["structure"]``)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """What :meth:`load_state_dict` needs for an exact resume (tensors, numbers, lists, dicts)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output (validate before changing anything)."""


def rule_options(
    rule_cls: type[StructureRule] | None, method: str, options: Mapping[str, Any]
) -> StructureRule | None:
    """Build the method's rule from ``method_options`` (validated by the rule), or check there are none."""
    if rule_cls is None:
        if options:
            raise ValueError(f"method {method!r} takes no method_options, got {sorted(options)}")
        return None
    allowed = sorted(f.name for f in fields(rule_cls))
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"method {method!r} does not take option(s) {unknown}; allowed: {allowed}")
    return rule_cls(**options)


def check_fraction(method: str, name: str, value: object, *, low_open: bool, high_open: bool) -> float:
    """``value`` as a float in the interval from 0 to 1 (ends open or closed as given), else a ``ValueError``
    naming the method, the option, the interval and the value."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok:
        ok = (value > 0 if low_open else value >= 0) and (value < 1 if high_open else value <= 1)
    if not ok:
        interval = f"{'(' if low_open else '['}0, 1{')' if high_open else ']'}"
        raise ValueError(f"{method}: {name} must be in {interval}, got {value!r}")
    return float(value)


def describe_options(rule_cls: type[StructureRule]) -> dict[str, tuple[Any, str]]:
    """``{option: (default, help)}`` of a rule class (for ``itop-timm methods``)."""
    return {
        f.name: (f.default if f.default is not dataclasses.MISSING else None, f.metadata.get("help", ""))
        for f in fields(rule_cls)
    }


def _rowwise(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1)


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
        new[active_idx[torch.topk(drop, k, largest=False, sorted=False).indices]] = False
        grow = grow_score(new.view(mask.shape)).reshape(-1).float()
        grow = torch.where(new, grow.new_full((), -math.inf), grow)  # candidates: inactive positions
        new[torch.topk(grow, k, sorted=False).indices] = True
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
        kept[torch.topk(ranked, keep_n, sorted=False).indices] = True
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
            new.view(-1)[torch.topk(open_scores, grow_n, sorted=False).indices] = True
    if torch.equal(new, mask):
        return None
    return new, active - keep_n, int(new.sum()) - keep_n
