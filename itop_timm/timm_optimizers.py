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
become plain ``"sgd"``) and hands the optimizer class parameters, never the model. So :func:`install`
wraps ``create_optimizer`` of timm's ``default_registry`` once: names whose prefix is a registered
method (the longest one: ``noisy_rigl_sgd`` is ``noisy_rigl`` on ``sgd``) are built here; every other
name goes to timm unchanged. It also lists ``<method>_<base>`` for the bases in :data:`LISTED_BASES`
(``list_optimizers``, ``get_optimizer_info``), lazily: a method registered after ``import itop_timm``
(by a plugin, or :func:`itop_timm.register_method`) is listed from the next look-up on.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Iterator
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
    """``"rigl_sgd" -> ("rigl", "sgd")``: the longest registered method name followed by ``_`` and a
    base name (``"noisy_rigl_sgd" -> ("noisy_rigl", "sgd")`` once ``noisy_rigl`` is registered);
    ``None`` when no registered method prefixes ``opt``."""
    if not isinstance(opt, str):
        return None
    name = opt.lower()
    methods = [m for m in METHODS.names() if name.startswith(f"{m}_") and len(name) > len(m) + 1]
    if not methods:
        return None
    method = max(methods, key=len)
    return method, name[len(method) + 1 :]


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
    with _total_steps_hint(opt, sparse_kwargs):
        config = SparsityConfig.resolve(method, **sparse_kwargs)
    optimizer = (create_dense or _timm_create_optimizer())(model, base, *args, **kwargs)
    with _total_steps_hint(opt, sparse_kwargs):
        sparsifier = Sparsifier(model, optimizer, config, masks=masks)
    sparsifier.embed_in_optimizer_state()
    optimizer.sparsifier = sparsifier  # type: ignore[attr-defined]
    return optimizer


@contextlib.contextmanager
def _total_steps_hint(opt: str, sparse_kwargs: dict[str, Any]) -> Iterator[None]:
    """A missing ``total_steps`` error says how to pass it through timm (``--opt-kwargs`` in train.py)."""
    try:
        yield
    except ValueError as err:
        if "total_steps" not in str(err) or sparse_kwargs.get("total_steps") is not None:
            raise
        raise ValueError(
            f"{err}. Through timm pass it with the optimizer's arguments: create_optimizer_v2(model, {opt!r}, "
            "..., total_steps=N), in timm's train.py --opt-kwargs total_steps=N (N = epochs x optimizer "
            "updates per epoch; `itop-timm timm-train` derives it when not given)"
        ) from err


class _SparseOptimizerFactory:
    """``OptimInfo.opt_class`` of a listed sparse optimizer: call it with the model, not parameters."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.__name__ = name

    def __call__(self, model: nn.Module, **kwargs: Any) -> torch.optim.Optimizer:
        return create_sparse_optimizer(model, self.name, **kwargs)


def _unwrapped(method: Callable[..., Any]) -> Callable[..., Any]:
    return getattr(method, "__wrapped__", method)


def _route_create_optimizer(registry: Any) -> None:
    """``registry.create_optimizer`` builds sparse optimizer names here, every other name as before."""
    original = registry.create_optimizer

    @functools.wraps(original)
    def create_optimizer(model_or_params: Any, opt: str, *args: Any, **kwargs: Any) -> torch.optim.Optimizer:
        if parse_sparse_optimizer_name(opt) is None:
            return original(model_or_params, opt, *args, **kwargs)
        return create_sparse_optimizer(model_or_params, opt, *args, create_dense=original, **kwargs)

    registry.create_optimizer = create_optimizer


def _list_lazily(registry: Any, attr: str) -> None:
    """``registry.<attr>`` lists the sparse names of every method registered by then, first."""
    original = getattr(registry, attr)

    @functools.wraps(original)
    def listing(*args: Any, **kwargs: Any) -> Any:
        _register_sparse_names(registry)
        return original(*args, **kwargs)

    setattr(registry, attr, listing)


def _register_sparse_names(registry: Any) -> None:
    """``OptimInfo`` entries for ``<method>_<base>`` of every registered method not yet listed."""
    from timm.optim._optim_factory import OptimInfo

    listed = set(_unwrapped(registry.list_optimizers)())
    info_of = _unwrapped(registry.get_optimizer_info)
    for method in METHODS.names():
        for base in LISTED_BASES:
            name = f"{method}_{base}"
            if name in listed:
                continue
            base_info = info_of(base)
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


def install() -> None:
    """Register RMDA / ProxSGD and the sparse optimizer names with timm and route those names to
    :func:`create_sparse_optimizer` (idempotent; ``import itop_timm`` calls it once ``timm.optim`` is imported). Methods registered
    later get their names at timm's next ``list_optimizers`` / ``get_optimizer_info``."""
    try:
        from timm.optim import _optim_factory
        from timm.optim._optim_factory import OptimInfo
    except ImportError:  # pragma: no cover - timm layout changed
        _logger.warning("timm's optimizer registry not found; sparse optimizer names are unavailable")
        return
    registry = _optim_factory.default_registry
    if not getattr(registry.create_optimizer, "_itop_timm", False):
        _route_create_optimizer(registry)
        _list_lazily(registry, "list_optimizers")
        _list_lazily(registry, "get_optimizer_info")
        registry.create_optimizer._itop_timm = True  # type: ignore[attr-defined]
    listed = set(_unwrapped(registry.list_optimizers)())
    from .structured.rmda import RMDA, ProxSGD

    for name, cls, description in (
        ("rmda", RMDA, "RMDA: regularized modernized dual averaging (structured sparsity, Huang & Lee 2022)"),
        ("proxsgd", ProxSGD, "proximal SGD with momentum (group LASSO / L1 baseline for RMDA)"),
    ):
        if name not in listed:
            registry.register(
                OptimInfo(name=name, opt_class=cls, description=description, has_eps=False, has_momentum=True)
            )
    _register_sparse_names(registry)
