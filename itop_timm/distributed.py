"""What data-parallel training (Accelerate / torch.distributed) needs from the sparsifier.

* identical masks on every rank: :func:`broadcast_masks` sends rank 0's masks to all ranks in one
  collective (after initialisation and after every topology update);
* a cheap cross-rank check: :func:`masks_fingerprint` and :func:`all_ranks_agree`;
* AMP safety: :func:`all_finite` tells whether gradients are finite before a topology update;
* sharding (FSDP2, ``torch.distributed.fsdp.fully_shard``): parameters are DTensors, and every mask,
  union mask and gradient EMA is a DTensor sharded like its parameter. One mechanism serves the
  sharded and the unsharded case: :func:`local` (the shard this rank holds, or the tensor itself) for
  the per-step hook, which never communicates; :func:`full_tensor` (gather) and :func:`shard_like`
  (keep this rank's part, no communication) for the topology update, which works on one layer's full
  tensors at a time; :func:`global_counts` for densities and R_s over the full tensors;
  :func:`full_state_dict` / :func:`is_main_rank` for writing files from rank 0;
* wrappers whose parameters masks cannot follow (FSDP1's flat parameters, DeepSpeed) are refused by
  :func:`check_supported_wrapping` before anything is modified.

Everything here is a no-op in a single process.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Partial, distribute_tensor

__all__ = [
    "is_distributed",
    "is_main_rank",
    "broadcast_masks",
    "masks_fingerprint",
    "all_ranks_agree",
    "all_finite",
    "local",
    "full_tensor",
    "shard_like",
    "global_counts",
    "is_sharded",
    "full_state_dict",
    "load_full_state_dict",
    "check_supported_wrapping",
]


def is_distributed() -> bool:
    """True inside an initialised process group with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def is_main_rank() -> bool:
    """True in a single process and on rank 0 of a process group."""
    return not is_distributed() or dist.get_rank() == 0


def _collective_device(reference: torch.Tensor) -> torch.device:
    # NCCL needs CUDA tensors; gloo works on the CPU.
    return reference.device if dist.get_backend() != "gloo" else torch.device("cpu")


def broadcast_masks(masks: Sequence[torch.Tensor], src: int = 0) -> None:
    """Overwrite ``masks`` (bool tensors, in place) with rank ``src``'s values, in one collective."""
    if not is_distributed() or not masks:
        return
    device = _collective_device(masks[0])
    packed = torch.cat([m.reshape(-1).to(device=device, dtype=torch.uint8) for m in masks])
    dist.broadcast(packed, src=src)
    offset = 0
    for mask in masks:
        n = mask.numel()
        mask.copy_(packed[offset : offset + n].view(mask.shape).to(mask.device, torch.bool))
        offset += n


def masks_fingerprint(masks: Sequence[torch.Tensor]) -> int:
    """A 63-bit hash of the masks' shapes and values (host sync; call at topology updates only)."""
    digest = hashlib.blake2b(digest_size=8)
    for mask in masks:
        mask = full_tensor(mask)  # sharded masks: every rank calls this (it gathers)
        digest.update(repr(tuple(mask.shape)).encode())
        digest.update(mask.detach().to("cpu", torch.uint8).contiguous().numpy().tobytes())
    return int.from_bytes(digest.digest(), "little") >> 1


def all_ranks_agree(value: int, reference: torch.Tensor | None = None) -> tuple[bool, list[int]]:
    """All-gather an integer from every rank; returns (all equal, the gathered values)."""
    if not is_distributed():
        return True, [value]
    device = _collective_device(reference) if reference is not None else torch.device("cpu")
    mine = torch.tensor([value], dtype=torch.int64, device=device)
    gathered = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, mine)
    values = [int(t.item()) for t in gathered]
    return all(v == values[0] for v in values), values


def all_finite(tensors: Sequence[torch.Tensor]) -> bool:
    """Whether every tensor is free of inf/NaN (one host sync).

    With sharded (DTensor) tensors each rank checks its shards and the ranks agree on the answer (one
    all-reduce), so every rank takes the same branch."""
    flags_by_device: dict[torch.device, list[torch.Tensor]] = {}
    for t in tensors:
        t = local(t)
        flags_by_device.setdefault(t.device, []).append(torch.isfinite(t).all())
    finite = all(bool(torch.stack(flags).all()) for flags in flags_by_device.values())
    if is_distributed() and any(isinstance(t, DTensor) for t in tensors):
        flag = torch.tensor([int(finite)], device=_collective_device(local(tensors[0])))
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        finite = bool(flag.item())
    return finite


# ----------------------------------------------------------------------------- sharding (FSDP2)
def local(tensor: torch.Tensor) -> torch.Tensor:
    """The part of ``tensor`` this rank holds: a DTensor's local shard (a view: in-place ops under
    ``torch.no_grad`` change the DTensor), any other tensor itself."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def full_tensor(tensor: torch.Tensor | None) -> torch.Tensor | None:
    """The whole tensor: a DTensor gathered from every rank (a collective: every rank must call it),
    any other tensor itself (no copy); ``None`` stays ``None``."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``full`` placed like ``like``: for a DTensor ``like``, a DTensor with its mesh and placements
    whose local shard is this rank's part of ``full`` (no communication: every rank must hold the
    same ``full``); otherwise ``full`` on ``like``'s device."""
    if not isinstance(like, DTensor):
        return full.to(like.device)
    if tuple(full.shape) != tuple(like.shape):
        raise ValueError(
            f"cannot shard a tensor of shape {tuple(full.shape)} like one of {tuple(like.shape)}"
        )
    return distribute_tensor(
        full.to(local(like).device), like.device_mesh, like.placements, src_data_rank=None
    )


def global_counts(masks: Sequence[torch.Tensor]) -> list[int]:
    """The number of ``True`` values of every mask over its full tensor (one host sync; for sharded
    masks one all-reduce per device mesh and placement, so every rank must call it)."""
    counts = [local(m).sum() for m in masks]
    groups: dict[tuple[Any, ...], list[int]] = {}
    for i, m in enumerate(masks):
        if isinstance(m, DTensor):
            groups.setdefault((m.device_mesh, tuple(m.placements)), []).append(i)
    for (mesh, placements), indices in groups.items():
        summed = tuple(Partial() if p.is_shard() else p for p in placements)
        stacked = torch.stack([counts[i] for i in indices])
        total = DTensor.from_local(stacked, mesh, summed, run_check=False).full_tensor()
        for j, i in enumerate(indices):
            counts[i] = total[j]
    if not counts:
        return []
    return [int(c) for c in torch.stack([c.to(counts[0].device) for c in counts]).tolist()]


def is_sharded(model: nn.Module) -> bool:
    """Whether any parameter of ``model`` is a DTensor (FSDP2 / tensor parallel)."""
    return any(isinstance(p, DTensor) for p in model.parameters())


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` with every tensor whole and on the CPU; sharded tensors are gathered one
    at a time (a collective: every rank must call it; every rank gets the full copy)."""
    return {name: full_tensor(t.detach()).to("cpu") for name, t in model.state_dict().items()}


def load_full_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load whole tensors into ``model``, keeping each rank's shard where the model is sharded (every
    rank must call it with the same ``state``)."""
    if not is_sharded(model):
        model.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))


def _defined_in(obj: object, package: str) -> bool:
    return any(cls.__module__.split(".")[0] == package for cls in type(obj).__mro__)


def check_supported_wrapping(model: nn.Module, optimizer: object) -> None:
    """Raise ``ValueError`` for wrappers whose parameters masks cannot follow, naming what to use instead.

    * FSDP1 (``torch.distributed.fsdp.FullyShardedDataParallel``) flattens a module's parameters into
      one sharded flat parameter, so a weight no longer has its shape;
    * DeepSpeed (ZeRO-3 partitions parameters into empty placeholders; every ZeRO stage keeps the
      master weights inside its own optimizer, out of the masks' reach).
    """
    from torch.distributed.fsdp import FullyShardedDataParallel

    instead = (
        "use PyTorch FSDP2 (torch.distributed.fsdp.fully_shard; Accelerate: fsdp_version: 2, "
        "recipe: train.fsdp true) or DDP instead"
    )
    if any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
        raise ValueError(
            "cannot sparsify a model wrapped by FSDP1 (FullyShardedDataParallel): its flat parameters do "
            f"not keep the weights' shapes; {instead}"
        )
    deepspeed = (
        _defined_in(model, "deepspeed")
        or _defined_in(optimizer, "deepspeed")
        or _defined_in(getattr(optimizer, "optimizer", None), "deepspeed")
        or any(hasattr(p, "ds_id") for p in model.parameters())
    )
    if deepspeed:
        raise ValueError(
            "cannot sparsify a DeepSpeed-wrapped model or optimizer (ZeRO-3 partitions the parameters, and "
            f"ZeRO keeps master weights the masks cannot reach); {instead}"
        )
