"""Keeping masks applied: inactive weights and their optimizer state stay exactly 0, cheaply.

:class:`MaskApplier` is the per-step work of a :class:`~itop_timm.Sparsifier`, its fast paths in one
place:

* :meth:`~MaskApplier.apply` re-masks every sparse weight and every optimizer-state tensor shaped
  like it (SGD momentum, Adam moments, Lion/LAMB state, ...): one ``torch._foreach_mul_`` with each
  mask cached in the tensor's dtype (layers whose mask is all true are skipped), or one
  ``torch.compile``-d kernel per layer that reads each bool mask once;
* :meth:`~MaskApplier.mask_gradients` is the cheaper pre-step path for the elementwise optimizers in
  :data:`GRADIENT_MASKED_OPTIMIZERS`: zeroing the gradients' inactive positions keeps an inactive
  weight and its state at 0 by itself, as long as the masks are those last applied
  (:meth:`~MaskApplier.unchanged`, by tensor identity and version counter: no reduction).

Sharded parameters (FSDP2) are masked shard by shard: no communication on this path.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .distributed import local

__all__ = ["MaskApplier", "GRADIENT_MASKED_OPTIMIZERS"]

#: Optimizers (these exact classes, not subclasses) whose step is elementwise with no reduction over a
#: tensor, and leaves a weight at exactly 0 with its state at 0 when gradient, weight and state are 0 —
#: so masking the gradients before the step keeps inactive weights and state at 0 by itself, and
#: active weights get bit-for-bit the updates the post-step re-masking gives. Any other optimizer (LAMB's
#: trust ratio and cautious variants reduce over the tensor; others keep state that moves at 0) is
#: re-masked after every step.
GRADIENT_MASKED_OPTIMIZERS: tuple[type[torch.optim.Optimizer], ...] = (
    torch.optim.SGD,
    torch.optim.Adam,
    torch.optim.AdamW,
    torch.optim.NAdam,
    torch.optim.RAdam,
    torch.optim.RMSprop,
)


class MaskApplier:
    """Applies a sparsifier's masks to its parameters, their optimizer state and their gradients."""

    def __init__(
        self, params: Mapping[str, nn.Parameter], optimizer: torch.optim.Optimizer, compiled: bool = False
    ) -> None:
        self.params = params
        self.optimizer = optimizer
        self.compiled = compiled
        # per (name, dtype): (the mask it was made from, its version, the mask as that dtype or None)
        self._factors: dict[tuple[str, torch.dtype], tuple[torch.Tensor, int, torch.Tensor | None]] = {}
        self._applied: dict[str, tuple[torch.Tensor, int]] | None = None  # masks as last applied

    def _factor(self, name: str, mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
        """``mask`` as a ``dtype`` tensor to multiply by, or ``None`` when it is all true; cached until the
        mask is replaced or changed in place (its version counter moves)."""
        mask = local(mask)  # sharded: this rank's shard (a topology update writes into it)
        cached = self._factors.get((name, dtype))
        if cached is None or cached[0] is not mask or cached[1] != mask._version:
            factor = None if bool(mask.all()) else mask.to(dtype)
            cached = self._factors[(name, dtype)] = (mask, mask._version, factor)
        return cached[2]

    def _state_tensors(self, p: nn.Parameter) -> list[torch.Tensor]:
        state = self.optimizer.state.get(p, {}).values()
        return [v for v in state if isinstance(v, torch.Tensor) and v.shape == p.shape]

    @torch.no_grad()
    def apply(self, masks: Mapping[str, torch.Tensor]) -> None:
        """Zero inactive weights and the optimizer state at those positions (local shards only)."""
        self._applied = {name: (local(m), local(m)._version) for name, m in masks.items()}
        if self.compiled:
            groups = [
                (local(masks[name]), [local(t) for t in (p, *self._state_tensors(p))])
                for name, p in self.params.items()
                if self._factor(name, masks[name], torch.bool) is not None  # all true: nothing to zero
            ]
            if groups:
                _compiled_zero_off_mask()(groups)
            return
        tensors: list[torch.Tensor] = []
        factors: list[torch.Tensor] = []
        for name, p in self.params.items():
            for value in (p, *self._state_tensors(p)):
                factor = self._factor(name, masks[name], value.dtype)
                if factor is not None:
                    tensors.append(local(value))
                    factors.append(factor)
        if tensors:
            torch._foreach_mul_(tensors, factors)

    @torch.no_grad()
    def mask_gradients(self, masks: Mapping[str, torch.Tensor]) -> None:
        """Zero the gradients' inactive positions (one ``torch._foreach_mul_``)."""
        grads: list[torch.Tensor] = []
        factors: list[torch.Tensor] = []
        for name, p in self.params.items():
            if p.grad is not None:
                factor = self._factor(name, masks[name], p.grad.dtype)
                if factor is not None:
                    grads.append(local(p.grad))
                    factors.append(factor)
        if grads:
            torch._foreach_mul_(grads, factors)

    def unchanged(self, masks: Mapping[str, torch.Tensor]) -> bool:
        """Whether every mask is still the one (same tensor, same version) :meth:`apply` last applied."""
        applied = self._applied
        if applied is None:
            return False
        for name, m in masks.items():
            mask = local(m)
            if applied[name][0] is not mask or applied[name][1] != mask._version:
                return False
        return True

    def forget(self) -> None:
        """Weights may have moved unmasked (e.g. optimizer steps while paused): the next step re-masks."""
        self._applied = None


def _zero_off_mask(groups: list[tuple[torch.Tensor, list[torch.Tensor]]]) -> None:
    """In place, for each (bool mask, tensors): every tensor becomes ``where(mask, tensor, 0)``."""
    for mask, tensors in groups:
        for t in tensors:
            t.copy_(torch.where(mask, t, 0.0))


@functools.cache
def _compiled_zero_off_mask() -> Any:
    return torch.compile(_zero_off_mask, dynamic=False)
