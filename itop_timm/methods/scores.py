"""The score functions methods are made of: ``score(layer) -> Tensor`` shaped like the weight."""

from __future__ import annotations

import torch

from ..topology import LayerView

__all__ = ["magnitude_score", "gradient_score", "grad_ema_score", "random_score", "unfired_score"]


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
