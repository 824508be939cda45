"""``compute="sparse" | "auto"``: a sparsifier's layers trained over their active weights only.

:class:`SparseCompute` replaces the ``forward`` of every eligible layer (``nn.Conv2d`` with a square
kernel, equal strides, symmetric zero padding, no dilation, ``groups=1``; ``nn.Linear``; both with their
own, not overridden, ``forward``) by one that calls the CPU kernels of :mod:`.ops`. The layer falls back
to its own dense ``forward`` (exact, since inactive weights are 0) whenever the kernels do not apply:

* outside training (``module.eval()`` or no autograd): evaluation computes densely, so averaged or
  edited weights that are non-zero outside the mask are used as they are;
* on a step whose topology update reads the dense gradient (RigL, Chase, SRigL: ``needs_grad``
  methods, one step in every ``update_interval``);
* for non-CPU or non-fp32 inputs, and under autocast;
* in ``auto`` mode, where a short timing on the layer's first training input found the dense layer
  faster (the decision is logged per layer and kept in the sparsifier's state, so a resumed run
  computes every layer the same way).

Index structures (:func:`.ops.layer_index`) are rebuilt only when a mask changes (tensor identity and
version counter). :meth:`SparseCompute.remove` restores every layer.
"""

from __future__ import annotations

import logging
import time
import types
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..validation import short_repr
from .build import KernelBuildError, load_kernels
from .modes import COMPUTE_MODES
from .ops import LayerIndex, layer_index, sparse_conv2d, sparse_linear

__all__ = ["COMPUTE_MODES", "SparseCompute", "unsupported_reason"]

_logger = logging.getLogger(__name__)


#: ``auto`` keeps a layer sparse only when its kernels beat the dense layer by this factor (timing noise)
AUTO_MARGIN = 1.05
_AUTO_REPEATS = 3


def unsupported_reason(module: nn.Module) -> str | None:
    """Why the kernels cannot compute ``module`` (``None``: they can)."""
    if isinstance(module, nn.Linear):
        return (
            None
            if type(module).forward is nn.Linear.forward
            else f"{type(module).__name__} overrides forward"
        )
    if not isinstance(module, nn.Conv2d):
        return f"{type(module).__name__} is not a Conv2d or Linear layer"
    if type(module).forward is not nn.Conv2d.forward:
        return f"{type(module).__name__} overrides forward"
    if module.groups != 1:
        return f"grouped convolution (groups={module.groups})"
    if module.dilation != (1, 1):
        return f"dilated convolution (dilation={module.dilation})"
    if module.kernel_size[0] != module.kernel_size[1]:
        return f"non-square kernel {module.kernel_size}"
    if module.stride[0] != module.stride[1]:
        return f"unequal strides {module.stride}"
    if isinstance(module.padding, str) or module.padding[0] != module.padding[1]:
        return f"padding {module.padding!r} (equal integer padding only)"
    if module.padding_mode != "zeros":
        return f"padding_mode {module.padding_mode!r}"
    return None


def _owners(model: nn.Module, names: list[str]) -> dict[str, nn.Module]:
    """The module whose ``weight`` each parameter name is (names not ending in ``.weight`` are absent)."""
    modules = dict(model.named_modules())
    owners = {}
    for name in names:
        prefix, _, attr = name.rpartition(".")
        if attr == "weight" and prefix in modules:
            owners[name] = modules[prefix]
    return owners


class SparseCompute:
    """The sparse-kernel forward of a sparsifier's layers (see the module docstring). Building it
    validates the layers and builds the kernels; :meth:`install` then changes the layers.

    Args:
        model: the (unwrapped) model.
        names: the names of the sparse parameters.
        mode: ``"sparse"`` (every sparse layer; an unsupported one is an error naming it) or ``"auto"``
            (eligible layers timed at their first training input; the others stay dense, listed).
        dense_step: ``() -> bool``: whether the current step needs dense weight gradients.
    """

    def __init__(
        self,
        model: nn.Module,
        names: list[str],
        mode: str,
        dense_step: Callable[[], bool],
    ) -> None:
        if mode not in COMPUTE_MODES[1:]:
            raise ValueError(f"SparseCompute mode must be 'sparse' or 'auto', got {mode!r}")
        self.mode = mode
        self.dense_step = dense_step
        self.masks: Mapping[str, torch.Tensor] = {}
        owners = _owners(model, names)
        reasons = {name: unsupported_reason(owners[name]) if name in owners else "not a layer's weight"
                   for name in names}  # fmt: skip
        unsupported = {name: why for name, why in reasons.items() if why is not None}
        sharded = [name for name in owners if not isinstance(owners[name].weight, nn.Parameter)
                   or type(owners[name].weight.data) is not torch.Tensor]  # fmt: skip
        if mode == "sparse" and (unsupported or sharded):
            listed = {**unsupported, **{name: "sharded (FSDP) parameter" for name in sharded}}
            raise ValueError(
                "compute='sparse': the sparse kernels cannot compute "
                + "; ".join(f"{name} ({why})" for name, why in sorted(listed.items()))
                + ". Use compute='auto' (such layers stay dense) or exclude them from the sparse tensors"
            )
        #: layers left dense because the kernels cannot compute them: {name: reason}
        self.unsupported: dict[str, str] = {**unsupported, **{n: "sharded (FSDP) parameter" for n in sharded}}
        try:
            load_kernels()
            available = True
        except KernelBuildError as err:
            if mode == "sparse":
                raise
            _logger.warning("compute='auto' falls back to masked (dense) compute: %s", err)
            available = False
        self.layers: dict[str, nn.Module] = (
            {name: owners[name] for name in names if name not in self.unsupported} if available else {}
        )
        if self.unsupported and mode == "auto":
            _logger.info("compute='auto': layers kept dense: %s", self.unsupported)
        #: per layer: "sparse" or "dense", decided by timing (``auto``) or "sparse" from the start
        self.plan: dict[str, str] = {name: "sparse" for name in self.layers} if mode == "sparse" else {}
        self._indices: dict[str, tuple[torch.Tensor, int, LayerIndex]] = {}
        self._installed: list[nn.Module] = []

    def install(self, masks: Mapping[str, torch.Tensor]) -> None:
        """Replace the ``forward`` of every layer the kernels compute (undone by :meth:`remove`);
        ``masks`` is the sparsifier's live ``{name: bool mask}`` dict."""
        self.masks = masks
        for name, module in self.layers.items():
            if module not in self._installed:
                self._install(name, module)

    def _install(self, name: str, module: nn.Module) -> None:
        dense_forward = type(module).forward
        compute = self

        @torch.compiler.disable
        def forward(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
            if layer is not module or not compute._applies(name, layer, x):  # e.g. a deep copy (EMA)
                return dense_forward(layer, x)
            return compute._sparse(name, layer, x)

        module.forward = types.MethodType(forward, module)
        self._installed.append(module)

    def _applies(self, name: str, layer: nn.Module, x: torch.Tensor) -> bool:
        if not (layer.training and torch.is_grad_enabled()):
            return False
        if x.device.type != "cpu" or x.dtype != torch.float32 or layer.weight.dtype != torch.float32:
            return False
        if torch.is_autocast_enabled("cpu") or self.dense_step():
            return False
        if name not in self.plan:
            self.plan[name] = self._measure(name, layer, x)
        return self.plan[name] == "sparse"

    def _index(self, name: str) -> LayerIndex:
        mask = self.masks[name]
        cached = self._indices.get(name)
        if cached is None or cached[0] is not mask or cached[1] != mask._version:
            cached = self._indices[name] = (mask, mask._version, layer_index(mask))
        return cached[2]

    def _sparse(self, name: str, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        index = self._index(name)
        if isinstance(layer, nn.Linear):
            return sparse_linear(x, layer.weight, layer.bias, index)
        return sparse_conv2d(x, layer.weight, layer.bias, index, layer.stride[0], layer.padding[0])

    def _measure(self, name: str, layer: nn.Module, x: torch.Tensor) -> str:
        """``auto``: time the layer's forward and backward, dense and sparse, on this input (best of a
        few, interleaved); sparse when it is :data:`AUTO_MARGIN` × faster. The timing uses detached
        copies of the input and weight, so no gradient or hook of the model (DDP's) sees it."""
        sample = x.detach().requires_grad_(x.requires_grad)
        weight = layer.weight.detach().requires_grad_()
        bias = None if layer.bias is None else layer.bias.detach()
        index = self._index(name)
        if isinstance(layer, nn.Linear):
            dense_fn = lambda: F.linear(sample, weight, bias)  # noqa: E731
            sparse_fn = lambda: sparse_linear(sample, weight, bias, index)  # noqa: E731
        else:
            stride, padding = layer.stride[0], layer.padding[0]
            dense_fn = lambda: F.conv2d(sample, weight, bias, stride, padding)  # noqa: E731
            sparse_fn = lambda: sparse_conv2d(sample, weight, bias, index, stride, padding)  # noqa: E731

        def run(fn: Callable[[], torch.Tensor]) -> float:
            start = time.perf_counter()
            out = fn()
            torch.autograd.grad(out, [t for t in (sample, weight) if t.requires_grad], torch.ones_like(out))
            return time.perf_counter() - start

        dense_times, sparse_times = [], []
        for _ in range(_AUTO_REPEATS):
            dense_times.append(run(dense_fn))
            sparse_times.append(run(sparse_fn))
        dense, sparse = min(dense_times), min(sparse_times)
        choice = "sparse" if dense > AUTO_MARGIN * sparse else "dense"
        _logger.info(
            "compute='auto': %s %s (dense %.3f ms, sparse %.3f ms, input %s)",
            name, choice, dense * 1e3, sparse * 1e3, tuple(x.shape),
        )  # fmt: skip
        return choice

    def state_dict(self) -> dict[str, str]:
        """The per-layer decisions (``auto``), so a resumed run computes every layer the same way."""
        return dict(self.plan)

    @staticmethod
    def check_plan(plan: Any) -> dict[str, str]:
        """A saved :meth:`state_dict`, validated (``ValueError`` naming what is wrong)."""
        if not isinstance(plan, Mapping) or not all(isinstance(k, str) for k in plan):
            raise ValueError("compute plan: must be a mapping of layer names")
        bad = {k: short_repr(v) for k, v in plan.items() if v not in ("sparse", "dense")}
        if bad:
            raise ValueError(f"compute plan: values must be 'sparse' or 'dense', got {bad}")
        return dict(plan)

    def load_state_dict(self, plan: Mapping[str, str]) -> None:
        """Restore :meth:`state_dict` (checked by :meth:`check_plan`; layers not computed here are ignored)."""
        plan = self.check_plan(plan)
        self.plan.update({name: choice for name, choice in plan.items() if name in self.layers})

    def remove(self) -> None:
        """Give every layer its own ``forward`` back."""
        for module in self._installed:
            vars(module).pop("forward", None)
        self._installed.clear()

    def describe(self) -> dict[str, Any]:
        """Which layers compute sparse, which dense (decided or not yet) and which cannot."""
        return {"mode": self.mode, "plan": dict(self.plan), "unsupported": dict(self.unsupported)}
