"""Compacted models as checkpoints: :func:`rebuild_compacted` replays the channel-removal history that
:func:`~itop_timm.structured.compact` recorded on a freshly built model (registered with the checkpoint
format, so ``load_sparse`` rebuilds compacted checkpoints), and :func:`compact_checkpoint` compacts a
saved sparse checkpoint into a new one."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checkpoint import SparseState, load_sparse, register_architecture_rebuilder, save_sparse
from ..validation import is_int
from .compact import HISTORY_ATTR, check_tol, compact
from .dependency import build_graph, check_input_size, model_label, tracing_state

__all__ = ["rebuild_compacted", "compact_checkpoint"]


# ----------------------------------------------------------------------------- rebuild
def _check_structured(structured_meta: Any) -> tuple[list[list[Any]], list[int]]:
    if not isinstance(structured_meta, Mapping) or not {"history", "input_size"} <= set(structured_meta):
        raise ValueError("structured metadata must be a mapping with 'history' and 'input_size'")
    try:
        size = check_input_size(structured_meta["input_size"])
    except ValueError as err:
        raise ValueError(f"structured metadata: input_size {err}") from None
    history = structured_meta["history"]
    if not isinstance(history, (list, tuple)):
        raise ValueError("structured metadata: history must be a list of [layer, is_out, indices]")
    for entry in history:
        if (
            not isinstance(entry, (list, tuple))
            or len(entry) != 3
            or not isinstance(entry[0], str)
            or not isinstance(entry[1], bool)
            or not isinstance(entry[2], (list, tuple))
            or not all(is_int(i) and i >= 0 for i in entry[2])
        ):
            raise ValueError(f"structured metadata: bad history entry {entry!r}")
    return [[e[0], e[1], list(e[2])] for e in history], size


def rebuild_compacted(model: nn.Module, structured_meta: Mapping[str, Any]) -> nn.Module:
    """Give a freshly built (uncompressed) model the compacted architecture recorded by :func:`compact`.

    Args:
        model: e.g. ``timm.create_model(arch, num_classes=...)``; shrunk in place (weights are loaded
            afterwards, e.g. by ``load_sparse``).
        structured_meta: ``{"history": [[layer, is_out, indices], ...], "input_size": [C, H, W]}``.

    Raises:
        ValueError: for malformed metadata, or a history that does not fit the model.
    """
    history, input_size = _check_structured(structured_meta)
    ref = next(iter(model.parameters()), None)
    x = torch.zeros(1, *input_size, device=ref.device if ref is not None else "cpu")
    with tracing_state(model):
        graph = build_graph(model, x)
        try:
            graph.load_pruning_history(history)
        except Exception as err:
            raise ValueError(
                f"cannot replay the pruning history on {model_label(model)}: {type(err).__name__}: {err}"
            ) from err
    setattr(model, HISTORY_ATTR, {"history": history, "input_size": input_size})
    return model


# ----------------------------------------------------------------------------- checkpoints
def compact_checkpoint(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    input_size: Sequence[int] | None = None,
    tol: float = 0.0,
) -> dict[str, Any]:
    """Load the sparse checkpoint ``src``, :func:`compact` it with its masks, save the result to ``dst``.

    Args:
        src: checkpoint folder or ``hf-hub:org/name``.
        dst: output folder (a different one).
        input_size: ``(C, H, W)`` of the tracing input (default: the model's ``pretrained_cfg["input_size"]``).
        tol: weights with ``|w| <= tol`` count as zero.

    Returns:
        The compaction report without tensors (also stored in the new checkpoint's metadata under
        ``extra["compaction"]``). The union (R_s) masks are not carried over. A checkpoint without masks
        (e.g. RMDA-trained) is written in compact storage, the form whose metadata keeps the pruning history.
    """
    tol = check_tol(tol)
    model, masks, meta = load_sparse(src)
    if Path(dst).resolve() == Path(meta["path"]).resolve():
        raise ValueError("compact_checkpoint needs a destination folder different from the source")
    size = (
        input_size
        if input_size is not None
        else (getattr(model, "pretrained_cfg", None) or {}).get("input_size")
    )
    try:
        size = check_input_size(size)
    except ValueError as err:
        raise ValueError(f"input_size {err}") from None
    _, report = compact(model, torch.zeros(1, *size), masks=masks or None, tol=tol)
    new_masks = report.pop("masks", None)
    extra = dict(meta.get("extra") or {})
    extra["compaction"] = report
    state = SparseState(new_masks, None, meta) if new_masks else None
    save_sparse(
        model,
        state,
        dst,
        model_name=meta["architecture"],
        extra_metadata=extra,
        metrics=meta.get("metrics"),
        dataset=meta.get("dataset"),
        # without masks, save_sparse writes the sparsity file (which carries the pruning history) only
        # for compact storage; plain timm cannot load a compacted architecture either way
        compact=bool(meta.get("compact")) or not new_masks,
    )
    return report


register_architecture_rebuilder(rebuild_compacted)
