"""What a method is: :class:`MethodInfo` (two score functions, defaults, an optional structure rule),
registered by name (:func:`register_method`, :func:`get_method`)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Any

import torch

from ..config import SparsityConfig
from ..registry import METHODS
from ..structure import StructureRule
from ..topology import LayerView
from ..validation import Range, check_options

__all__ = ["MethodInfo", "ScoreFn", "register_method", "get_method"]

ScoreFn = Callable[[LayerView], torch.Tensor]

#: the settings a method may give defaults for: every field of SparsityConfig but the method itself
_DEFAULTABLE = tuple(f.name for f in fields(SparsityConfig) if f.name != "method")


@dataclass(frozen=True)
class MethodInfo:
    """A registered sparse-training method.

    Attributes:
        name: registry name (lower case).
        drop_score: ``score(layer) -> Tensor`` shaped like the weight; the ``k`` active weights with
            the lowest scores are dropped. ``None`` (with ``grow_score=None``) means a static mask.
        grow_score: ``score(layer) -> Tensor``; the ``k`` inactive positions with the highest scores grow.
        description: one line for ``list_methods`` / ``--help``.
        defaults: values for :func:`itop_timm.sparsify` keyword arguments the caller leaves unset
            (e.g. ``{"update_interval": 4000, "prune_schedule": "cosine"}``).
        grad_ema_beta: if set, the sparsifier keeps an EMA of dense gradients with this decay and
            passes it as ``LayerView.grad_ema``.
        needs_grad: the grow score reads the layer's gradient; a layer without one at an update
            (unused in the forward pass, frozen, ``zero_grad(set_to_none=True)`` before the step) is
            then left unchanged and reported in ``last_update["no_grad_layers"]``, instead of being
            regrown by tie-breaking.
        structure: a :class:`~itop_timm.structure.StructureRule` dataclass: which rows/channels may hold
            weights and how many each layer keeps (Chase, SRigL); its fields are the method's
            ``method_options``. ``None``: unstructured, no options.
    """

    name: str
    drop_score: ScoreFn | None
    grow_score: ScoreFn | None
    description: str = ""
    defaults: Mapping[str, Any] = field(default_factory=dict)
    grad_ema_beta: float | None = None
    needs_grad: bool = False
    structure: type | None = None

    def __post_init__(self) -> None:
        unknown = sorted(set(self.defaults) - set(_DEFAULTABLE))
        if unknown:
            raise ValueError(
                f"method {self.name!r}: unknown default(s) {unknown}; allowed: {list(_DEFAULTABLE)}"
            )
        defaults = check_options(SparsityConfig, self.defaults, prefix=f"method {self.name!r}: default ")
        if self.structure is not None and not (
            isinstance(self.structure, type) and issubclass(self.structure, StructureRule)
        ):
            raise ValueError(
                f"method {self.name!r}: structure must be a StructureRule subclass, got {self.structure!r}"
            )
        if (self.drop_score is None) != (self.grow_score is None):
            raise ValueError(
                f"method {self.name!r}: give both drop_score and grow_score, or neither (static)"
            )
        Range(float, 0, 1, high_open=True, optional=True).check(
            f"method {self.name!r}: grad_ema_beta", self.grad_ema_beta
        )
        object.__setattr__(self, "defaults", MappingProxyType(defaults))

    @property
    def dynamic(self) -> bool:
        """Whether the method changes the mask during training."""
        return self.grow_score is not None


def register_method(info: MethodInfo, *, overwrite: bool = False) -> MethodInfo:
    """Register a sparse-training method; afterwards ``sparsify(..., method=info.name)`` and the timm
    optimizer names ``<name>_sgd``, ``<name>_adamw``, ... use it."""
    if not isinstance(info, MethodInfo):
        raise TypeError(f"register_method expects a MethodInfo, got {type(info).__name__}")
    return METHODS.register(info.name, info, overwrite=overwrite)


def get_method(name: str | MethodInfo) -> MethodInfo:
    """The registered :class:`MethodInfo` for ``name`` (``ValueError`` listing the known ones if unknown)."""
    return name if isinstance(name, MethodInfo) else METHODS.get(name)
