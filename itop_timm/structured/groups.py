"""Coupled channel groups: the units of structured sparsity that can really be removed.

A :class:`ChannelGroup` is one torch-pruning dependency group (channels coupled across residual adds,
BatchNorm, depthwise convolutions, concatenations...) seen as plain tensor slices: for every
parameter it touches, which positions along which dimension belong to which channel of the group.
Group-LASSO regularisers (``prox.GroupLasso``) shrink each channel's slices jointly, and
``compact`` removes channels whose slices are all zero, so a zeroed group is removable as one unit.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = [
    "ChannelSlice",
    "ChannelGroup",
    "channel_sq_norms",
    "coupled_channel_groups",
    "trace_channel_groups",
    "TracedGroup",
    "ChannelTrace",
    "group_item_slices",
]

_logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ChannelSlice:
    """Part of one parameter that belongs to a channel group.

    Attributes:
        param_name: name in ``model.named_parameters()``.
        dim: the dimension that is sliced.
        index: positions along ``dim`` that belong to the group (LongTensor).
        channel: for each position in ``index``, the group channel it belongs to (LongTensor, same length).
        role: ``"producer"`` (the channel's values are computed from it: conv/linear output channels, their
            bias, per-channel norm affine parameters, depthwise kernels) or ``"consumer"`` (it reads the
            channel: conv/linear input channels).
    """

    param_name: str
    dim: int
    index: torch.Tensor
    channel: torch.Tensor
    role: str

    def numel_per_position(self, shape: torch.Size) -> int:
        return int(torch.Size(shape).numel() // shape[self.dim])


@dataclass
class ChannelGroup:
    """One coupled group of ``num_channels`` channels.

    Attributes:
        name: the root layer (as named in the model) the group was traced from.
        num_channels: channels in the group.
        slices: every parameter slice coupled to these channels.
        exact: False when removing a zero channel would still change the outputs (e.g. the group runs
            through a LayerNorm/GroupNorm that normalises across channels); such groups are regularised
            but never removed.
        numel: elements per channel summed over all slices (``sqrt(numel)`` scales the group-LASSO threshold).
    """

    name: str
    num_channels: int
    slices: list[ChannelSlice] = field(default_factory=list)
    exact: bool = True
    numel: torch.Tensor | None = None  # LongTensor [num_channels]


def channel_sq_norms(
    group: ChannelGroup, params: dict[str, torch.Tensor], roles: tuple[str, ...] = ("producer", "consumer")
) -> torch.Tensor:
    """Sum of squares of every channel's slices (only slices whose role is in ``roles``)."""
    device = next(iter(params.values())).device
    out = torch.zeros(group.num_channels, dtype=torch.float32, device=device)
    for s in group.slices:
        if s.role not in roles:
            continue
        p = params[s.param_name]
        dims = [d for d in range(p.ndim) if d != s.dim]
        per_position = p.detach().float().pow(2).sum(dim=dims) if dims else p.detach().float().pow(2)
        out.index_add_(0, s.channel.to(device), per_position[s.index.to(device)])
    return out


# ----------------------------------------------------------------------------- torch-pruning groups
# Which operations a zeroed channel may pass through and still be removed exactly. Everything else
# (LayerNorm/GroupNorm, attention, matrix products, unknown ops...) makes a group non-exact.
_POINTWISE_ZERO = frozenset(  # f(0) = 0, channel-wise (or layout-only): a zero channel stays zero
    "relu relu6 gelu silu hardswish leakyrelu elu celu selu tanh mish hardtanh softsign neg clone tocopy "
    "permute transpose squeeze unsqueeze alias avgpool2d avgpool3d maxpool2dwithindices "
    "maxpool3dwithindices adaptiveavgpool2d adaptiveavgpool3d adaptivemaxpool2d adaptivemaxpool3d "
    "constantpadnd reflectionpad2d replicationpad2d upsamplenearest2d upsamplebilinear2d".split()
)
_REDUCTIONS = frozenset("mean sum amax amin max min".split())  # fine unless they reduce over channels
_GATES = frozenset("sigmoid hardsigmoid".split())  # channel-wise, but f(0) != 0
_LINEAR_INTERNAL = frozenset("addmm mm".split())  # the matrix product inside nn.Linear on >2-D inputs
_BN_INTERNAL = frozenset("nativebatchnorm cudnnbatchnorm nativebatchnormlegitnotraining".split())
_NORM_OPS = frozenset("nativelayernorm nativegroupnorm layernorm groupnorm".split())
_ZERO_ACTS = frozenset(  # activations (in timm's BatchNormAct2d) with act(0) = 0
    "identity relu relu6 silu swish gelu gelutanh quickgelu hardswish leakyrelu elu celu selu tanh mish "
    "hardmish hardtanh softsign".split()
)


@dataclass
class TracedGroup:
    """A :class:`ChannelGroup` together with the torch-pruning group it was made from (for ``compact``).

    Attributes:
        group: the plain-tensor view of the group.
        tp_group: the torch-pruning ``Group`` over all channels; its first item is the root operation.
        reason: why the group is not exact (``None`` when it is).
        classes: LongTensor ``[num_channels]``; channels with the same value can only be removed together
            (a grouped convolution must keep the same number of channels in each of its groups). The value
            is the smallest channel of the class.
        pinned: BoolTensor ``[num_channels]``; channels that can never be removed (their grouped-convolution
            siblings lie outside this group).
    """

    group: ChannelGroup
    tp_group: Any
    reason: str | None
    classes: torch.Tensor
    pinned: torch.Tensor


@dataclass
class ChannelTrace:
    """The torch-pruning ``DependencyGraph`` of a model and its traced channel groups.

    ``untraced`` names layers with parameters that ran in the forward pass but are missing from
    torch-pruning's graph (their output was detached or computed without autograd): pruning the channels
    they read would break them, so ``compact`` refuses such models.
    """

    graph: Any
    groups: list[TracedGroup]
    untraced: list[str] = field(default_factory=list)


def model_label(model: nn.Module) -> str:
    """The timm architecture name of ``model`` (``pretrained_cfg["architecture"]``) or its class name."""
    cfg = getattr(model, "pretrained_cfg", None)
    arch = cfg.get("architecture") if isinstance(cfg, dict) else None
    return str(arch) if arch else type(model).__name__


def classifier_modules(model: nn.Module) -> list[nn.Module]:
    """The classifier layer(s) of a timm model (``model.get_classifier()``); ``[]`` for other models."""
    get = getattr(model, "get_classifier", None)
    if not callable(get):
        return []
    head = get()
    heads = head if isinstance(head, (tuple, list)) else [head]
    return [h for h in heads if isinstance(h, nn.Module)]


def call_model(model: nn.Module, example_inputs: Any) -> Any:
    """``model(x)`` for a tensor, ``model(*x)`` for a tuple/list, ``model(**x)`` for a dict."""
    if isinstance(example_inputs, dict):
        return model(**example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return model(*example_inputs)
    return model(example_inputs)


def _describe(example_inputs: Any) -> str:
    if isinstance(example_inputs, torch.Tensor):
        return f"of shape {tuple(example_inputs.shape)}"
    return f"({type(example_inputs).__name__})"


def run_example(model: nn.Module, example_inputs: Any, called: list[nn.Module] | None = None) -> Any:
    """Run ``example_inputs`` through ``model`` without gradients; returns the output, and appends the
    modules that ran to ``called`` if given.

    Raises:
        ValueError: naming the model and the innermost layer that failed, if the forward pass fails.
    """
    stack: list[nn.Module] = []
    names = {id(m): n for n, m in model.named_modules()}

    def enter(module: nn.Module, args: Any) -> None:
        stack.append(module)
        if called is not None:
            called.append(module)

    def leave(module: nn.Module, args: Any, output: Any) -> None:
        if stack:
            stack.pop()

    handles = []
    for module in model.modules():
        handles.append(module.register_forward_pre_hook(enter))
        handles.append(module.register_forward_hook(leave))
    try:
        with torch.no_grad():
            return call_model(model, example_inputs)
    except Exception as err:
        failing = next((m for m in reversed(stack) if names.get(id(m))), None)
        where = f" (layer {names[id(failing)]!r}, {type(failing).__name__})" if failing is not None else ""
        raise ValueError(
            f"the example input {_describe(example_inputs)} does not run through {model_label(model)}{where}: "
            f"{type(err).__name__}: {err}"
        ) from err
    finally:
        for h in handles:
            h.remove()


class tracing_state:
    """Context manager: eval mode and ``requires_grad=True`` on every parameter (torch-pruning traces the
    autograd graph), restoring each module's train/eval flag and each parameter's ``requires_grad`` (by
    name, since pruning replaces parameter objects) on exit."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __enter__(self) -> nn.Module:
        self._training = [(m, m.training) for m in self.model.modules()]
        self._requires_grad = {n: p.requires_grad for n, p in self.model.named_parameters()}
        self.model.eval()
        for p in self.model.parameters():
            p.requires_grad_(True)
        return self.model

    def __exit__(self, *exc: object) -> None:
        modes = {training for _, training in self._training}
        if len(modes) == 1:  # the usual case: through train(), which some layers override
            self.model.train(modes.pop())
        else:
            for module, training in self._training:
                module.training = training
        for name, p in self.model.named_parameters():
            p.requires_grad_(self._requires_grad.get(name, True))


def build_graph(model: nn.Module, example_inputs: Any) -> Any:
    """A torch-pruning ``DependencyGraph`` of ``model`` (call inside :class:`tracing_state`).

    Raises:
        ValueError: naming the model when torch-pruning cannot trace it.
    """
    import torch_pruning as tp

    try:
        with torch.enable_grad():
            return tp.DependencyGraph().build_dependency(
                model, example_inputs, forward_fn=call_model, verbose=False
            )
    except Exception as err:
        raise ValueError(
            f"torch-pruning cannot trace {model_label(model)}: {type(err).__name__}: {err}"
        ) from err


def _ignored_ids(model: nn.Module, ignored_layers: Iterable[nn.Module] | None) -> set[int]:
    own = {id(m) for m in model.modules()}
    ignored: set[int] = set()
    for layer in [*(ignored_layers or []), *classifier_modules(model)]:
        if not isinstance(layer, nn.Module):
            raise ValueError(
                f"ignored_layers must hold nn.Module layers of the model, got {type(layer).__name__}"
            )
        if id(layer) not in own:
            raise ValueError(
                f"ignored layer {type(layer).__name__} is not a submodule of {model_label(model)}"
            )
        ignored.update(id(m) for m in layer.modules())
    return ignored


def _iter_tp_groups(graph: Any, model: nn.Module, ignored: set[int]) -> Iterable[Any]:
    """torch-pruning's ``get_all_groups(root_module_types=(conv, linear))``, naming the layer on failure."""
    from torch_pruning import ops

    names = {id(m): n for n, m in model.named_modules()}
    visited: set[int] = set()
    for module in list(graph.module2node):
        if id(module) in ignored or id(module) in visited:
            continue
        if not isinstance(module, (ops.TORCH_CONV, ops.TORCH_LINEAR)):
            continue
        pruner = graph.get_pruner_of_module(module)
        if pruner is None or pruner.get_out_channels(module) is None:
            continue
        try:
            tp_group = graph.get_pruning_group(
                module, pruner.prune_out_channels, list(range(pruner.get_out_channels(module)))
            )
        except Exception as err:
            raise ValueError(
                f"torch-pruning cannot group the channels of layer {names.get(id(module))!r} "
                f"in {model_label(model)}: {type(err).__name__}: {err}"
            ) from err
        prunable = True
        for item in tp_group:
            if graph.is_out_channel_pruning_fn(item.dep.handler):
                visited.add(id(item.dep.target.module))
                prunable &= id(item.dep.target.module) not in ignored
        if prunable:
            yield tp_group


def _op_name(node: Any) -> str:
    """``"relu"`` for a node whose autograd function is ``ReluBackward0``."""
    name = node.grad_fn.name() if node.grad_fn is not None and hasattr(node.grad_fn, "name") else ""
    name = name.split("::")[-1].lower()
    cut = name.find("backward")
    return name[:cut] if cut >= 0 else name


def _saved_sizes(grad_fn: Any) -> tuple[int, ...] | None:
    for attr in ("_saved_self_sym_sizes", "_saved_self_sizes"):
        sizes = getattr(grad_fn, attr, None)
        if sizes is not None:
            return tuple(int(s) for s in sizes)
    saved = getattr(grad_fn, "_saved_self", None)
    return tuple(saved.shape) if isinstance(saved, torch.Tensor) else None


def _is_weight_view(node: Any) -> bool:
    """An op without traced inputs (e.g. ``weight.t()`` inside ``nn.Linear``): it carries no activations."""
    from torch_pruning import ops

    return node.type == ops.OPTYPE.ELEMENTWISE and not node.inputs


def _is_linear_internal(node: Any) -> bool:
    from torch_pruning import ops

    return (
        node.type == ops.OPTYPE.ELEMENTWISE
        and _op_name(node) in _LINEAR_INTERNAL
        and bool(node.outputs)
        and all(o.type == ops.OPTYPE.LINEAR for o in node.outputs)
    )


def _has_flatten_mapping(node: Any) -> bool:
    from torch_pruning.dependency.index_mapping import _FlattenIndexMapping

    deps = list(node.dependencies) + [d for n in node.inputs for d in n.dependencies if d.target is node]
    return any(isinstance(m, _FlattenIndexMapping) for d in deps for m in d.index_mapping)


def _node_reason(node: Any, names: dict[int, str]) -> str | None:
    """Why a channel-carrying node makes its group non-exact (``None``: it does not)."""
    from torch_pruning import ops

    t = node.type
    label = names.get(id(node.module)) or _op_name(node) or t.name.lower()
    if t == ops.OPTYPE.OUTPUT or not node.outputs:  # the autograd graph is traced back from the outputs
        return "its channels are model outputs"
    if t == ops.OPTYPE.LN:
        return f"LayerNorm {label!r} normalises across the channels"
    if t == ops.OPTYPE.GN:
        return f"GroupNorm {label!r} normalises across the channels"
    if t in (ops.OPTYPE.MHA, ops.OPTYPE.LSTM, ops.OPTYPE.EMBED, ops.OPTYPE.CUSTOMIZED):
        return f"{t.name.lower()} layer {label!r} is not supported exactly"
    if t in (ops.OPTYPE.UNBIND, ops.OPTYPE.EXPAND):
        return f"{t.name.lower()} operation (attention heads?) is only approximated by torch-pruning"
    if t == ops.OPTYPE.SPLIT:  # torch.split(x, sizes) keeps its sizes in the model's code
        return "a split whose sizes are fixed in the model's code"
    if t == ops.OPTYPE.CONCAT:
        dim = getattr(node.grad_fn, "_saved_dim", None)
        if dim == 1 and node.module.offsets is not None and node.enable_index_mapping:
            return None
        return f"concat along dimension {dim} is not a channel concat torch-pruning maps"
    if t == ops.OPTYPE.SLICE:
        sizes = _saved_sizes(node.grad_fn)
        dim = getattr(node.grad_fn, "_saved_dim", None)
        if sizes is not None and len(sizes) == 4 and dim is not None and dim % 4 != 1:
            return None
        return "a slice that may cut the channel dimension"
    if t == ops.OPTYPE.RESHAPE:
        sizes = _saved_sizes(node.grad_fn)
        if node.outputs and all(_is_linear_internal(o) for o in node.outputs):
            return None  # the input view of nn.Linear on a >2-D tensor
        if sizes is not None and (len(sizes) <= 2 or (len(sizes) == 4 and sizes[2] * sizes[3] == 1)):
            return None  # flattening pooled features / a per-channel parameter
        if _has_flatten_mapping(node):
            return None  # a flatten torch-pruning maps (channel c -> features c*HW ... (c+1)*HW-1)
        return f"a reshape of {sizes} that may mix channels"
    if t != ops.OPTYPE.ELEMENTWISE:
        return None  # conv, depthwise conv, linear, batch/instance norm, prelu, parameter
    if _is_weight_view(node):
        return None  # e.g. weight.t() inside nn.Linear
    op = _op_name(node)
    if op in _POINTWISE_ZERO or op in _GATES or op in ("add", "sub", "mul"):
        return None
    if op in _REDUCTIONS:
        sizes = _saved_sizes(node.grad_fn)
        dims = getattr(node.grad_fn, "_saved_dim", None)
        if sizes is not None and len(sizes) in (4, 5) and dims is not None:
            dims = (dims,) if isinstance(dims, int) else tuple(dims)
            if dims and 1 not in {d % len(sizes) for d in dims}:
                return None
        return f"reduction {op} may run over the channel dimension"
    if op == "div":
        nxt = node.grad_fn.next_functions
        return None if len(nxt) > 1 and nxt[1][0] is None else "a division by a channel"
    if op in _LINEAR_INTERNAL:
        return None if _is_linear_internal(node) else f"a matrix product ({op}) outside a linear layer"
    if op in _BN_INTERNAL:
        if node.outputs and all(o.type == ops.OPTYPE.BN for o in node.outputs):
            return None
        return "a functional batch norm whose statistics torch-pruning does not prune"
    if op in _NORM_OPS:
        return f"normalisation {op} across the channels"
    return f"operation {op or 'unknown'!r} cannot be proven channel-wise"


# the most telling reason first: outputs, norms across channels, attention, then the rest
_REASON_RANK = {
    "OUTPUT": 0,
    "LN": 1,
    "GN": 1,
    "MHA": 2,
    "UNBIND": 2,
    "EXPAND": 2,
    "SPLIT": 3,
    "ELEMENTWISE": 4,
}


class _ZeroFlow:
    """Is channel ``c`` identically zero at a node when all its producer slices are zero?"""

    def __init__(self, carrying: set[Any]) -> None:
        self.carrying = carrying
        self.memo: dict[Any, bool] = {}

    def inputs_zero(self, node: Any, any_: bool = False) -> bool:
        ins = [n for n in node.inputs if not _is_weight_view(n)]
        flags = [n in self.carrying and self(n) for n in ins]
        return bool(flags) and (any(flags) if any_ else all(flags))

    def __call__(self, node: Any) -> bool:
        if node not in self.memo:
            self.memo[node] = False  # a cycle (never in autograd graphs) counts as non-zero
            self.memo[node] = self._zero(node)
        return self.memo[node]

    def _zero(self, node: Any) -> bool:
        from torch_pruning import ops

        t, m = node.type, node.module
        if t in (ops.OPTYPE.CONV, ops.OPTYPE.DEPTHWISE_CONV, ops.OPTYPE.LINEAR, ops.OPTYPE.PARAMETER):
            return True  # its output channel is a producer slice: zero weight and bias
        if t == ops.OPTYPE.BN:
            act = getattr(m, "act", None)
            act_ok = act is None or type(act).__name__.lower() in _ZERO_ACTS
            return bool(m.affine) and act_ok  # gamma = beta = 0 -> 0 whatever the running stats
        if t == ops.OPTYPE.IN:
            return bool(getattr(m, "affine", False)) or self.inputs_zero(node)
        if t == ops.OPTYPE.CONCAT:  # the other inputs bring other groups' channels
            ins = [n for n in node.inputs if n in self.carrying]
            return bool(ins) and all(self(n) for n in ins)
        if t in (ops.OPTYPE.PRELU, ops.OPTYPE.RESHAPE, ops.OPTYPE.SLICE):
            return self.inputs_zero(node)
        if t != ops.OPTYPE.ELEMENTWISE:
            return False
        op = _op_name(node)
        if op == "mul":
            return self.inputs_zero(node, any_=True)
        if op in ("add", "sub"):  # a constant (non-traced) operand may be nonzero
            return all(f[0] is not None for f in node.grad_fn.next_functions) and self.inputs_zero(node)
        if op in _POINTWISE_ZERO or op in _REDUCTIONS or op in _LINEAR_INTERNAL or op == "div":
            return self.inputs_zero(node)
        return False  # gates (sigmoid(0) = 0.5) and anything else


def _inexact_reason(graph: Any, tp_group: Any, names: dict[int, str]) -> str | None:
    carrying: dict[Any, None] = {}
    consumers: dict[Any, None] = {}
    for item in tp_group:
        node = item.dep.target
        if graph.is_out_channel_pruning_fn(item.dep.handler):
            carrying[node] = None
        else:
            consumers[node] = None
    found = [
        (_REASON_RANK.get(node.type.name, 9), r) for node in carrying if (r := _node_reason(node, names))
    ]
    if found:
        return min(found, key=lambda rank_reason: rank_reason[0])[1]
    zero = _ZeroFlow(set(carrying))
    for node in consumers:
        if not zero.inputs_zero(node):
            label = names.get(id(node.module), node.name)
            return f"a zero channel is not zero where {label!r} reads it (a gate or constant on the way)"
    return None


def group_item_slices(
    graph: Any, item: Any, param_names: dict[int, str], num_channels: int | None = None
) -> tuple[list[ChannelSlice], str | None]:
    """The parameter slices of one torch-pruning group item, with ``channel`` = the root index.

    Returns the slices and, if the item cannot be described exactly, why (else ``None``). A grouped
    convolution's input-channel slice lists each weight position once, for the channel of its first group
    (the siblings in the other groups share that position and are removed with it).
    """
    from torch_pruning import ops
    from torch_pruning.pruner import function as F

    dep, node = item.dep, item.dep.target
    module, handler = node.module, dep.handler
    pruner = getattr(handler, "__self__", None)
    is_out = handler == getattr(pruner, "prune_out_channels", None)
    limit = num_channels if num_channels is not None else float("inf")
    pairs = [
        (int(i), int(r))
        for i, r in zip(item.idxs, item.root_idxs, strict=True)
        if r is not None and 0 <= int(r) < limit
    ]
    reason = None if len(pairs) == len(item.idxs) else "torch-pruning's index mapping lost some channels"
    out: list[ChannelSlice] = []
    problems: list[str] = []

    def add(param: torch.Tensor | None, dim: int, role: str, pos_of=lambda i: i, keep=lambda i: True) -> None:
        if param is None or id(param) not in param_names:
            return
        dim = dim % param.ndim
        kept = [(pos_of(i), r) for i, r in pairs if keep(i)]
        inside = [(p, r) for p, r in kept if 0 <= p < param.shape[dim]]
        if len(inside) < len(kept):
            problems.append(f"torch-pruning's indices run past {param_names[id(param)]!r} (dim {dim})")
            kept = inside
        if not kept:
            return
        out.append(
            ChannelSlice(
                param_names[id(param)],
                dim,
                torch.tensor([p for p, _ in kept], dtype=torch.long),
                torch.tensor([r for _, r in kept], dtype=torch.long),
                role,
            )
        )

    if isinstance(module, nn.Parameter):
        add(module, node.pruning_dim, "producer")
    elif isinstance(module, ops.TORCH_CONV):
        w, groups, tr = module.weight, module.groups, module.transposed
        if isinstance(pruner, F.DepthwiseConvPruner):
            add(w, 0, "producer")
            add(module.bias, 0, "producer")
            reason = reason or ("a transposed depthwise convolution" if tr else None)
        elif is_out:
            per = module.out_channels // groups
            add(w, 1 if tr else 0, "producer", pos_of=(lambda i: i % per) if tr else (lambda i: i))
            add(module.bias, 0, "producer")
            reason = reason or ("a transposed grouped convolution" if tr and groups > 1 else None)
        else:
            per = module.in_channels // groups
            if tr:
                add(w, 0, "consumer")
                reason = reason or ("a transposed grouped convolution" if groups > 1 else None)
            else:
                add(w, 1, "consumer", keep=lambda i: i < per)
    elif isinstance(module, ops.TORCH_LINEAR):
        add(module.weight, 0 if is_out else 1, "producer" if is_out else "consumer")
        if is_out:
            add(module.bias, 0, "producer")
    elif isinstance(module, (ops.TORCH_BATCHNORM, ops.TORCH_GROUPNORM, ops.TORCH_INSTANCENORM)):
        add(module.weight, 0, "producer")
        add(module.bias, 0, "producer")
    elif isinstance(module, ops.TORCH_LAYERNORM):
        pdim = node.pruning_dim if node.pruning_dim < 0 else node.pruning_dim - len(module.normalized_shape)
        if len(module.normalized_shape) >= -pdim:
            for p in (module.weight, module.bias):
                if p is not None:
                    add(p, p.ndim + pdim, "producer")
    elif isinstance(module, ops.TORCH_PRELU):
        if module.num_parameters > 1:
            add(module.weight, 0, "producer")
    elif isinstance(module, ops.TORCH_EMBED):
        add(module.weight, 1, "producer")
    elif isinstance(module, ops.TORCH_MHA):
        e = module.embed_dim
        for k in range(3):
            add(module.in_proj_weight, 0, "producer", pos_of=lambda i, k=k: i + k * e)
            add(module.in_proj_bias, 0, "producer", pos_of=lambda i, k=k: i + k * e)
        add(module.in_proj_weight, 1, "consumer")
        add(module.out_proj.weight, 0, "producer")
        add(module.out_proj.bias, 0, "producer")
        add(module.out_proj.weight, 1, "consumer")
        reason = reason or "nn.MultiheadAttention is not supported exactly"
    elif isinstance(module, nn.Module) and any(True for _ in module.parameters(recurse=False)):
        reason = reason or f"layer type {type(module).__name__} is not supported exactly"
        _logger.debug("no slices for the parameters of %s", type(module).__name__)
    return out, reason or (problems[0] if problems else None)


def _merge_slices(slices: list[ChannelSlice]) -> list[ChannelSlice]:
    """One slice per (parameter, dim, role); duplicate (position, channel) pairs dropped."""
    merged: dict[tuple[str, int, str], dict[tuple[int, int], None]] = {}
    for s in slices:
        pairs = merged.setdefault((s.param_name, s.dim, s.role), {})
        pairs.update(dict.fromkeys(zip(s.index.tolist(), s.channel.tolist(), strict=True)))
    out = []
    for (name, dim, role), pairs in merged.items():
        pos = torch.tensor([p for p, _ in pairs], dtype=torch.long)
        ch = torch.tensor([c for _, c in pairs], dtype=torch.long)
        out.append(ChannelSlice(name, dim, pos, ch, role))
    return out


def _unmerged_items(graph: Any, tp_group: Any) -> list[tuple[Any, list[Any]]]:
    """The (dependency, [(idx, root_idx), ...]) pairs torch-pruning's traversal visits for the whole group,
    before ``get_pruning_group`` merges them and keeps one root index per position."""
    from torch_pruning import _helpers

    root = tp_group[0].dep
    start = [_helpers._HybridIndex(idx=int(i), root_idx=int(i)) for i in tp_group[0].idxs]
    items = [(root, start)]
    stack = [(root.target, root.handler, start)]
    visited: set[Any] = set()
    seen: set[tuple[Any, Any, tuple[Any, ...]]] = set()
    while stack:
        node, fn, idxs = stack.pop()
        visited.add(node)
        for dep in node.dependencies:
            if not dep.is_triggered_by(fn):
                continue
            new = idxs
            for mapping in dep.index_mapping:
                if mapping is not None:
                    new = mapping(new)
            if not new:
                continue
            key = (dep.target, dep.handler, tuple(new))
            if dep.target in visited and key in seen:
                continue
            seen.add(key)
            items.append((dep, new))
            stack.append((dep.target, dep.handler, new))
    return items


def _channel_classes(graph: Any, tp_group: Any, num: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Union-find over channels that must be removed together: channels torch-pruning reaches at the same
    position of some layer (e.g. GhostNet's ``cat([x, depthwise(x)])``), and grouped convolutions' slots."""
    from torch_pruning import ops
    from torch_pruning.pruner import function as F

    parent = list(range(num))
    pinned = torch.zeros(num, dtype=torch.bool)

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    def union(roots: list[int]) -> None:
        for r in roots[1:]:
            a, b = find(roots[0]), find(r)
            parent[max(a, b)] = min(a, b)

    reached: dict[tuple[Any, Any, int], set[int]] = {}
    for dep, idxs in _unmerged_items(graph, tp_group):
        for h in idxs:
            if h.root_idx is not None and 0 <= int(h.root_idx) < num:
                reached.setdefault((dep.target, dep.handler, int(h.idx)), set()).add(int(h.root_idx))
    for roots in reached.values():
        if len(roots) > 1:
            union(sorted(roots))

    for item in tp_group:
        module, handler = item.dep.target.module, item.dep.handler
        pruner = getattr(handler, "__self__", None)
        if not isinstance(module, ops.TORCH_CONV) or module.groups == 1:
            continue
        if isinstance(pruner, F.DepthwiseConvPruner):
            continue
        is_out = handler == pruner.prune_out_channels
        per = (module.out_channels if is_out else module.in_channels) // module.groups
        present = {int(i): r for i, r in zip(item.idxs, item.root_idxs, strict=True)}
        for slot in {i % per for i in present}:
            roots = [present.get(slot + k * per) for k in range(module.groups)]
            known = [int(r) for r in roots if r is not None and 0 <= int(r) < num]
            if len(known) < len(roots):
                pinned[known] = True
                continue
            union(known)
    classes = torch.tensor([find(c) for c in range(num)], dtype=torch.long)
    return classes, torch.isin(classes, classes[pinned])


def _numel(slices: Sequence[ChannelSlice], params: dict[str, torch.Tensor], num: int) -> torch.Tensor:
    numel = torch.zeros(num, dtype=torch.long)
    for s in slices:
        per = s.numel_per_position(params[s.param_name].shape)
        numel.index_add_(0, s.channel, torch.full((s.index.numel(),), per, dtype=torch.long))
    return numel


def trace_channel_groups(
    model: nn.Module, example_inputs: Any, *, ignored_layers: Iterable[nn.Module] | None = None
) -> ChannelTrace:
    """Trace ``model`` with torch-pruning and describe every coupled channel group (see
    :func:`coupled_channel_groups`); also returns the ``DependencyGraph`` and torch-pruning groups."""
    ignored = _ignored_ids(model, ignored_layers)
    names = {id(m): n for n, m in model.named_modules()}
    params = dict(model.named_parameters())
    param_names = {id(p): n for n, p in params.items()}
    traced: list[TracedGroup] = []
    called: list[nn.Module] = []
    with tracing_state(model):
        run_example(model, example_inputs, called)
        graph = build_graph(model, example_inputs)
        untraced = _untraced_layers(graph, called, names, ignored)
        if untraced:
            _logger.warning(
                "%s: layers %s ran but are not in torch-pruning's graph (detached output?); their channels "
                "are not grouped",
                model_label(model),
                untraced[:5],
            )
        for tp_group in _iter_tp_groups(graph, model, ignored):
            root = tp_group[0].dep.target.module
            num = graph.get_out_channels(root)
            slices: list[ChannelSlice] = []
            reason = None
            for item in tp_group:
                item_slices, item_reason = group_item_slices(graph, item, param_names, num)
                slices += item_slices
                reason = reason or item_reason
            slices = _merge_slices(slices)
            reason = reason or _inexact_reason(graph, tp_group, names)
            classes, pinned = _channel_classes(graph, tp_group, num)
            group = ChannelGroup(
                name=names.get(id(root), type(root).__name__),
                num_channels=num,
                slices=slices,
                exact=reason is None,
                numel=_numel(slices, params, num),
            )
            traced.append(TracedGroup(group, tp_group, reason, classes, pinned))
    return ChannelTrace(graph, traced, untraced)


def _untraced_layers(
    graph: Any, called: list[nn.Module], names: dict[int, str], ignored: set[int]
) -> list[str]:
    """Layers (or their own unwrapped parameters) that ran but are missing from the graph."""
    from torch_pruning import ops

    layer_types = (
        ops.TORCH_CONV,
        ops.TORCH_LINEAR,
        ops.TORCH_BATCHNORM,
        ops.TORCH_LAYERNORM,
        ops.TORCH_GROUPNORM,
        ops.TORCH_INSTANCENORM,
        ops.TORCH_PRELU,
        ops.TORCH_EMBED,
        ops.TORCH_MHA,
        ops.TORCH_LSTM,
    )
    in_graph = {id(m) for m in graph.module2node}
    unwrapped = {id(p) for p, _ in graph.unwrapped_parameters}
    out: dict[str, None] = {}
    for module in called:
        name = names.get(id(module))
        if not name or id(module) in ignored:
            continue
        if isinstance(module, layer_types):
            if id(module) not in in_graph:
                out[name] = None
        elif any(id(p) in unwrapped and id(p) not in in_graph for p in module.parameters(recurse=False)):
            out[name] = None
    return list(out)


def coupled_channel_groups(
    model: nn.Module, example_inputs: Any, *, ignored_layers: Iterable[nn.Module] | None = None
) -> list[ChannelGroup]:
    """torch-pruning's coupled channel groups of ``model`` as :class:`ChannelGroup` s.

    One group per torch-pruning dependency group rooted at a convolution or linear layer
    (``get_all_groups(root_module_types=(conv, linear))``), skipping groups that would prune the classifier's
    outputs (``model.get_classifier()`` for timm models) or an ``ignored_layers`` layer. Each group lists,
    for every parameter it touches, the positions along the pruned dimension and the group channel of each
    position (through torch-pruning's index mapping: concatenations, flattening, splits), with the role
    ``"producer"`` (output channels, biases, norm affine parameters, depthwise kernels, layer-scale
    ``gamma``) or ``"consumer"`` (input channels of convolutions / linear layers). Each position is listed
    once: a grouped convolution's input position is shared by the same slot of every group and is listed
    for the channel of the first group; a position torch-pruning reaches from several channels (GhostNet's
    ``cat([x, depthwise(x)])``) is listed for the first of them. ``compact`` removes such channels together
    (:class:`TracedGroup` ``classes``), so a single one of them is not removable on its own.

    ``exact`` is True only when removing a zero channel provably leaves the outputs unchanged: every
    operation the channels pass through is channel-wise and known (convolutions, linear layers, batch /
    instance norm, zero-preserving activations, additions, products, pooling, flattening, channel
    concatenation), a channel whose producer slices are all zero is zero wherever it is read, and the
    channels are not model outputs. LayerNorm / GroupNorm (they normalise across channels), attention
    (torch-pruning only approximates it), unknown operations and reshapes that may mix channels make a
    group non-exact.

    The model is traced in eval mode (torch-pruning follows autograd, so the tracing pass records a graph
    but never runs backward); each module's train/eval mode and each parameter's ``requires_grad`` are
    restored afterwards.

    Args:
        model: the model (a timm model or any ``nn.Module``).
        example_inputs: an input batch, e.g. ``torch.randn(1, 3, 224, 224)`` (a tuple/list is unpacked).
        ignored_layers: layers whose output channels must not be pruned (their groups are left out).

    Raises:
        ValueError: if the example input does not run through the model, or torch-pruning cannot trace
            it (naming the model and, where known, the layer).
    """
    return [
        t.group for t in trace_channel_groups(model, example_inputs, ignored_layers=ignored_layers).groups
    ]
