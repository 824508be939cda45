"""Cross-checks between a checkpoint's files: the weights file's link to its sparsity file, the
``config.json`` checksum, and every tensor against the built model, the metadata and the masks."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..serialization import CheckpointError
from ..validation import short_repr
from . import format as fmt

__all__ = ["check_link", "check_config", "stored_float_dtype", "check_tensors"]

_logger = logging.getLogger(__name__)


def check_link(folder: Path, weights_path: Path, header: Mapping[str, str], has_sparsity: bool) -> None:
    """The weights file names its sparsity file by hash: a lost, swapped or edited one is an error."""
    link = header.get(fmt.LINK_KEY)  # absent: a weights file not written by itop_timm (plain timm)
    if link == "none" and has_sparsity:
        raise CheckpointError(
            f"{weights_path}: saved as a dense checkpoint, but {fmt.SPARSITY_FILE} is present"
        )
    if link is not None and link != "none":
        if not has_sparsity:
            raise CheckpointError(
                f"{folder / fmt.SPARSITY_FILE}: missing (its weights file {weights_path.name} refers to it)"
            )
        if fmt.bytes_sha256((folder / fmt.SPARSITY_FILE).read_bytes()) != link:
            raise CheckpointError(
                f"{folder / fmt.SPARSITY_FILE}: does not belong to {weights_path.name} (hash mismatch)"
            )


def check_config(folder: Path, config: Mapping[str, Any], arch: str, meta: Mapping[str, Any]) -> None:
    """``config.json`` decides the architecture timm builds: it must be the one that was saved."""
    path = folder / fmt.CONFIG_FILE
    if meta["architecture"] != arch:
        raise CheckpointError(
            f"{path}: architecture {arch!r} disagrees with {fmt.SPARSITY_FILE} ({meta['architecture']!r})"
        )
    classes = config.get("num_classes")
    if meta.get("num_classes") is not None and classes != meta["num_classes"]:
        raise CheckpointError(
            f"{path}: num_classes {short_repr(classes)} disagrees with {fmt.SPARSITY_FILE} ({meta['num_classes']})"
        )
    recorded = meta.get("config_sha256")
    if recorded is None:
        _logger.warning("%s: saved by an older itop_timm, its model_args are not verified", path)
    elif fmt.config_sha256(config) != recorded:
        raise CheckpointError(
            f"{path}: differs from the config saved with this checkpoint (checksum mismatch in "
            f"{fmt.SPARSITY_FILE}); it decides the architecture (model_args), so it must not be edited"
        )


def stored_float_dtype(weights_path: Path, state: Mapping[str, torch.Tensor]) -> torch.dtype | None:
    """The one floating dtype of the stored tensors (``None`` if there is none)."""
    dtypes = fmt.float_dtypes(state)
    if len(dtypes) > 1:
        raise CheckpointError(
            f"{weights_path}: tensors mix floating dtypes {sorted(str(d) for d in dtypes)}; a model has one"
        )
    return dtypes.pop() if dtypes else None


def check_tensors(
    weights_path: Path,
    model: nn.Module,
    state: Mapping[str, torch.Tensor],
    masks: Mapping[str, torch.Tensor],
    meta: Mapping[str, Any],
    has_sparsity: bool,
) -> None:
    """Names, shapes, dtypes, hashes and off-mask zeros of every tensor against the model and metadata."""
    arch = meta["architecture"]
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{weights_path}: tensors do not fit {arch}: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    stray = sorted(set(masks) - set(expected))
    if stray:
        raise CheckpointError(
            f"{weights_path.parent / fmt.SPARSITY_FILE}: masks of unknown tensors {stray[:5]}"
        )
    for name, ref in expected.items():
        t = state[name]
        if tuple(t.shape) != tuple(ref.shape):
            raise CheckpointError(
                f"{weights_path}: tensor {name!r} has shape {tuple(t.shape)}, {arch} needs {tuple(ref.shape)}"
            )
        if t.dtype != ref.dtype:
            raise CheckpointError(
                f"{weights_path}: tensor {name!r} has dtype {t.dtype}, {arch} needs {ref.dtype}"
            )
        if has_sparsity:
            if meta["shapes"].get(name) != list(t.shape) or meta["dtypes"].get(name) != fmt.dtype_name(
                t.dtype
            ):
                raise CheckpointError(
                    f"{weights_path}: tensor {name!r} disagrees with the shape/dtype recorded in {fmt.SPARSITY_FILE}"
                )
            if fmt.tensor_sha256(t) != meta["sha256"].get(name):
                raise CheckpointError(
                    f"{weights_path}: tensor {name!r} is corrupted or from another checkpoint (checksum mismatch)"
                )
        if name in masks:
            if tuple(masks[name].shape) != tuple(t.shape):
                raise CheckpointError(
                    f"{weights_path.parent / fmt.SPARSITY_FILE}: mask of {name!r} has shape "
                    f"{tuple(masks[name].shape)}, the tensor {tuple(t.shape)}"
                )
            if bool((t[~masks[name]] != 0).any()):
                raise CheckpointError(
                    f"{weights_path}: tensor {name!r} has nonzeros where its mask is inactive"
                )
