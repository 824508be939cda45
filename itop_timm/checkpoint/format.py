"""The sparse checkpoint format: file names, header keys, mask bit packing, hashes and ``SparseState``."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from ..serialization import CheckpointError

__all__ = [
    "WEIGHTS_FILE",
    "COMPACT_WEIGHTS_FILE",
    "SPARSITY_FILE",
    "CONFIG_FILE",
    "CARD_FILE",
    "CHECKPOINT_FILES",
    "FORMAT",
    "FORMAT_VERSION",
    "META_KEY",
    "LINK_KEY",
    "MASK_PREFIX",
    "UNION_PREFIX",
    "SparseState",
    "pack_mask",
    "unpack_mask",
    "tensor_sha256",
    "bytes_sha256",
    "config_sha256",
    "dtype_name",
    "float_dtypes",
]

WEIGHTS_FILE = "model.safetensors"
COMPACT_WEIGHTS_FILE = "model.compact.safetensors"
SPARSITY_FILE = "sparsity.safetensors"
CONFIG_FILE = "config.json"
CARD_FILE = "README.md"
#: every file a checkpoint folder may hold (what a Hub download fetches)
CHECKPOINT_FILES = (WEIGHTS_FILE, COMPACT_WEIGHTS_FILE, SPARSITY_FILE, CONFIG_FILE, CARD_FILE)
FORMAT = "itop_timm.sparse"
FORMAT_VERSION = 1
#: header key of ``sparsity.safetensors`` holding the JSON metadata
META_KEY = "itop_timm"
#: header key of the weights file naming its ``sparsity.safetensors`` by SHA-256 ("none": no such file)
LINK_KEY = "itop_timm.sparsity_sha256"
#: tensor-name prefixes of the packed masks and union (R_s) masks in ``sparsity.safetensors``
MASK_PREFIX = "masks/"
UNION_PREFIX = "ever_active/"


@dataclass(frozen=True)
class SparseState:
    """Masks plus what is known about how they were trained (what :func:`load_sparse` returns can be
    saved again through this, e.g. to export a checkpoint dense or compact)."""

    masks: Mapping[str, torch.Tensor]
    ever_active: Mapping[str, torch.Tensor] | None = None
    info: Mapping[str, Any] = field(default_factory=dict)


@runtime_checkable
class SparsifierLike(Protocol):
    """What saving reads from a :class:`~itop_timm.Sparsifier` (this layer never imports it)."""

    masks: Mapping[str, torch.Tensor]
    ever_active: Mapping[str, torch.Tensor]
    method: Any  # its MethodInfo: .name
    config: Any  # its SparsityConfig: .density, .distribution, .to_dict()
    step: int
    target_densities: Mapping[str, float]
    itop_rate: float


# ----------------------------------------------------------------------------- bit packing
def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """Bool tensor -> uint8 tensor of ``ceil(numel / 8)`` bytes (big-endian bit order, row-major)."""
    flat = mask.detach().reshape(-1).to("cpu", torch.bool).numpy()
    return torch.from_numpy(np.packbits(flat))


def unpack_mask(packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of :func:`pack_mask`."""
    numel = math.prod(shape)
    if packed.dtype != torch.uint8 or packed.ndim != 1 or packed.numel() != (numel + 7) // 8:
        raise CheckpointError(
            f"packed mask has {packed.numel()} bytes of {packed.dtype}, expected {(numel + 7) // 8} uint8 for shape {shape}"
        )
    bits = np.unpackbits(packed.numpy(), count=numel)
    return torch.from_numpy(bits.astype(np.bool_)).reshape(shape)


# ----------------------------------------------------------------------------- hashes and dtypes
def tensor_sha256(t: torch.Tensor) -> str:
    """SHA-256 of a tensor's raw bytes (row-major, on CPU)."""
    t = t.detach().to("cpu").contiguous().reshape(-1)
    return hashlib.sha256(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"").hexdigest()


def bytes_sha256(data: bytes) -> str:
    """SHA-256 of a file's bytes (the link from a weights file to its ``sparsity.safetensors``)."""
    return hashlib.sha256(data).hexdigest()


def config_sha256(config: Any) -> str:
    """SHA-256 of ``config.json``'s content in canonical JSON form (key order and layout do not count)."""
    canonical = json.dumps(config, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()


def dtype_name(dtype: torch.dtype) -> str:
    """How the metadata spells a dtype (``"float32"``, ``"bfloat16"``...)."""
    return str(dtype).removeprefix("torch.")


def float_dtypes(state: Mapping[str, torch.Tensor]) -> set[torch.dtype]:
    """The floating dtypes among ``state``'s tensors (a checkpoint holds at most one)."""
    return {t.dtype for t in state.values() if t.is_floating_point()}
