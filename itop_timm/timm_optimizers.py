"""Sparse optimizers in timm's own optimizer registry.

After ``import itop_timm``::

    optimizer = timm.optim.create_optimizer_v2(
        model, "rigl_sgd", lr=0.1, weight_decay=5e-4, density=0.1, total_steps=10_000, update_interval=100)
    optimizer.sparsifier.itop_rate   # the attached Sparsifier

An optimizer name ``<method>_<base>`` means: build timm's optimizer ``<base>`` (``sgd``, ``adamw``,
``lamb``, ``lion``, ..., any name timm knows) exactly as ``create_optimizer_v2`` would, then
:func:`itop_timm.sparsify` the model with ``<method>`` (``set``, ``rigl``, ``snfs``, ``unfired``,
``static``, or any registered method). Sparse settings are passed as extra keyword arguments next
to the optimizer's — ``density``, ``distribution``, ``update_interval``, ``prune_rate``,
``final_prune_rate``, ``prune_schedule``, ``total_steps``, ``stop_step``, ``seed``, ``include``,
``exclude``, ``masks`` — and are taken out before the base optimizer is built; in timm's ``train.py``
they go through ``--opt-kwargs density=0.1 total_steps=...``. The sparsifier's state rides inside
``optimizer.state_dict()``, so timm's checkpoints resume masks, R_s and RNG.

timm resolves an optimizer name by its last ``_``-separated part (``"rigl_sgd"`` would silently
become plain ``"sgd"``) and hands the optimizer class parameters, never the model. So besides adding
``OptimInfo`` entries (for ``list_optimizers``), this module wraps ``create_optimizer`` of timm's
``default_registry`` once: names whose prefix is a registered method are built here; every other
name goes to timm unchanged.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import fields
from typing import Any

import torch
from torch import nn

from .registry import METHODS
from .sparsifier import Sparsifier, SparsityConfig

__all__ = ["create_sparse_optimizer", "parse_sparse_optimizer_name", "SPARSE_OPTIMIZER_KWARGS", "install"]

_logger = logging.getLogger(__name__)

#: Keyword arguments of a sparse optimizer that configure the sparsifier rather than the optimizer.
SPARSE_OPTIMIZER_KWARGS = frozenset({f.name for f in fields(SparsityConfig)} - {"method"} | {"masks"})

#: Sparse optimizer names listed in timm's registry (any ``<method>_<timm optimizer>`` works).
LISTED_BASES = ("sgd", "momentum", "adamw", "lamb", "lion")


def parse_sparse_optimizer_name(opt: str) -> tuple[str, str] | None:
    """``"rigl_sgd" -> ("rigl", "sgd")``; ``None`` when the prefix is not a registered method."""
    if not isinstance(opt, str):
        return None
    method, sep, base = opt.lower().partition("_")
    if not sep or not base or method not in METHODS:
        return None
    return method, base


def _timm_create_optimizer() -> Callable[..., torch.optim.Optimizer]:
    from timm.optim import _optim_factory

    create = _optim_factory.default_registry.create_optimizer
    return getattr(create, "__wrapped__", create)


def create_sparse_optimizer(
    model: nn.Module,
    opt: str,
    *args: Any,
    create_dense: Callable[..., torch.optim.Optimizer] | None = None,
    **kwargs: Any,
) -> torch.optim.Optimizer:
    """Build timm's optimizer for the base name and sparsify ``model`` with the method named by the prefix.

    Returns the base optimizer with the :class:`~itop_timm.Sparsifier` attached as ``.sparsifier``.
    """
    parsed = parse_sparse_optimizer_name(opt)
    if parsed is None:
        raise ValueError(
            f"{opt!r} is not a sparse optimizer name: use <method>_<optimizer> with a method in {METHODS.names()}"
        )
    method, base = parsed
    if not isinstance(model, nn.Module):
        raise ValueError(
            f"sparse optimizer {opt!r} needs the model to find its conv/linear weights: "
            f"call create_optimizer_v2(model, {opt!r}, ...) with the nn.Module, not its parameters"
        )
    from timm.optim import get_optimizer_info

    get_optimizer_info(base.split("_")[-1])  # unknown base optimizer -> ValueError before any work
    sparse_kwargs = {key: kwargs.pop(key) for key in list(kwargs) if key in SPARSE_OPTIMIZER_KWARGS}
    masks = sparse_kwargs.pop("masks", None)
    config = SparsityConfig.resolve(method, **sparse_kwargs)
    optimizer = (create_dense or _timm_create_optimizer())(model, base, *args, **kwargs)
    sparsifier = Sparsifier(model, optimizer, config, masks=masks)
    sparsifier.embed_in_optimizer_state()
    optimizer.sparsifier = sparsifier  # type: ignore[attr-defined]
    return optimizer


class _SparseOptimizerFactory:
    """``OptimInfo.opt_class`` of a listed sparse optimizer: call it with the model, not parameters."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.__name__ = name

    def __call__(self, model: nn.Module, **kwargs: Any) -> torch.optim.Optimizer:
        return create_sparse_optimizer(model, self.name, **kwargs)


def install() -> None:
    """Register the sparse optimizer names with timm and route them to :func:`create_sparse_optimizer`
    (idempotent; called on ``import itop_timm``)."""
    try:
        from timm.optim import _optim_factory
        from timm.optim._optim_factory import OptimInfo
    except ImportError:  # pragma: no cover - timm layout changed
        _logger.warning("timm's optimizer registry not found; sparse optimizer names are unavailable")
        return
    registry = _optim_factory.default_registry
    original = registry.create_optimizer
    if not getattr(original, "_itop_timm", False):

        @functools.wraps(original)
        def create_optimizer(
            model_or_params: Any, opt: str, *args: Any, **kwargs: Any
        ) -> torch.optim.Optimizer:
            if parse_sparse_optimizer_name(opt) is None:
                return original(model_or_params, opt, *args, **kwargs)
            return create_sparse_optimizer(model_or_params, opt, *args, create_dense=original, **kwargs)

        create_optimizer._itop_timm = True  # type: ignore[attr-defined]
        registry.create_optimizer = create_optimizer
    listed = set(registry.list_optimizers())
    from .structured.rmda import RMDA, ProxSGD

    for name, cls, description in (
        ("rmda", RMDA, "RMDA: regularized modernized dual averaging (structured sparsity, Huang & Lee 2022)"),
        ("proxsgd", ProxSGD, "proximal SGD with momentum (group LASSO / L1 baseline for RMDA)"),
    ):
        if name not in listed:
            registry.register(
                OptimInfo(name=name, opt_class=cls, description=description, has_eps=False, has_momentum=True)
            )
    for method in METHODS.names():
        for base in LISTED_BASES:
            name = f"{method}_{base}"
            if name not in listed:
                base_info = registry.get_optimizer_info(base)
                registry.register(
                    OptimInfo(
                        name=name,
                        opt_class=_SparseOptimizerFactory(name),
                        description=f"itop_timm {method} sparse training on timm '{base}'",
                        has_eps=base_info.has_eps,
                        has_momentum=base_info.has_momentum,
                        has_betas=base_info.has_betas,
                        num_betas=base_info.num_betas,
                    )
                )
