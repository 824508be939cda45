"""The per-tensor state of a sparse run: masks, union masks (R_s) and gradient EMAs.

:class:`MaskState` holds one bool mask, one union mask (every weight ever active) and, for methods that
grow by an EMA of gradients, one float32 EMA per sparse tensor, each on its parameter's device and,
for a sharded parameter (FSDP2), a DTensor sharded like it. It is where masks are written
(:meth:`~MaskState.store`, :meth:`~MaskState.restrict`: the union follows), counted without a
collective on the read path (:meth:`~MaskState.totals`), and saved / validated / restored as full
CPU tensors (:meth:`~MaskState.state_dict`, :meth:`~MaskState.check_state`, :meth:`~MaskState.load`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from .cuts import Cuts, slice_like
from .distributed import broadcast_masks, full_tensor, global_counts, local, shard_like
from .masks import validate_masks

__all__ = ["MaskState", "CheckedState", "random_mask"]


class CheckedState(NamedTuple):
    """A validated saved state (full CPU tensors), ready for :meth:`MaskState.load`."""

    masks: dict[str, torch.Tensor]
    ever_active: dict[str, torch.Tensor]
    grad_ema: dict[str, torch.Tensor] | None
    shrunk: tuple[int, int]


def random_mask(shape: tuple[int, ...], count: int, generator: torch.Generator) -> torch.Tensor:
    """A bool mask of ``shape`` with ``count`` active positions drawn uniformly from ``generator``."""
    numel = math.prod(shape)
    mask = torch.zeros(numel, dtype=torch.bool)
    mask[torch.randperm(numel, generator=generator)[:count]] = True
    return mask.view(shape)


def _full_cpu(t: torch.Tensor) -> torch.Tensor:
    """A whole CPU copy of ``t`` (gathered if sharded)."""
    return full_tensor(t.detach()).cpu().clone()


class MaskState:
    """Masks, union masks and gradient EMAs of the sparse parameters ``params``."""

    def __init__(
        self, params: Mapping[str, nn.Parameter], initial: Mapping[str, torch.Tensor], grad_ema: bool
    ) -> None:
        self.params = params
        masks = [initial[name].to(p.device) for name, p in params.items()]
        broadcast_masks(masks)  # rank 0's masks everywhere
        self.masks: dict[str, torch.Tensor] = {
            name: shard_like(m, p) for (name, p), m in zip(params.items(), masks, strict=True)
        }
        self.ever_active: dict[str, torch.Tensor] = {name: m.clone() for name, m in self.masks.items()}
        self.grad_ema: dict[str, torch.Tensor] | None = (
            {name: torch.zeros_like(p, dtype=torch.float32) for name, p in params.items()}
            if grad_ema
            else None
        )
        self.sharded = any(isinstance(m, DTensor) for m in self.masks.values())
        #: weights sliced out of the model by :meth:`shrink`, and how many of them were ever active: they
        #: still count in N and in the union, so density and R_s mean what they mean without a shrink
        self.shrunk = (0, 0)
        self._counted = (0, 0)
        self.recount()

    @property
    def num_weights(self) -> int:
        """N: number of weights in all sparse tensors (those sliced out by a shrink included)."""
        return sum(m.numel() for m in self.masks.values()) + self.shrunk[0]

    def follow_devices(self) -> None:
        """Move masks (and union/EMA) to their parameter's device, e.g. after ``accelerator.prepare``."""
        for name, p in self.params.items():
            if self.masks[name].device != p.device:
                self.masks[name] = self.masks[name].to(p.device)
                self.ever_active[name] = self.ever_active[name].to(p.device)
                if self.grad_ema is not None:
                    self.grad_ema[name] = self.grad_ema[name].to(p.device)

    # ------------------------------------------------------------ writing
    def store(self, name: str, full_mask: torch.Tensor) -> None:
        """Write a layer's new full mask into its (possibly sharded) mask and add it to the union."""
        mask = self.masks[name]
        if full_mask is not mask:
            local(mask).copy_(local(shard_like(full_mask, mask)))
        local(self.ever_active[name]).logical_or_(local(mask))

    @torch.no_grad()
    def restrict(self, allowed: Mapping[str, torch.Tensor]) -> dict[str, int]:
        """Deactivate the active weights outside ``allowed`` (validated first); returns how many per layer.
        Rank 0's new masks are broadcast (one collective); every rank must call it."""
        shapes = {name: tuple(p.shape) for name, p in self.params.items()}
        allowed = validate_masks(allowed, shapes, what="allowed", complete=False, broadcast=True)
        self.follow_devices()
        new: dict[str, torch.Tensor] = {}
        for name, positions in allowed.items():
            mask = full_tensor(self.masks[name])
            new[name] = mask & positions.to(mask.device).expand(mask.shape)
        broadcast_masks(list(new.values()))
        removed = {name: int((full_tensor(self.masks[name]) & ~m).sum()) for name, m in new.items()}
        for name, mask in new.items():
            self.store(name, mask)
        return removed

    @torch.no_grad()
    def shrink(self, cuts: Cuts) -> None:
        """Slice the masks, union masks and EMAs of the parameters in ``cuts`` like the parameters were (a
        structure rule's live shrink; the sliced positions must be inactive already)."""
        if self.sharded:
            raise ValueError("shrink: sharded (FSDP) masks cannot be sliced")
        removed, removed_union = self.shrunk
        for name, param_cuts in cuts.items():
            if name not in self.masks:
                continue
            mask, union = (
                slice_like(self.masks[name], param_cuts),
                slice_like(self.ever_active[name], param_cuts),
            )
            if int(mask.sum()) != int(self.masks[name].sum()):
                raise RuntimeError(f"shrink: active weights of {name} were sliced out (restrict them first)")
            removed += self.masks[name].numel() - mask.numel()
            removed_union += int(self.ever_active[name].sum()) - int(union.sum())
            self.masks[name], self.ever_active[name] = mask, union
            if self.grad_ema is not None:
                self.grad_ema[name] = slice_like(self.grad_ema[name], param_cuts)
        self.shrunk = (removed, removed_union)
        self.recount()

    @torch.no_grad()
    def update_grad_ema(self, beta: float) -> None:
        """``ema ← beta·ema + (1 − beta)·grad`` for every parameter with a gradient (local shards)."""
        emas, grads = [], []
        for name, p in self.params.items():
            if p.grad is not None:
                emas.append(local(self.grad_ema[name]))
                grads.append(local(p.grad).to(torch.float32))
        if emas:
            torch._foreach_lerp_(emas, grads, 1.0 - float(beta))

    # ----------------------------------------------------------- counting
    def recount(self) -> tuple[int, int]:
        """Count (active, ever active) weights now (for sharded masks a collective: called at the mask
        changes every rank passes together, so :meth:`totals` never is one)."""
        self._counted = (
            sum(global_counts(list(self.masks.values()))),
            sum(global_counts(list(self.ever_active.values()))) + self.shrunk[1],
        )
        return self._counted

    def totals(self) -> tuple[int, int]:
        """(active, ever active) weights: counted now (one host sync), or for sharded masks as counted at
        the last mask change, so reading them on one rank never waits for the others."""
        if not self.sharded:
            self.recount()
        return self._counted

    def fractions(self, masks: Mapping[str, torch.Tensor]) -> dict[str, float]:
        """Fraction of ``True`` values of every (full) mask of ``masks`` (sharded: a collective)."""
        counts = global_counts(list(masks.values()))
        return {name: c / m.numel() for (name, m), c in zip(masks.items(), counts, strict=True)}

    # ---------------------------------------------------------- state dict
    def state_dict(self) -> dict[str, Any]:
        """Full CPU copies of masks, union and EMAs (a sharded state gathers: every rank must call it)."""
        state: dict[str, Any] = {
            "masks": {name: _full_cpu(m) for name, m in self.masks.items()},
            "ever_active": {name: _full_cpu(m) for name, m in self.ever_active.items()},
        }
        if self.grad_ema is not None:
            state["grad_ema"] = {name: _full_cpu(t) for name, t in self.grad_ema.items()}
        if self.shrunk != (0, 0):
            state["shrunk"] = list(self.shrunk)
        return state

    def check_state(
        self, state: Mapping[str, Any], method: str, shapes: Mapping[str, tuple[int, ...]] | None = None
    ) -> CheckedState:
        """Validate a saved :meth:`state_dict` against these parameters (or the ``shapes`` they will have
        after a shrink the state records); changes nothing."""
        shapes = shapes or {name: tuple(p.shape) for name, p in self.params.items()}
        masks = validate_masks(state.get("masks"), shapes, what="masks")
        union = validate_masks(state.get("ever_active"), shapes, what="ever_active")
        uncovered = [name for name in shapes if bool((masks[name] & ~union[name]).any())]
        if uncovered:
            raise ValueError(f"ever_active must contain the masks; not so for {uncovered[:3]}")
        ema = state.get("grad_ema")
        if self.grad_ema is not None and (
            not isinstance(ema, Mapping)
            or set(ema) != set(shapes)
            or any(not isinstance(ema[n], torch.Tensor) or tuple(ema[n].shape) != shapes[n] for n in shapes)
        ):
            raise ValueError(f"method {method!r} needs grad_ema for every sparse tensor in the state")
        shrunk = state.get("shrunk", [0, 0])
        if (
            not isinstance(shrunk, (list, tuple))
            or len(shrunk) != 2
            or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shrunk)
            or shrunk[1] > shrunk[0]
        ):
            raise ValueError(f"shrunk must be [weights sliced out, of them ever active], got {shrunk!r}")
        return CheckedState(masks, union, ema if self.grad_ema is not None else None, (shrunk[0], shrunk[1]))

    def load(self, checked: CheckedState) -> None:
        """Restore a validated state (sharded here like the parameters)."""
        for name, p in self.params.items():
            self.masks[name] = shard_like(checked.masks[name], p)
            self.ever_active[name] = shard_like(checked.ever_active[name], p)
            if self.grad_ema is not None:
                self.grad_ema[name] = shard_like(checked.grad_ema[name].to(torch.float32), p)
        self.shrunk = checked.shrunk
        self.recount()
