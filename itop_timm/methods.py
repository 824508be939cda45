"""Sparse-training methods as pairs of score functions.

A topology update removes, per layer, the ``k`` active weights with the *lowest* drop score and then
activates the ``k`` inactive positions with the *highest* grow score (REFERENCE §1). A method is only
that pair plus a few defaults, registered by name:

=========  ===============  ===========================================================
method     drop score       grow score
=========  ===============  ===========================================================
static     (no updates)     (no updates)
set        ``|w|``          uniform random (SET)
rigl       ``|w|``          ``|dense gradient|`` of the last backward (RigL)
snfs       ``|w|``          ``|EMA of dense gradients|`` (sparse momentum, see note)
unfired    ``|w|``          random among never-active weights first (ITOP, maximises R_s)
=========  ===============  ===========================================================

Note on ``snfs``: the reference scores growth by the optimizer's momentum buffer, which is degenerate
once the optimizer state of inactive weights is zeroed every step. Here the sparsifier keeps its own
exponential moving average of the *dense* gradients (``grad_ema_beta``, default 0.9 like SGD momentum)
and grows by its magnitude. SNFS's cross-layer redistribution is not done: every layer keeps its
density, as in ITOP.

Third-party methods::

    from itop_timm import MethodInfo, register_method
    register_method(MethodInfo("grad_times_w", drop_score=lambda l: (l.weight * l.grad).abs(),
                               grow_score=lambda l: l.grad.abs(), defaults={"update_interval": 50},
                               needs_grad=True))
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch

from .registry import METHODS

__all__ = [
    "LayerView",
    "MethodInfo",
    "ScoreFn",
    "register_method",
    "get_method",
    "magnitude_score",
    "gradient_score",
    "grad_ema_score",
    "random_score",
    "unfired_score",
]


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


ScoreFn = Callable[[LayerView], torch.Tensor]


def magnitude_score(layer: LayerView) -> torch.Tensor:
    """``|w|``: drop the smallest weights."""
    return layer.weight.abs()


def gradient_score(layer: LayerView) -> torch.Tensor:
    """``|g|`` of the dense gradient (RigL growth)."""
    return layer.grad_or_zeros().abs()


def grad_ema_score(layer: LayerView) -> torch.Tensor:
    """``|EMA(g)|`` of dense gradients (SNFS-style momentum growth)."""
    if layer.grad_ema is None:
        raise RuntimeError("grad_ema_score needs a method with grad_ema_beta set")
    return layer.grad_ema.abs()


def random_score(layer: LayerView) -> torch.Tensor:
    """Uniform random scores (SET growth)."""
    return layer.uniform()


def unfired_score(layer: LayerView) -> torch.Tensor:
    """Random, but every never-active weight outranks every weight that was active before."""
    return layer.uniform() + (~layer.ever_active).to(torch.float32)


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
        if (self.drop_score is None) != (self.grow_score is None):
            raise ValueError(
                f"method {self.name!r}: give both drop_score and grow_score, or neither (static)"
            )
        if self.grad_ema_beta is not None and not (0.0 <= self.grad_ema_beta < 1.0):
            raise ValueError(
                f"method {self.name!r}: grad_ema_beta must be in [0, 1), got {self.grad_ema_beta!r}"
            )
        object.__setattr__(self, "defaults", MappingProxyType(dict(self.defaults)))

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


register_method(MethodInfo("static", None, None, "fixed random sparse mask (no topology updates)"))
register_method(MethodInfo("set", magnitude_score, random_score, "SET: drop smallest |w|, grow at random"))
register_method(
    MethodInfo(
        "rigl",
        magnitude_score,
        gradient_score,
        "RigL: drop smallest |w|, grow largest |dense grad|",
        needs_grad=True,
    )
)
register_method(
    MethodInfo(
        "snfs",
        magnitude_score,
        grad_ema_score,
        "sparse momentum: drop smallest |w|, grow largest |EMA of dense grads|",
        grad_ema_beta=0.9,
        needs_grad=True,
    )
)
register_method(
    MethodInfo(
        "unfired",
        magnitude_score,
        unfired_score,
        "ITOP: drop smallest |w|, grow never-active weights at random",
    )
)
