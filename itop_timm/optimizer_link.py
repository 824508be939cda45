"""How a sparsifier rides on the optimizer it hooks: one sparsifier per optimizer, and its state kept
inside ``optimizer.state_dict()`` for loops that checkpoint only the optimizer (timm's ``train.py``)."""

from __future__ import annotations

import weakref
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch.utils.hooks import RemovableHandle

__all__ = ["mark_owner", "check_can_hook", "embed_state"]

_OWNER_ATTR = "_itop_timm_sparsifier"


def mark_owner(optimizer: torch.optim.Optimizer, sparsifier: Any) -> None:
    """Record (weakly: no reference cycle, not pickled by ``Optimizer.__getstate__``) which sparsifier
    hooks ``optimizer``; ``None`` clears the record. The optimizer's id is kept too, so a
    ``copy.deepcopy`` of it does not count as sparsified."""
    record = None if sparsifier is None else (weakref.ref(sparsifier), id(optimizer))
    setattr(optimizer, _OWNER_ATTR, record)


def check_can_hook(optimizer: torch.optim.Optimizer, params: Mapping[str, torch.nn.Parameter]) -> None:
    """Refuse, before anything changes, an optimizer that does not optimize every sparse tensor in
    ``params``, or that a live sparsifier already hooks (a second mask hook would multiply densities)."""
    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    missing = [name for name, p in params.items() if id(p) not in optimized]
    if missing:
        raise ValueError(
            f"{len(missing)} sparse tensor(s) are not optimized by the optimizer (first: {missing[:3]}); "
            "create the optimizer over the model's parameters, or exclude them"
        )
    record = getattr(optimizer, _OWNER_ATTR, None)
    owner = record[0]() if record is not None and record[1] == id(optimizer) else None
    if owner is not None and owner.hooked:
        raise ValueError(
            f"this optimizer is already sparsified ({owner!r}); a second sparsify would stack another "
            "mask hook: keep using the first Sparsifier, or call its .remove() first"
        )


def embed_state(
    optimizer: torch.optim.Optimizer,
    state_dict: Callable[[], dict[str, Any]],
    load_state_dict: Callable[[Mapping[str, Any]], None],
) -> list[RemovableHandle]:
    """Add ``state_dict()`` to ``optimizer.state_dict()`` under ``"itop_timm"`` and hand it back to
    ``load_state_dict`` from ``optimizer.load_state_dict``; returns the two hook handles."""

    def add_state(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> dict[str, Any]:
        state["itop_timm"] = state_dict()
        return state

    def take_state(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> dict[str, Any]:
        state = dict(state)
        embedded = state.pop("itop_timm", None)
        if embedded is not None:
            load_state_dict(embedded)
        return state

    return [
        optimizer.register_state_dict_post_hook(add_state),
        optimizer.register_load_state_dict_pre_hook(take_state),
    ]
