"""Tracing a model with torch-pruning: run an example input, build the ``DependencyGraph``.

Everything here names the model (and, where known, the failing layer) in its errors.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ...validation import is_int

__all__ = [
    "model_label",
    "classifier_modules",
    "call_model",
    "run_example",
    "tracing_state",
    "build_graph",
    "check_input_size",
    "trace_memory_bytes",
    "check_trace_memory",
    "MAX_TRACE_ELEMENTS",
    "MAX_TRACE_BYTES",
]


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

    The activations the trace would keep are estimated first (:func:`check_trace_memory`), so an input
    size from an option or a checkpoint cannot make it allocate more than :data:`MAX_TRACE_BYTES`.

    Raises:
        ValueError: naming the model when torch-pruning cannot trace it, or when the trace would need more
            than :data:`MAX_TRACE_BYTES`.
    """
    import torch_pruning as tp

    check_trace_memory(model, example_inputs)
    try:
        with torch.enable_grad():
            return tp.DependencyGraph().build_dependency(
                model, example_inputs, forward_fn=call_model, verbose=False
            )
    except Exception as err:
        raise ValueError(
            f"torch-pruning cannot trace {model_label(model)}: {type(err).__name__}: {err}"
        ) from err


#: the most elements (C·H·W) a traced example input may have: 3 × 1024 × 1024 (a first, model-blind
#: bound, checked before anything runs; :data:`MAX_TRACE_BYTES` is the bound on memory).
MAX_TRACE_ELEMENTS = 3 * 1024 * 1024

#: the most bytes of activations a trace may keep (4 GiB), as :func:`trace_memory_bytes` estimates them.
#: Tracing keeps every activation, so this bounds what an option or a checkpoint's metadata (its model
#: and input size) can make the tracer allocate.
MAX_TRACE_BYTES = 4 * 2**30


class _OutputBytes(torch.overrides.TorchFunctionMode):
    """Sums the bytes of every new tensor a forward pass creates (views and in-place results excluded)."""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        inputs = {id(a) for a in args if isinstance(a, torch.Tensor)}
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and id(t) not in inputs and not t._is_view():
                self.total += t.numel() * t.element_size()
        return out


def _to_meta(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return torch.empty_like(value, device="meta")
    if isinstance(value, dict):
        return {k: _to_meta(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_to_meta(v) for v in value)
    return value


def trace_memory_bytes(model: nn.Module, example_inputs: Any) -> int | None:
    """Bytes of the activations a forward pass of ``model`` on ``example_inputs`` creates, measured on the
    meta device (nothing is allocated, whatever the sizes); ``None`` when the model cannot run on the
    meta device (e.g. a forward that reads a tensor's values)."""
    state = {n: _to_meta(t) for n, t in [*model.named_parameters(), *model.named_buffers()]}
    counter = _OutputBytes()
    try:
        with torch.no_grad(), counter:
            torch.func.functional_call(model, state, _to_meta(example_inputs))
    except Exception:
        return None
    return counter.total


def check_trace_memory(model: nn.Module, example_inputs: Any, limit: int | None = None) -> None:
    """Refuse (``ValueError``, naming the model, the estimate and the limit) a trace of ``model`` on
    ``example_inputs`` that would keep more than ``limit`` bytes of activations (default
    :data:`MAX_TRACE_BYTES`). A model that cannot run on the meta device is not estimated;
    :data:`MAX_TRACE_ELEMENTS` still bounds its input."""
    limit = MAX_TRACE_BYTES if limit is None else limit
    need = trace_memory_bytes(model, example_inputs)
    if need is not None and need > limit:
        raise ValueError(
            f"tracing {model_label(model)} on the example input {_describe(example_inputs)} would keep "
            f"{need / 2**30:.2f} GiB of activations, more than the {limit / 2**30:.2f} GiB allowed: "
            "use a smaller input size"
        )


def check_input_size(value: Any) -> list[int]:
    """``value`` as an example input size ``[C, H, W]`` for tracing, else a ``ValueError`` saying what is
    allowed (at most 4 positive integers, at most :data:`MAX_TRACE_ELEMENTS` elements in all)."""
    if (
        not isinstance(value, (list, tuple))
        or not 1 <= len(value) <= 4
        or not all(is_int(s) and s >= 1 for s in value)
        or math.prod(value) > MAX_TRACE_ELEMENTS
    ):
        raise ValueError(
            f"must be up to 4 positive integers such as [3, 224, 224], at most {MAX_TRACE_ELEMENTS} "
            f"elements in all, got {value!r}"
        )
    return [int(s) for s in value]
