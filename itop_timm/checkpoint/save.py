"""``save_sparse``: gather a model's tensors and masks, build the checkpoint's metadata, write the folder."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..distributed import full_state_dict, full_tensor, is_main_rank, is_sharded
from ..masks import validate_masks
from ..serialization import MAX_JSON_DEPTH, json_depth_exceeds
from ..unwrap import unwrap_model
from ..version import __version__
from .architecture import ARCHITECTURE_ATTR, ARCHITECTURE_KEY, timm_architecture
from .format import (
    FORMAT,
    FORMAT_VERSION,
    SparseState,
    SparsifierLike,
    dtype_name,
    float_dtypes,
    tensor_sha256,
)
from .write import check_replaceable, write_folder

__all__ = ["save_sparse", "nonfinite_counts"]

_logger = logging.getLogger(__name__)

#: what a :class:`SparseState`'s ``info`` may carry into the metadata
_INFO_KEYS = (
    "method",
    "target_density",
    "itop_rate",
    "step",
    "distribution",
    "sparsity_config",
    "target_layer_densities",
)


def _collect_masks(
    model: nn.Module, source: SparsifierLike | SparseState | Mapping[str, torch.Tensor] | None
) -> tuple[dict, dict | None, dict]:
    """(masks, union or None, info) with masks validated against the model's parameters."""
    if source is None:
        return {}, None, {"method": "dense"}
    if isinstance(source, SparseState):
        masks = dict(source.masks)
        union = dict(source.ever_active) if source.ever_active is not None else None
        info = {"method": "masks", **{k: v for k, v in source.info.items() if k in _INFO_KEYS}}
    elif isinstance(source, Mapping):
        masks, union, info = dict(source), None, {"method": "masks"}
    elif isinstance(source, SparsifierLike):  # a Sparsifier
        info = {
            "method": source.method.name,
            "target_density": source.config.density,
            "itop_rate": source.itop_rate,
            "step": source.step,
            "distribution": source.config.distribution,
            "sparsity_config": source.config.to_dict(),
            "target_layer_densities": dict(source.target_densities),
        }
        # full masks (a sharded run gathers them: every rank calls save_sparse)
        masks = {name: full_tensor(m) for name, m in source.masks.items()}
        union = {name: full_tensor(m) for name, m in source.ever_active.items()}
    else:
        raise ValueError(
            f"sparsifier_or_masks must be a Sparsifier, a mapping name -> bool mask or None, got {type(source).__name__}"
        )
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    masks = validate_masks(masks, shapes, complete=False)
    if union is not None:
        union = validate_masks(union, {n: shapes[n] for n in masks}, what="union masks")
    return masks, union, info


def save_sparse(
    model: nn.Module,
    sparsifier_or_masks: SparsifierLike | SparseState | Mapping[str, torch.Tensor] | None,
    directory: str | os.PathLike,
    *,
    model_name: str | None = None,
    extra_metadata: Mapping[str, Any] | None = None,
    compact: bool = False,
    include_union: bool = True,
    metrics: Mapping[str, Any] | None = None,
    dataset: str | None = None,
    label_names: list[str] | None = None,
    data_config: Mapping[str, Any] | None = None,
    training_config: Mapping[str, Any] | None = None,
) -> Path:
    """Write a sparse checkpoint folder (see :mod:`itop_timm.checkpoint`); returns its path.

    Args:
        model: the (timm) model; DDP / compile wrappers are unwrapped. A sharded (FSDP2) model: call
            ``save_sparse`` on every rank; the tensors are gathered and rank 0 writes the same folder as
            an unsharded run (the other ranks return once it is complete).
        sparsifier_or_masks: a :class:`Sparsifier` (masks, union, method, R_s...), a :class:`SparseState`,
            a ``{name: bool mask}`` mapping, or ``None`` for a dense model.
        directory: target folder; an existing checkpoint there is replaced only once the new one is complete.
        model_name: timm architecture name (default: ``model.pretrained_cfg["architecture"]``).
        extra_metadata: JSON-able values stored under ``"extra"`` in the sparsity metadata.
        compact: store sparse weights as nonzero values + the bit mask (``model.compact.safetensors``).
        include_union: store the union (R_s) masks (training state; an inference export may leave them out).
        metrics: e.g. ``{"test_top1": 91.2}`` for the model card and metadata.
        dataset: the data set the weights were trained on; a Hugging Face Hub id (``org/name``) is
            also listed in the model card's ``datasets:`` metadata.
        label_names: class names, stored in ``config.json`` as timm does.
        data_config: the preprocessing the model was trained with (``input_size``, ``mean``, ``std``,
            ``crop_pct``, ``interpolation``), stored in ``config.json``'s ``pretrained_cfg``.
        training_config: the recipe's config that produced the weights (JSON-able), recorded in the
            metadata and the model card.

    ``config.json`` keeps only what builds and preprocesses the model: timm's provenance of its own
    pretrained weights (tag, licence, paper, origin) is not copied into it. The model must hold one
    floating dtype (``ValueError`` otherwise); ``load_sparse`` rebuilds it in that dtype. NaN/Inf
    weights are saved as they are, with a warning (``metadata["nonfinite"]`` counts them).
    """
    model = unwrap_model(model)
    arch = timm_architecture(model, model_name)
    check_replaceable(Path(directory))  # before any work: a save replaces the whole folder
    masks, union, info = _collect_masks(model, sparsifier_or_masks)
    try:
        json.dumps(dict(extra_metadata or {}))
        json.dumps(dict(metrics or {}))
        json.dumps(dict(training_config or {}))
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"extra_metadata, metrics and training_config must be JSON-serialisable ({err})"
        ) from err

    state = full_state_dict(model)  # sharded tensors gathered, one at a time
    _check_one_float_dtype(state)
    dense: dict[str, torch.Tensor] = {}
    zeroed = 0
    for name, tensor in state.items():
        t = tensor.detach().to("cpu")
        if name in masks:
            mask = masks[name].to("cpu")
            zeroed += int((t[~mask] != 0).sum())
            t = torch.where(mask, t, torch.zeros((), dtype=t.dtype))  # +0.0 everywhere off-mask
        dense[name] = t.contiguous().clone()
    if zeroed:
        _logger.warning("save_sparse: %d weights outside the masks were nonzero; saved as 0", zeroed)
    nonfinite = nonfinite_counts(dense)
    if nonfinite:
        _logger.warning(
            "save_sparse: %d NaN/Inf values in %d tensor(s) (first: %s); saved as they are",
            sum(nonfinite.values()),
            len(nonfinite),
            next(iter(nonfinite)),
        )

    tensors_meta: dict[str, Any] = {}
    for name, mask in masks.items():
        active = int(mask.sum())
        entry = {"shape": list(mask.shape), "active": active, "density": active / mask.numel()}
        if union is not None:
            entry["itop_rate"] = int(union[name].sum()) / mask.numel()
        tensors_meta[name] = entry
    total = sum(m.numel() for m in masks.values())
    meta: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "itop_timm_version": __version__,
        "timm_version": __import__("timm").__version__,
        "architecture": arch,
        "num_classes": getattr(model, "num_classes", None),
        **info,
        "density": (sum(e["active"] for e in tensors_meta.values()) / total) if total else 1.0,
        "compact": bool(compact),
        "has_union": union is not None and include_union,
        "tensors": tensors_meta,
        "sha256": {name: tensor_sha256(t) for name, t in dense.items()},
        "dtypes": {name: dtype_name(t.dtype) for name, t in dense.items()},
        "shapes": {name: list(t.shape) for name, t in dense.items()},
        "metrics": dict(metrics or {}),
        "dataset": dataset,
        "extra": dict(extra_metadata or {}),
        "training_config": dict(training_config) if training_config is not None else None,
        "nonfinite": nonfinite,
    }
    history = getattr(model, ARCHITECTURE_ATTR, None)
    if history is not None:
        meta[ARCHITECTURE_KEY] = history
    if json_depth_exceeds(meta, MAX_JSON_DEPTH - 1):
        raise ValueError(
            f"extra_metadata / training_config nest too deeply: checkpoints hold at most {MAX_JSON_DEPTH} levels"
        )

    directory = Path(directory)
    if not is_sharded(model):
        write_folder(directory, model, dense, masks, union, meta, compact, label_names, data_config)
    else:  # every rank is here: rank 0 writes, the others wait until it is done
        try:
            if is_main_rank():
                write_folder(directory, model, dense, masks, union, meta, compact, label_names, data_config)
        finally:
            torch.distributed.barrier()
    _logger.info(
        "saved sparse checkpoint (%s, density %.4f) to %s", meta["method"], meta["density"], directory
    )
    return directory


def _check_one_float_dtype(state: Mapping[str, torch.Tensor]) -> None:
    """A checkpoint holds one floating dtype (``load_sparse`` rebuilds the model in it)."""
    dtypes = sorted(str(d) for d in float_dtypes(state))
    if len(dtypes) > 1:
        raise ValueError(
            f"save_sparse: the model mixes floating dtypes {dtypes}; cast it to one first "
            "(e.g. model.float() or model.to(torch.bfloat16)) so the checkpoint loads back"
        )


def nonfinite_counts(state: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """``{name: number of NaN/Inf values}`` for every floating tensor that has any."""
    counts = {name: int((~torch.isfinite(t)).sum()) for name, t in state.items() if t.is_floating_point()}
    return {name: n for name, n in counts.items() if n}
