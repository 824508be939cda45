"""Taking Accelerate's DistributedDataParallel wrapper off the model and putting a new one on.

A model that shrinks during training (Chase with ``shrink``) has its parameters sliced in place, which
a DDP reducer forbids: it holds the parameters and buckets sized for them. Between two optimizer steps
the loop takes the wrapper off (:func:`take_off_ddp`; once dropped, the wrapper and its reducer are
gone), lets the sparsifier slice, and wraps the smaller model anew (:func:`put_on_ddp`, made as
``accelerator.prepare`` makes it; its construction checks that every rank has the same shapes and
broadcasts rank 0's parameters and buffers, identical already). Accelerate keeps the module itself, not
its wrapper, among its prepared models (what ``save_state`` / ``load_state`` read), so nothing there
changes.
"""

from __future__ import annotations

from typing import Any

from torch import nn
from torch.nn.parallel import DistributedDataParallel

__all__ = ["take_off_ddp", "put_on_ddp"]


def take_off_ddp(accelerator: Any, model: DistributedDataParallel) -> nn.Module:
    """The module inside ``model``; once the caller drops its references to ``model``, nothing holds the
    parameters but the module, the optimizer and the last autograd graph."""
    if any(m is model for m in accelerator._models):
        raise RuntimeError(
            "this Accelerate version keeps the DistributedDataParallel wrapper among its prepared models, "
            "which then holds the parameters a shrink slices: Chase's shrink under DDP is not supported with it"
        )
    return model.module


def put_on_ddp(accelerator: Any, module: nn.Module) -> DistributedDataParallel:
    """``module`` in a new DistributedDataParallel wrapper, made as ``accelerator.prepare`` makes it (the
    DDP kwargs handler and its communication hook included)."""
    from accelerate.utils import DistributedType

    handler = accelerator.ddp_handler
    kwargs = handler.to_kwargs() if handler is not None else {}
    if accelerator.distributed_type != DistributedType.MULTI_CPU:
        index = accelerator.local_process_index
        kwargs |= {"device_ids": [index], "output_device": index}
    model = DistributedDataParallel(module, **kwargs)
    if handler is not None:
        handler.register_comm_hook(model)
    return model
