"""Compaction: remove zeroed channels with torch-pruning, giving a smaller dense model with the same outputs.

``compact(model, x)`` traces the coupled channel groups (:func:`~itop_timm.structured.dependency.trace_channel_groups`)
and, in every *exact* group, removes each channel that is entirely zero:

* nobody reads it: all its ``"consumer"`` slices (input channels of the next convolutions / linear layers)
  are zero, or
* it is identically zero: all its ``"producer"`` slices are zero (output filters and biases, BatchNorm
  gamma *and* beta, depthwise kernels, layer-scale gammas).

A weight counts as zero when ``|w| <= tol`` or, given ``masks``, when its mask is False. One
``DependencyGraph.get_pruning_group(root, fn, idxs).prune()`` per group shrinks all coupled layers
together. The pruning history torch-pruning records is kept on the model
(``model.itop_timm_pruning_history``), ``save_sparse`` stores it in the checkpoint metadata under
``"structured"``, and :func:`rebuild_compacted` replays it on a fresh model for ``load_sparse``.

Masks follow the pruning through the parameters themselves: before pruning every masked-out weight is set
to NaN, torch-pruning slices the parameters, and afterwards the new mask is ``~isnan(weight)`` and the NaNs
become exact zeros again (so off-mask weights end up 0, as the masks say they are). Whatever index
mapping torch-pruning applies (concatenations, flattening, grouped convolutions), the masks follow it.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..checkpoint import (
    ARCHITECTURE_ATTR,
)
from ..masks import validate_masks
from ..validation import Range
from .dependency import (
    ChannelTrace,
    TracedGroup,
    call_model,
    model_label,
    per_position,
    trace_channel_groups,
    tracing_state,
)

__all__ = ["compact", "count_macs_and_params", "HISTORY_ATTR", "check_tol"]

_logger = logging.getLogger(__name__)

HISTORY_ATTR = ARCHITECTURE_ATTR  # the checkpoint format's extension point
# |output change| allowed on the example input for an exact compaction (summation order changes only)
_OUTPUT_RTOL = 1e-4


# ----------------------------------------------------------------------------- validation
def check_tol(tol: float) -> float:
    return Range(float, 0, math.inf, high_open=True).check("tol", tol)


def _check_input(example_inputs: Any) -> torch.Tensor:
    if not isinstance(example_inputs, torch.Tensor) or example_inputs.ndim < 2:
        raise ValueError(
            "example_inputs must be an input batch tensor such as torch.randn(1, 3, 224, 224), got "
            f"{type(example_inputs).__name__}"
            + (f" of shape {tuple(example_inputs.shape)}" if isinstance(example_inputs, torch.Tensor) else "")
        )
    return example_inputs


def _check_masks(
    masks: Mapping[str, torch.Tensor] | None, params: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Masks checked by :func:`itop_timm.masks.validate_masks`, on their parameter's device; a masked
    parameter must hold finite floating-point values (compaction marks masked-out weights with NaN)."""
    if masks is None:
        return {}
    checked = validate_masks(masks, {n: tuple(p.shape) for n, p in params.items()}, complete=False)
    for name in checked:
        p = params[name]
        if not p.is_floating_point():
            raise ValueError(f"parameter {name!r} is not floating point; it cannot carry a mask")
        if bool(torch.isnan(p).any()):
            raise ValueError(f"parameter {name!r} holds NaN values; compaction needs finite weights")
    return {name: mask.to(params[name].device) for name, mask in checked.items()}


# ----------------------------------------------------------------------------- planning
def _zero_positions(p: torch.Tensor, dim: int, mask: torch.Tensor | None, tol: float) -> torch.Tensor:
    """Bool per position along ``dim``: every element of that slice counts as zero."""
    zero = p.detach().abs() <= tol
    if mask is not None:
        zero = zero | ~mask
    return per_position(zero, dim, torch.all)


def _zero_channels(
    traced: TracedGroup, params: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor], tol: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(consumer_zero, producer_zero), bool per channel; a role without any slice is never zero."""
    n = traced.group.num_channels
    nonzero = {"consumer": torch.zeros(n, dtype=torch.long), "producer": torch.zeros(n, dtype=torch.long)}
    seen = {"consumer": torch.zeros(n, dtype=torch.long), "producer": torch.zeros(n, dtype=torch.long)}
    for s in traced.group.slices:
        p = params[s.param_name]
        zero = _zero_positions(p, s.dim, masks.get(s.param_name), tol).cpu()[s.index]
        nonzero[s.role].index_add_(0, s.channel, (~zero).long())
        seen[s.role].index_add_(0, s.channel, torch.ones_like(s.channel))
    return (
        (nonzero["consumer"] == 0) & (seen["consumer"] > 0),
        (nonzero["producer"] == 0) & (seen["producer"] > 0),
    )


def _removable(
    traced: TracedGroup, params: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor], tol: float
) -> list[int]:
    """Channels of an exact group to remove (whole classes; at least one class is always kept)."""
    consumer_zero, producer_zero = _zero_channels(traced, params, masks, tol)
    classes = traced.classes
    remove = torch.zeros_like(consumer_zero)
    for cls in classes.unique().tolist():
        members = classes == cls
        if bool(traced.pinned[members].any()):
            continue
        if int(members.sum()) == 1:
            ok = bool((consumer_zero | producer_zero)[members].all())
        else:  # a grouped convolution's input slice is shared by the class: all unread or all zero
            ok = bool(consumer_zero[members].all() or producer_zero[members].all())
        remove |= members & ok
    if bool(remove.all()):
        keep = int(classes.min())
        remove &= classes != keep
        _logger.info("compact: every channel of group %r is zero; keeping one", traced.group.name)
    return remove.nonzero().flatten().tolist()


def _fits_layers(graph: Any, traced: TracedGroup, idxs: list[int]) -> tuple[bool, list[int]]:
    """Does removing ``idxs`` leave every layer of the group at least one channel? If not, the
    channels of the first layer that would lose all of them."""
    chosen = set(idxs)
    for item in traced.tp_group:
        is_out = graph.is_out_channel_pruning_fn(item.dep.handler)
        total = graph.get_out_channels(item.dep.target) if is_out else graph.get_in_channels(item.dep.target)
        if total is None:
            continue
        hit = [int(r) for r in item.root_idxs if r is not None and int(r) in chosen]
        if len(hit) >= total:
            return False, hit
    return True, []


# ----------------------------------------------------------------------------- helpers
def _layer_names(model: nn.Module, graph: Any) -> dict[int, str]:
    names = {id(m): n for n, m in model.named_modules()}
    names.update({id(p): n for p, n in graph._param_to_name.items()})
    return names


def _count_removed(
    graph: Any, group: Any, names: Mapping[int, str], counts: dict[str, dict[str, int]]
) -> None:
    for item in group:
        target = item.dep.target.module
        has_params = isinstance(target, nn.Parameter) or (
            isinstance(target, nn.Module) and any(True for _ in target.parameters(recurse=False))
        )
        if not has_params or id(target) not in names:
            continue
        side = "out" if graph.is_out_channel_pruning_fn(item.dep.handler) else "in"
        entry = counts.setdefault(names[id(target)], {"out": 0, "in": 0})
        entry[side] += len(item.idxs)


@torch.no_grad()
def _forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    with tracing_state(model):
        out = call_model(model, x)
    return out if isinstance(out, torch.Tensor) else None


def count_macs_and_params(model: nn.Module, x: torch.Tensor) -> tuple[int, int]:
    """Multiply-accumulates of one forward pass on ``x`` and the number of parameters (torch-pruning's
    counter, with the model in its tracing state)."""
    from torch_pruning.utils import count_ops_and_params

    with tracing_state(model), torch.no_grad():
        macs, n_params = count_ops_and_params(model, x)
    return int(macs), int(n_params)


def _json_history(history: Sequence[Any]) -> list[list[Any]]:
    return [[str(name), bool(is_out), [int(i) for i in idxs]] for name, is_out, idxs in history]


# ----------------------------------------------------------------------------- compact
def compact(
    model: nn.Module,
    example_inputs: torch.Tensor,
    *,
    masks: Mapping[str, torch.Tensor] | None = None,
    tol: float = 0.0,
) -> tuple[nn.Module, dict[str, Any]]:
    """Remove, in place, every entirely-zero channel of every exact coupled group (module docstring).

    Args:
        model: the model to shrink (modified in place; build optimizers afterwards, as parameters are
            replaced by smaller ones).
        example_inputs: an input batch for tracing, e.g. ``torch.zeros(1, 3, 224, 224)``.
        masks: optional ``{parameter name: bool mask}`` (e.g. ITOP masks); masked-out weights count as zero
            and are exact zeros after compaction.
        tol: weights with ``|w| <= tol`` count as zero (``0.0``: only exact zeros).

    Returns:
        ``(model, report)``: the same model object, and a report with ``params_before`` /
        ``params_after`` / ``params_ratio``, ``macs_before`` / ``macs_after`` / ``macs_ratio``,
        ``channels_removed`` (``{layer: {"out": n, "in": n}}``), ``channels_removed_total``, ``groups``
        (seen), ``groups_removable`` (with channels removed), ``groups_non_exact``, ``non_exact_reasons``,
        ``max_abs_output_change`` (on ``example_inputs``) and, when masks were given, ``masks`` (sliced to
        the new shapes).

    Raises:
        ValueError: before anything is modified, for ``tol < 0``, masks naming unknown parameters or of the
            wrong shape / dtype, or an example input that does not run through the model (or that
            torch-pruning cannot trace).
    """
    tol = check_tol(tol)
    x = _check_input(example_inputs)
    params = dict(model.named_parameters())
    masks = _check_masks(masks, params)
    trace: ChannelTrace = trace_channel_groups(model, x)  # runs x through the model first
    graph = trace.graph
    if trace.untraced:
        raise ValueError(
            f"cannot compact {model_label(model)}: layers {trace.untraced[:5]} ran but torch-pruning could not "
            "trace them (output detached or computed without autograd)"
        )

    plan: list[tuple[TracedGroup, list[int]]] = []
    for traced in trace.groups:
        if not traced.group.exact:
            continue
        idxs = _removable(traced, params, masks, tol)
        while idxs:
            fits, hit = _fits_layers(graph, traced, idxs)
            if fits:
                break
            keep = int(traced.classes[hit[0]])
            idxs = [i for i in idxs if int(traced.classes[i]) != keep]
        if idxs:
            plan.append((traced, idxs))

    y_before = _forward(model, x)
    macs_before, params_before = count_macs_and_params(model, x)
    masked_nonzero = any(bool((params[n].detach()[~m] != 0).any()) for n, m in masks.items())
    names = _layer_names(model, graph)
    counts: dict[str, dict[str, int]] = {}
    history_start = len(graph.pruning_history())
    requires_grad = {n: p.requires_grad for n, p in params.items()}

    with torch.no_grad():
        for name, mask in masks.items():
            params[name].masked_fill_(~mask, float("nan"))
    new_masks: dict[str, torch.Tensor] = {}
    try:
        for traced, idxs in plan:
            root, fn = traced.tp_group[0].dep.target.module, traced.tp_group[0].dep.handler
            group = graph.get_pruning_group(root, fn, idxs)
            _count_removed(graph, group, names, counts)
            group.prune()
    finally:
        new_params = dict(model.named_parameters())
        with torch.no_grad():
            for name in masks:
                p = new_params[name]
                new_masks[name] = ~torch.isnan(p)
                p.masked_fill_(~new_masks[name], 0.0)
        for name, p in new_params.items():
            p.requires_grad_(requires_grad.get(name, True))

    entries = _json_history(graph.pruning_history()[history_start:])
    previous = getattr(model, HISTORY_ATTR, None)
    if entries or previous:
        input_size = previous["input_size"] if previous else list(x.shape[1:])
        history = (list(previous["history"]) if previous else []) + entries
        setattr(model, HISTORY_ATTR, {"history": history, "input_size": [int(s) for s in input_size]})

    try:
        y_after = _forward(model, x)
        macs_after, params_after = count_macs_and_params(model, x)
    except Exception as err:
        raise RuntimeError(
            f"compact({model_label(model)}): the compacted model no longer runs ({type(err).__name__}: {err}); "
            "a layer keeps channel counts torch-pruning cannot update. Please report this model."
        ) from err
    change = float((y_after - y_before).abs().max()) if y_before is not None and y_after is not None else 0.0
    scale = float(y_before.abs().max()) if y_before is not None and y_before.numel() else 1.0
    if tol == 0 and not masked_nonzero and change > _OUTPUT_RTOL * max(1.0, scale):
        _logger.warning(
            "compact(%s): the outputs changed by %.3g on the example input although only exact zeros were "
            "removed; please report this model (a group was wrongly judged exact)",
            model_label(model),
            change,
        )

    reasons = Counter(t.reason for t in trace.groups if t.reason is not None)
    report: dict[str, Any] = {
        "params_before": params_before,
        "params_after": params_after,
        "params_ratio": params_after / max(params_before, 1),
        "macs_before": macs_before,
        "macs_after": macs_after,
        "macs_ratio": macs_after / max(macs_before, 1),
        "channels_removed": counts,
        "channels_removed_total": sum(len(idxs) for _, idxs in plan),
        "groups": len(trace.groups),
        "groups_removable": len(plan),
        "groups_non_exact": sum(1 for t in trace.groups if not t.group.exact),
        "non_exact_reasons": dict(reasons),
        "max_abs_output_change": change,
    }
    if masks:
        report["masks"] = new_masks
    _logger.info(
        "compact(%s): %d channels removed in %d groups; params %d -> %d, MACs %d -> %d",
        model_label(model),
        report["channels_removed_total"],
        len(plan),
        params_before,
        params_after,
        macs_before,
        macs_after,
    )
    return model, report
