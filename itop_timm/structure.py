"""Structure rules: the one extension a method needs to shape its masks by rows and channels.

A method (:mod:`itop_timm.methods`) is a pair of score functions; the topology update
(:mod:`itop_timm.topology`) drops the lowest-scored active weights of each layer and grows the
highest-scored inactive ones. A method that also constrains *where* weights may live registers a
:class:`StructureRule` class with it (``MethodInfo(..., structure=ChaseRule)``). The same update then
reads, per layer, a :class:`~itop_timm.topology.LayerPlan`:

* ``allowed`` — positions that may hold weights (Chase: rows and columns of channels still alive;
  SRigL: rows not ablated); active weights outside it are dropped first;
* ``count`` — active weights the layer holds after the update (Chase: the global budget redistributed
  over the shrunken shapes; default: as many as now);
* ``row_k`` — every allowed row holds exactly ``k`` active weights (SRigL's constant fan-in).

A rule is a dataclass whose fields are the method's options (``sparsify(..., method_options={...})``,
the recipe's ``sparsity.method_options``), each declared with :func:`itop_timm.validation.option`: its
meaning, default and allowed values, checked generically (:func:`check_rule_options`) before anything
is built. Its hooks (all optional): :meth:`~StructureRule.bind` (check the model, before any change),
:meth:`~StructureRule.initial_mask`, :meth:`~StructureRule.after_step` (positions to take away on its
own schedule: the sparsifier applies them with :meth:`~itop_timm.Sparsifier.restrict`),
:meth:`~StructureRule.last_update_step`, :meth:`~StructureRule.state_dict` for exact resume. A rule
never writes masks itself. A rule whose removals are for good may also shrink the live model
(:meth:`~StructureRule.shrink_cuts`, :meth:`~StructureRule.apply_shrink`): the sparsifier slices the
optimizer state and its masks with the same :data:`~itop_timm.cuts.Cuts` (Chase's ``shrink``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, ClassVar

from .validation import Range, check_options, short_repr

if TYPE_CHECKING:  # torch only for annotations: SparsityConfig (and so --help) imports this module
    import torch
    from torch import nn

    from .cuts import Cuts
    from .topology import LayerPlan, LayerView

__all__ = [
    "RuleContext",
    "StructureRule",
    "check_rule_options",
    "build_rule",
    "describe_options",
    "checked_budget",
]


@dataclass(frozen=True)
class RuleContext:
    """What a rule learns when a sparsifier binds it, before anything is modified.

    Attributes:
        model: the (unwrapped) model.
        shapes: ``{name: shape}`` of the sparse tensors.
        counts: active weights per sparse tensor at the start: the run's weight budget.
        total_steps: T (``None``: not known).
        update_interval: ΔT, optimizer steps between topology updates.
        distribution: the run's layer-density distribution.
        stop_step: the last step at which a topology update may happen (``None``: until the end).
    """

    model: nn.Module
    shapes: Mapping[str, tuple[int, ...]]
    counts: Mapping[str, int]
    total_steps: int | None
    update_interval: int
    distribution: str
    stop_step: int | None = None

    def last_scheduled_update(self) -> int | None:
        """The last step at which the run's schedule has a topology update: the last multiple of
        ``update_interval`` before ``total_steps`` and not after ``stop_step`` (``0``: no update at all;
        ``None``: no end known). A rule's own :meth:`StructureRule.last_update_step` may end it earlier."""
        ends = [
            end
            for end in (self.stop_step, None if self.total_steps is None else self.total_steps - 1)
            if end is not None
        ]
        if not ends:
            return None
        return min(ends) // self.update_interval * self.update_interval


class StructureRule:
    """Base of a method's structure rule; subclasses are dataclasses whose fields are its options."""

    #: whether the trained model loses whole channels that ``structured.compact`` slices out (the recipe
    #: then also writes the compacted checkpoint)
    compacts: ClassVar[bool] = False

    @property
    def shrinks(self) -> bool:
        """Whether the rule slices the channels it removes out of the live model (:meth:`shrink_cuts`)."""
        return False

    def bind(self, context: RuleContext) -> None:
        """Check the model and remember what the rule needs; called before the sparsifier changes
        anything (raise ``ValueError`` naming the layer for an architecture the rule cannot handle)."""

    def initial_mask(
        self, name: str, shape: tuple[int, ...], count: int, generator: torch.Generator
    ) -> torch.Tensor | None:
        """The layer's initial mask with ``count`` active weights, or ``None`` for a uniform random one."""
        return None

    def layer_plan(self, view: LayerView, rate: float, count: int) -> LayerPlan:
        """The plan for one layer at a topology update (``count``: its active weights now)."""
        from .topology import LayerPlan

        return LayerPlan()

    def after_step(self, step: int, params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
        """Called after every training step's re-masking, before a due topology update, with the sparse
        parameters. Returns ``{name: allowed}`` (bool, broadcastable to the weight) for the layers
        whose weights outside ``allowed`` must go now, or ``None``."""
        return None

    def last_update_step(self, total_steps: int | None) -> int | None:
        """The last step at which a topology update may run (``None``: no limit of the rule's own)."""
        return None

    def shrink_cuts(self, state: Mapping[str, Any] | None = None) -> Cuts | None:
        """What to slice out of the live model now — or, given a saved :meth:`state_dict`, what brings
        the model to the shapes it had when that state was saved — as :data:`~itop_timm.cuts.Cuts`; ``None``
        when nothing (the default: a rule that never shrinks the model). Changes nothing; raises
        ``ValueError`` for a state the model cannot be brought to."""
        return None

    def apply_shrink(self, cuts: Cuts) -> None:
        """Slice ``cuts`` (from :meth:`shrink_cuts`) out of the model's parameters and layers in place;
        the sparsifier slices the optimizer state and masks."""

    def stats(self) -> dict[str, Any]:
        """JSON-able figures for the update log (``last_update["structure"]``)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """What :meth:`load_state_dict` needs for an exact resume (tensors, numbers, lists, dicts)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output (validate before changing anything)."""


def check_rule_options(
    rule_cls: type[StructureRule] | None, method: str, options: Mapping[str, Any]
) -> dict[str, Any]:
    """``options`` validated against the rule's declared fields (normalised), or a ``ValueError``
    naming the method and the option; a method without a rule takes no options."""
    if rule_cls is None:
        if options:
            raise ValueError(
                f"method {method!r} takes no method_options, got {short_repr(sorted(options), 200)}"
            )
        return {}
    allowed = sorted(f.name for f in fields(rule_cls))
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(
            f"method {method!r} does not take option(s) {short_repr(unknown, 200)}; allowed: {allowed}"
        )
    return check_options(rule_cls, options, prefix=f"{method}: ")


def build_rule(
    rule_cls: type[StructureRule] | None, method: str, options: Mapping[str, Any]
) -> StructureRule | None:
    """The method's rule built from validated ``options`` (``None`` for an unstructured method)."""
    checked = check_rule_options(rule_cls, method, options)
    return None if rule_cls is None else rule_cls(**checked)


def describe_options(rule_cls: type[StructureRule]) -> dict[str, tuple[Any, str]]:
    """``{option: (default, help)}`` of a rule class (for ``itop-timm methods``)."""
    return {
        f.name: (f.default if f.default is not dataclasses.MISSING else None, f.metadata.get("help", ""))
        for f in fields(rule_cls)
    }


def checked_budget(budget: Any, shapes: Mapping[str, tuple[int, ...]], method: str) -> dict[str, int]:
    """A rule's saved weight budget (``{sparse tensor: active weights}``) checked against ``shapes``."""
    count = Range(int, 0)
    if (
        not isinstance(budget, Mapping)
        or set(budget) != set(shapes)
        or not all(count.contains(budget[n]) and budget[n] <= math.prod(shapes[n]) for n in shapes)
    ):
        raise ValueError(f"{method}: the saved weight budget does not match this model's sparse tensors")
    return {n: int(budget[n]) for n in shapes}
