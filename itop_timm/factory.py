"""``sparsify``: the one factory of a :class:`~itop_timm.Sparsifier`, in the style of timm's ``create_*``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .config import SparsityConfig
from .sparsifier import Sparsifier

__all__ = ["sparsify"]


def sparsify(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    config: SparsityConfig | None = None,
    *,
    masks: Mapping[str, torch.Tensor] | None = None,
    compile_hook: bool = False,
    defer_shrink: bool = False,
    **settings: Any,
) -> Sparsifier:
    """Train ``model`` sparse: draw masks, zero inactive weights and hook ``optimizer.step``.

    Args:
        model: any ``nn.Module`` (a timm model, possibly wrapped by DDP / ``torch.compile``).
        optimizer: the optimizer over ``model``'s parameters (torch, timm or Accelerate-wrapped).
        config: a :class:`SparsityConfig`; or give its fields as keyword ``settings`` instead
            (``method``, ``density``, ``distribution``, ``update_interval``, ``prune_rate``,
            ``final_prune_rate``, ``prune_schedule``, ``total_steps``, ``stop_step``, ``seed``,
            ``include``, ``exclude``, ``method_options``): each field's meaning and default are on
            :class:`SparsityConfig` (``itop-timm methods`` lists each method's defaults and options).
            Unset fields take the method's defaults, then :data:`SPARSIFY_DEFAULTS`.
        masks: start from these masks (``{name: bool tensor}``, e.g. from ``load_sparse``) instead of
            random ones; their densities are kept.
        compile_hook: re-mask through a ``torch.compile``-d kernel per layer that reads each bool mask
            once for the weight and all its optimizer state (the cheapest hook on the CPU; costs one
            compilation of tens of seconds at the start, so it pays off on long runs). Off: one
            ``torch._foreach_mul_`` with masks cached in the tensors' dtype.
        defer_shrink: for a method that shrinks the live model (Chase with ``shrink``): slice removed
            channels out only when you call :meth:`Sparsifier.shrink` (see :attr:`Sparsifier.shrink_pending`)
            instead of inside the optimizer step that removes them; needed where something else holds the
            parameters during the step, e.g. a DistributedDataParallel wrapper, which you take off around
            ``shrink()`` and put back on (the recipe does).

    Every argument is validated before the model or optimizer is touched; bad values raise ``ValueError``
    naming the value and what is allowed.
    """
    if config is not None and not isinstance(config, SparsityConfig):
        hint = f" (a method name is given as method={config!r})" if isinstance(config, str) else ""
        raise ValueError(f"config must be a SparsityConfig or None, got {type(config).__name__}{hint}")
    if config is not None and settings:
        raise ValueError(f"give either config or settings, not both (got config and {sorted(settings)})")
    config = config if config is not None else SparsityConfig.resolve(**settings)
    return Sparsifier(
        model, optimizer, config, masks=masks, compile_hook=compile_hook, defer_shrink=defer_shrink
    )
