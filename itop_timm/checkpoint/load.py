"""``load_sparse``: find a checkpoint folder, read its files, verify them, and rebuild model and masks."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..serialization import CheckpointError, parse_json, read_json_file, read_safetensors
from ..validation import short_repr
from .architecture import build_model
from .format import (
    COMPACT_WEIGHTS_FILE,
    CONFIG_FILE,
    FORMAT,
    FORMAT_VERSION,
    MASK_PREFIX,
    META_KEY,
    SPARSITY_FILE,
    UNION_PREFIX,
    WEIGHTS_FILE,
    tensor_sha256,
    unpack_mask,
)
from .hub import download_checkpoint, is_hub_id
from .schema import check_meta_types
from .verify import check_config, check_link, check_tensors, stored_float_dtype
from .write import recover_interrupted_save

__all__ = ["load_sparse", "resolve_checkpoint_dir", "read_sparse_metadata"]


def resolve_checkpoint_dir(path_or_hub_id: str | os.PathLike, revision: str | None = None) -> Path:
    """A local folder for ``path_or_hub_id`` (``hf-hub:org/name[@rev]`` is fetched through huggingface_hub's cache)."""
    text = str(path_or_hub_id)
    if is_hub_id(text):
        return download_checkpoint(text, revision)
    folder = recover_interrupted_save(Path(text))
    if folder.is_file():
        raise CheckpointError(_not_a_folder(folder))
    if not folder.is_dir():
        raise CheckpointError(f"{text}: no such checkpoint folder (or use hf-hub:<org>/<name>)")
    return folder


def _not_a_folder(path: Path) -> str:
    """Why a file is not taken, and where a timm run's sparse folder is (``itop-timm timm-train``
    writes ``sparse/`` next to timm's checkpoints: itop_timm.timm_train.SPARSE_FOLDER)."""
    message = f"{path}: a file, not a checkpoint folder"
    if path.name.endswith((".pth.tar", ".pth", ".pt", ".ckpt", ".bin")):
        sparse = path.parent / "sparse"
        message += (
            " (a PyTorch training checkpoint, e.g. timm's train.py's, is a pickle: itop_timm reads only "
            "safetensors and JSON). `itop-timm timm-train` writes the run's safetensors sparse folder next "
            f"to timm's checkpoints: {sparse}"
            + (" (pass that folder)" if sparse.is_dir() else " (not there: was the run started with it?)")
        )
    return message


def read_sparse_metadata(folder: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The sparsity metadata and the raw (packed) tensors of ``sparsity.safetensors``, integrity-checked."""
    path = Path(folder) / SPARSITY_FILE
    tensors, header = read_safetensors(path)
    if META_KEY not in header:
        raise CheckpointError(f"{path}: no itop_timm metadata in the header")
    meta = parse_json(header[META_KEY], path, "metadata JSON")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an itop_timm sparse checkpoint")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: format version {short_repr(meta.get('format_version'))}, this itop_timm reads {FORMAT_VERSION}"
        )
    expected = meta.get("sparsity_sha256")
    if not isinstance(expected, dict) or set(expected) != set(tensors):
        raise CheckpointError(
            f"{path}: tensors {sorted(set(tensors) ^ set(expected if isinstance(expected, dict) else {}))[:5]} "
            "do not match the recorded list"
        )
    for key, tensor in tensors.items():
        if tensor_sha256(tensor) != expected[key]:
            raise CheckpointError(f"{path}: tensor {key!r} is corrupted (checksum mismatch)")
    return meta, tensors


def _read_config(folder: Path) -> tuple[dict[str, Any], str]:
    """``config.json`` parsed, and its architecture name."""
    path = folder / CONFIG_FILE
    config = read_json_file(path, "timm config")
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: unreadable timm config (a JSON object is expected)")
    arch = config.get("architecture")
    if not isinstance(arch, str):
        raise CheckpointError(f"{path}: 'architecture' must be a string, got {short_repr(arch)}")
    return config, arch


def _read_metadata(folder: Path, arch: str) -> tuple[dict[str, Any], dict[str, torch.Tensor], bool]:
    """(metadata, packed mask tensors, whether ``sparsity.safetensors`` exists), types checked."""
    if (folder / SPARSITY_FILE).exists():
        meta, raw = read_sparse_metadata(folder)
        check_meta_types(meta, folder / SPARSITY_FILE)
        return meta, raw, True
    if (folder / COMPACT_WEIGHTS_FILE).exists():
        raise CheckpointError(f"{folder / SPARSITY_FILE}: missing (a compact checkpoint needs its masks)")
    # a dense checkpoint of an older itop_timm, or a plain timm folder: nothing to verify against
    return {"method": "dense", "compact": False, "tensors": {}, "architecture": arch}, {}, False


def _weights_path(folder: Path, meta: Mapping[str, Any]) -> Path:
    """The weights file the metadata names; a folder holding the other kind is a mismatched pair."""
    compact = bool(meta.get("compact"))
    path = folder / (COMPACT_WEIGHTS_FILE if compact else WEIGHTS_FILE)
    other = folder / (WEIGHTS_FILE if compact else COMPACT_WEIGHTS_FILE)
    if not path.exists() and other.exists():
        raise CheckpointError(
            f"{folder / SPARSITY_FILE}: records a {'compact' if compact else 'dense'} checkpoint, but the folder "
            f"holds {other.name}: the two files do not belong together"
        )
    return path


def _read_masks(
    path: Path, meta: Mapping[str, Any], raw: Mapping[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Unpack masks (and union masks) and check them against the recorded counts and densities."""
    masks: dict[str, torch.Tensor] = {}
    union: dict[str, torch.Tensor] = {}
    for name, entry in meta["tensors"].items():
        key = f"{MASK_PREFIX}{name}"
        if key not in raw:
            raise CheckpointError(f"{path}: mask of {name!r} is missing")
        shape = tuple(entry["shape"])
        try:
            masks[name] = unpack_mask(raw[key], shape)
            if meta["has_union"]:
                union[name] = unpack_mask(raw[f"{UNION_PREFIX}{name}"], shape)
        except (CheckpointError, KeyError) as err:
            raise CheckpointError(f"{path}: tensor {name!r}: {err}") from err
        active = int(masks[name].sum())
        if active != entry["active"] or not math.isclose(
            active / max(1, masks[name].numel()), entry["density"], rel_tol=1e-9, abs_tol=1e-12
        ):
            raise CheckpointError(
                f"{path}: mask of {name!r} has {active} active weights, metadata records {entry['active']}"
            )
        if union and bool((masks[name] & ~union[name]).any()):
            raise CheckpointError(f"{path}: union mask of {name!r} does not contain its mask")
    if masks:
        total = sum(m.numel() for m in masks.values())
        realised = sum(int(m.sum()) for m in masks.values()) / max(1, total)
        if not math.isclose(realised, meta["density"], rel_tol=1e-9):
            raise CheckpointError(
                f"{path}: realised density {realised} differs from the recorded {meta['density']}"
            )
    return masks, union


def _expand_compact(
    weights_path: Path, stored: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Dense tensors from a compact file (each masked tensor holds only its active values)."""
    state = {}
    for name, t in stored.items():
        if name not in masks:
            state[name] = t
            continue
        mask = masks[name]
        if t.ndim != 1 or t.numel() != int(mask.sum()):
            raise CheckpointError(
                f"{weights_path}: tensor {name!r} holds {t.numel()} values, its mask has {int(mask.sum())}"
            )
        full = torch.zeros(mask.shape, dtype=t.dtype)
        full[mask] = t
        state[name] = full
    return state


def load_sparse(
    path_or_hub_id: str | os.PathLike,
    *,
    device: str | torch.device = "cpu",
    revision: str | None = None,
) -> tuple[nn.Module, dict[str, torch.Tensor], dict[str, Any]]:
    """Load and verify a sparse checkpoint from a folder or ``hf-hub:org/name``.

    Returns ``(model, masks, metadata)``: the timm model (eval mode, on ``device``, in the floating
    dtype it was saved in), the bool masks (``{}`` for a dense checkpoint) and the metadata dict;
    ``metadata["ever_active"]`` holds the union masks when stored. Continue training with
    ``itop_timm.sparsify(model, optimizer, masks=masks, ...)``. Any defect of any file raises
    :class:`CheckpointError` naming it.
    """
    folder = resolve_checkpoint_dir(path_or_hub_id, revision)
    config, arch = _read_config(folder)
    meta, raw, has_sparsity = _read_metadata(folder, arch)
    weights_path = _weights_path(folder, meta)
    stored, weights_header = read_safetensors(weights_path)
    check_link(folder, weights_path, weights_header, has_sparsity)
    if has_sparsity:
        check_config(folder, config, arch, meta)
    masks, union = _read_masks(folder / SPARSITY_FILE, meta, raw)
    state = _expand_compact(weights_path, stored, masks) if meta["compact"] else stored
    model = build_model(folder, arch, meta)
    dtype = stored_float_dtype(weights_path, state)
    if dtype is not None:
        model.to(dtype)  # timm builds float32; a checkpoint saved in bf16/fp16 loads as such
    check_tensors(weights_path, model, state, masks, meta, has_sparsity)
    model.load_state_dict(state, strict=True)
    model.to(device).eval()
    metadata = dict(meta)
    if union:
        metadata["ever_active"] = {n: u.to(device) for n, u in union.items()}
    metadata["path"] = str(folder)
    return model, {n: m.to(device) for n, m in masks.items()}, metadata
