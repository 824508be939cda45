"""Channel importance from sparse-training masks, for torch-pruning's own pruners.

>>> imp = MaskImportance(sparsifier.masks, mode="density")
>>> pruner = tp.pruner.MetaPruner(model, x, importance=imp, pruning_ratio=0.5,
...                               ignored_layers=[model.get_classifier()])
>>> pruner.step()

A channel whose slices the masks have emptied scores lowest and is pruned first.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch_pruning as tp

from .dependency import group_item_slices, per_position

__all__ = ["MaskImportance"]

_MODES = ("density", "norm")


class MaskImportance(tp.importance.Importance):
    """Score each channel of a torch-pruning ``Group`` by what the masks leave of it (higher = keep).

    Args:
        masks: ``{parameter name: bool mask}`` (e.g. ``Sparsifier.masks``); parameters without a mask
            count their nonzero values as active.
        mode: ``"density"``: active entries / all entries over every slice of the channel (all coupled
            layers: filters, BatchNorm affine parameters, the next layers' input slices); ``"norm"``: the
            L2 norm of the channel's slices with masked-out weights counted as zero.

    The masks must have the current parameter shapes: for iterative pruning (``iterative_steps > 1``)
    they are not sliced along; use one step, or re-create the importance with sliced masks.
    """

    def __init__(self, masks: Mapping[str, torch.Tensor] | None = None, mode: str = "density") -> None:
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
        masks = dict(masks or {})
        for name, mask in masks.items():
            if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
                raise ValueError(f"mask {name!r} must be a bool tensor")
        self.masks = masks
        self.mode = mode

    def _mask(self, name: str, p: torch.Tensor) -> torch.Tensor | None:
        mask = self.masks.get(name)
        if mask is None:
            return None
        if tuple(mask.shape) != tuple(p.shape):
            raise ValueError(
                f"mask {name!r} has shape {tuple(mask.shape)}, the parameter now has {tuple(p.shape)} "
                "(masks are not sliced between pruning steps)"
            )
        return mask.to(p.device)

    @torch.no_grad()
    def __call__(self, group: Any) -> torch.Tensor | None:
        """One score per root index of ``group`` (``group[0].root_idxs``), or ``None`` when the group
        touches no parameter."""
        graph = group._DG
        params = dict(graph.model.named_parameters())
        param_names = {id(p): n for n, p in params.items()}
        position = {int(r): k for k, r in enumerate(group[0].root_idxs)}
        n = len(position)
        num = torch.zeros(n, dtype=torch.float64)
        den = torch.zeros(n, dtype=torch.float64)
        found = False
        for item in group:
            slices, _ = group_item_slices(graph, item, param_names)
            for s in slices:
                keep = [k for k, c in enumerate(s.channel.tolist()) if c in position]
                if not keep:
                    continue
                found = True
                p = params[s.param_name].detach()
                mask = self._mask(s.param_name, p)
                if self.mode == "density":
                    active = mask if mask is not None else p != 0
                    values_per_position = per_position(active, s.dim)
                    total = float(p.numel() // p.shape[s.dim])
                else:
                    w = p.float() * mask if mask is not None else p.float()
                    values_per_position = per_position(w.pow(2), s.dim)
                    total = 0.0
                sel = torch.tensor(keep, dtype=torch.long)
                target = torch.tensor([position[int(c)] for c in s.channel[sel].tolist()], dtype=torch.long)
                values = values_per_position.cpu().double()[s.index[sel]]
                num.index_add_(0, target, values)
                den.index_add_(0, target, torch.full_like(values, total))
        if not found:
            return None
        scores = num / den.clamp_min(1.0) if self.mode == "density" else num.sqrt()
        return scores.float()
