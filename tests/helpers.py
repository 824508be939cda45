"""Shared test helpers."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def train_steps(
    model,
    optimizer,
    steps: int,
    input_size=(3, 32, 32),
    batch: int = 4,
    num_classes: int = 10,
    seed: int = 0,
    on_step=None,
):
    """Run ``steps`` plain training steps on random data (a fixed generator, so runs are repeatable)."""
    g = torch.Generator().manual_seed(seed)
    model.train()
    for i in range(steps):
        x = torch.randn(batch, *input_size, generator=g)
        y = torch.randint(0, num_classes, (batch,), generator=g)
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        if on_step is not None:
            on_step(i + 1)
