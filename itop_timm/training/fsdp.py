"""The recipe's FSDP2 set-up (``train.fsdp: true``): Accelerate's FSDP plugin, version 2, wrapping
timm's blocks.

Every timm block (``blocks.N`` of ViTs / ConvNeXt / EfficientNet stages, ``layerN.M`` of ResNets) becomes
its own ``fully_shard`` unit, then the root; parameters are DTensors sharded over all ranks, and the
sparsifier keeps its masks sharded like them (see :mod:`itop_timm.distributed`).

Checkpoints use ``FULL_STATE_DICT``: model and optimizer states are gathered to rank 0 and saved by
Accelerate as in a DDP run (loaded back with ``weights_only=True``), and the sparsifier's full masks go
to ``itop_timm_state.safetensors``. ``torch.distributed.checkpoint`` (sharded files) would save memory
on very large models, but its metadata is a pickle, which this project never loads from a checkpoint.
"""

from __future__ import annotations

import re
from typing import Any

from torch import nn

__all__ = ["block_class_names", "fsdp_plugin", "check_fsdp_options", "enable_fsdp_on_cpu"]

_BLOCK_CONTAINER = re.compile(r"blocks|layer\d+")


def block_class_names(model: nn.Module) -> list[str]:
    """Class names of a timm model's blocks: the elements of every ``blocks`` / ``layerN`` container
    (one level deeper where those elements are themselves containers, as in EfficientNet)."""
    containers = (nn.Sequential, nn.ModuleList)
    names: set[str] = set()
    for qualname, module in model.named_modules():
        if not (isinstance(module, containers) and _BLOCK_CONTAINER.fullmatch(qualname.rsplit(".", 1)[-1])):
            continue
        for child in module.children():
            blocks = list(child.children()) if isinstance(child, containers) else [child]
            names.update(type(block).__name__ for block in blocks)
    return sorted(names)


def check_fsdp_options(cfg: Any) -> None:
    """Refuse what the recipe does not support under FSDP (``ValueError`` naming the setting)."""
    if not cfg.train.fsdp:
        return
    if cfg.averaging.enabled:
        raise ValueError(
            "train.fsdp=true does not support averaging.enabled=true yet; use DDP (train.fsdp false)"
        )
    if cfg.optim.opt.lower() in ("rmda", "proxsgd"):
        raise ValueError(
            f"train.fsdp=true does not support optim.opt={cfg.optim.opt} (structured sparsity); use DDP"
        )


def fsdp_plugin(model: nn.Module) -> Any:
    """Accelerate's ``FullyShardedDataParallelPlugin`` (``fsdp_version=2``) wrapping ``model``'s blocks
    (``model`` may live on the meta device: only its module classes are read)."""
    from accelerate import FullyShardedDataParallelPlugin

    return FullyShardedDataParallelPlugin(
        fsdp_version=2,
        auto_wrap_policy="transformer_based_wrap",
        transformer_cls_names_to_wrap=block_class_names(model),
        reshard_after_forward=True,
        state_dict_type="FULL_STATE_DICT",
        cpu_ram_efficient_loading=False,
    )


def enable_fsdp_on_cpu(accelerator: Any, plugin: Any) -> None:
    """Turn Accelerate's FSDP plugin on for CPU ranks (gloo), before ``prepare``.

    Accelerate enables the plugin only for accelerator devices; on CPU ranks it would silently train
    with DDP. FSDP2 itself runs on the CPU, so the shared state is switched to FSDP as Accelerate does
    for GPUs (including the plugin's mixed-precision policy). No-op everywhere else.
    """
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    state = accelerator.state
    if state.distributed_type != DistributedType.MULTI_CPU:
        return
    if state.mixed_precision != "no":
        plugin.set_mixed_precision(state.mixed_precision)
    state.fsdp_plugin = plugin
    # every later AcceleratorState() copies the process state's type over its own: set both
    PartialState().distributed_type = state.distributed_type = DistributedType.FSDP
