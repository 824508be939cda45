"""Exactness: whether removing a zero channel of a torch-pruning group provably leaves the outputs unchanged.

Which operations a zeroed channel may pass through and still be removed exactly; everything else
(LayerNorm/GroupNorm, attention, matrix products, unknown ops...) makes a group non-exact.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["inexact_reason"]


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


def inexact_reason(graph: Any, tp_group: Any, names: dict[int, str]) -> str | None:
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
