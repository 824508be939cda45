"""What data-parallel training (Accelerate / torch.distributed) needs from the sparsifier.

* identical masks on every rank: :func:`broadcast_masks` sends rank 0's masks to all ranks in one
  collective (after initialisation and after every topology update);
* a cheap cross-rank check: :func:`masks_fingerprint` and :func:`all_ranks_agree`;
* AMP safety: :func:`all_finite` tells whether gradients are finite before a topology update.

Everything here is a no-op in a single process.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch
import torch.distributed as dist

__all__ = ["is_distributed", "broadcast_masks", "masks_fingerprint", "all_ranks_agree", "all_finite"]


def is_distributed() -> bool:
    """True inside an initialised process group with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


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
    """Whether every tensor is free of inf/NaN (one host sync)."""
    flags_by_device: dict[torch.device, list[torch.Tensor]] = {}
    for t in tensors:
        flags_by_device.setdefault(t.device, []).append(torch.isfinite(t).all())
    return all(bool(torch.stack(flags).all()) for flags in flags_by_device.values())
