"""Writing a checkpoint folder atomically (built in a temporary sibling, then renamed), and putting the
previous checkpoint back when such a write was interrupted between its two renames."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as safetensors_save
from torch import nn

from ..serialization import atomic_directory
from ..validation import short_repr
from . import format as fmt
from .card import model_card

__all__ = ["write_folder", "recover_interrupted_save", "check_replaceable"]

_logger = logging.getLogger(__name__)

#: ``pretrained_cfg`` keys that describe how to build and preprocess the model; the others (tag,
#: hf_hub_id, license, paper_ids, origin_url, test-time sizes of timm's ImageNet weights...) describe
#: weights this checkpoint does not hold, so they are not copied.
_OWN_PRETRAINED_CFG_KEYS = (
    "input_size",
    "fixed_input_size",
    "min_input_size",
    "interpolation",
    "crop_pct",
    "crop_mode",
    "mean",
    "std",
    "num_classes",
    "pool_size",
    "first_conv",
    "classifier",
    "label_offset",
)


def write_folder(
    directory: Path,
    model: nn.Module,
    dense: Mapping[str, torch.Tensor],
    masks: Mapping[str, torch.Tensor],
    union: Mapping[str, torch.Tensor] | None,
    meta: dict[str, Any],
    compact: bool,
    label_names: list[str] | None,
    data_config: Mapping[str, Any] | None,
) -> None:
    """Write the checkpoint folder atomically from gathered (full, CPU) tensors; completes ``meta``
    with the hashes of ``config.json`` and of the packed masks."""
    from timm.models._hub import save_config_for_hf

    recover_interrupted_save(directory)
    with atomic_directory(directory) as tmp:
        # timm writes config.json (architecture, num_classes, model_args, pretrained_cfg); the weights
        # are the masked copy (exact +0.0 off-mask) or the compact form
        save_config_for_hf(
            model,
            str(tmp / fmt.CONFIG_FILE),
            model_config={"label_names": list(label_names)} if label_names else None,
            data_config=dict(data_config) if data_config else None,
        )
        meta["config_sha256"] = fmt.config_sha256(_write_own_config(tmp / fmt.CONFIG_FILE))
        # always written, dense models too: it holds the hashes of every tensor and of config.json
        sparsity: dict[str, torch.Tensor] = {
            f"{fmt.MASK_PREFIX}{n}": fmt.pack_mask(m) for n, m in masks.items()
        }
        if meta["has_union"]:
            sparsity |= {f"{fmt.UNION_PREFIX}{n}": fmt.pack_mask(union[n]) for n in masks}
        meta["sparsity_sha256"] = {k: fmt.tensor_sha256(v) for k, v in sparsity.items()}
        sparsity_blob = safetensors_save(sparsity, metadata={fmt.META_KEY: json.dumps(meta)})
        (tmp / fmt.SPARSITY_FILE).write_bytes(sparsity_blob)
        # the weights file names its companion sparsity file by hash, so a lost or swapped one is detected
        # (a single metadata key: safetensors writes several in no fixed order, and saves should be
        # byte-for-byte reproducible)
        header = {fmt.LINK_KEY: fmt.bytes_sha256(sparsity_blob)}
        if compact:
            packed = {name: (t[masks[name].to("cpu")] if name in masks else t) for name, t in dense.items()}
            (tmp / fmt.COMPACT_WEIGHTS_FILE).write_bytes(safetensors_save(packed, metadata=header))
        else:
            (tmp / fmt.WEIGHTS_FILE).write_bytes(safetensors_save(dense, metadata=header))
        (tmp / fmt.CARD_FILE).write_text(model_card(meta, f"<user>/{meta['architecture']}-sparse", compact))


def _write_own_config(path: Path) -> dict[str, Any]:
    """Rewrite timm's ``config.json`` without the borrowed provenance of timm's pretrained weights."""
    config = json.loads(path.read_text())
    cfg = config.get("pretrained_cfg") or {}
    config["pretrained_cfg"] = {k: cfg[k] for k in _OWN_PRETRAINED_CFG_KEYS if k in cfg}
    path.write_text(json.dumps(config, indent=2) + "\n")
    return config


def recover_interrupted_save(directory: Path) -> Path:
    """If a save was interrupted between its two renames, put the previous checkpoint back."""
    old = directory.with_name(f".{directory.name}.old")
    if not directory.exists() and old.is_dir():
        os.replace(old, directory)
        _logger.warning("restored %s from an interrupted save", directory)
    return directory


def check_replaceable(directory: Path) -> None:
    """Refuse, before any work, to write a checkpoint over anything but a new folder, an empty one or a
    checkpoint folder: a save replaces the whole folder, so a run folder, a data folder or a file there
    would be lost."""
    if not directory.exists() and not directory.is_symlink():
        return
    if not directory.is_dir():
        raise ValueError(f"{directory} exists and is not a folder: save the checkpoint into a folder")
    names = sorted(p.name for p in directory.iterdir())
    if names and (fmt.SPARSITY_FILE not in names or set(names) - set(fmt.CHECKPOINT_FILES)):
        raise ValueError(
            f"{directory} is not a checkpoint folder (it holds {short_repr(names[:6])}); a save replaces the "
            "whole folder, so it is refused: choose a new or empty folder, or an existing checkpoint folder"
        )
