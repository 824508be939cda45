"""The one validator of user-given masks (``sparsify(masks=...)``, sparsifier states, ``save_sparse``,
``compact``): names, tensors, shapes and 0/1 values, checked before anything is modified."""

from __future__ import annotations

from collections.abc import Mapping

import torch

__all__ = ["validate_masks"]


def _listed(names: list[str]) -> str:
    return f"{names[:5]}{'...' if len(names) > 5 else ''}"


def _fits(shape: tuple[int, ...], target: tuple[int, ...], broadcast: bool) -> bool:
    if not broadcast:
        return shape == target
    try:
        return tuple(torch.broadcast_shapes(shape, target)) == target
    except RuntimeError:
        return False


def validate_masks(
    masks: object,
    shapes: Mapping[str, tuple[int, ...]],
    *,
    what: str = "masks",
    complete: bool = True,
    broadcast: bool = False,
) -> dict[str, torch.Tensor]:
    """Check ``masks`` against the parameters they belong to; return them as bool tensors (same device).

    Args:
        masks: ``{parameter name: tensor}``; a tensor is bool or holds only 0/1 values.
        shapes: ``{parameter name: shape}`` of the parameters the masks may name.
        what: how error messages call the masks (``"masks"``, ``"ever_active"``, ...).
        complete: every name in ``shapes`` needs a mask (a sparsifier's state); otherwise a subset is fine.
        broadcast: a mask may have any shape that broadcasts to its parameter's (e.g. ``[rows, 1, 1, 1]``).

    Raises:
        ValueError: naming the first offending mask and what is allowed.
    """
    if not isinstance(masks, Mapping):
        raise ValueError(
            f"{what} must be a mapping of parameter name -> bool tensor, got {type(masks).__name__}"
        )
    unexpected = [n for n in masks if n not in shapes]
    missing = [n for n in shapes if n not in masks] if complete else []
    if unexpected and not complete:
        raise ValueError(f"{what} {_listed(unexpected)} name no parameter of the model")
    if missing or unexpected:
        raise ValueError(
            f"{what} do not fit the model's sparse tensors: missing {_listed(missing)}, "
            f"unexpected {_listed(unexpected)}"
        )
    out = {}
    for name, mask in masks.items():
        if not isinstance(mask, torch.Tensor):
            raise ValueError(f"{what}[{name!r}] must be a tensor, got {type(mask).__name__}")
        if not _fits(tuple(mask.shape), tuple(shapes[name]), broadcast):
            raise ValueError(
                f"{what}[{name!r}] has shape {tuple(mask.shape)}, but the parameter has shape {tuple(shapes[name])}"
            )
        if mask.dtype != torch.bool:
            if not bool(((mask == 0) | (mask == 1)).all()):
                raise ValueError(f"{what}[{name!r}] must be bool or hold only 0/1, found other values")
            mask = mask != 0
        out[name] = mask.detach()
    return out
