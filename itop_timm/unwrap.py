"""Reach the model and optimizer that really compute and step, under the wrappers training adds."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["unwrap_model", "unwrap_optimizer"]


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip DDP / DataParallel / FSDP-style ``.module`` wrappers and ``torch.compile``'s ``_orig_mod``."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def unwrap_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """Strip Accelerate's ``AcceleratedOptimizer`` so hooks sit on the optimizer that really steps."""
    from accelerate.optimizer import AcceleratedOptimizer

    while isinstance(optimizer, AcceleratedOptimizer):
        optimizer = optimizer.optimizer
    return optimizer
