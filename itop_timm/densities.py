"""Which tensors are sparse, and how dense each one is.

Pure functions: they read a model's parameter names and shapes and never modify or hold torch state.

* :func:`sparse_parameter_shapes` picks the sparse tensors: every convolution and linear weight (first
  convolution and classifier included); biases, normalisation layers, embeddings, positional
  embeddings and class tokens stay dense. ``include`` / ``exclude`` fnmatch patterns override the rule.
* :func:`compute_layer_densities` turns a target overall density into per-layer densities with a
  registered distribution (``uniform``, ``er``, ``erk``); ER and ERK move layers whose density would
  exceed 1 into a dense set and re-solve, so the overall density is met exactly (REFERENCE §1).
* :func:`active_counts` gives the exact number of active weights per layer: ``round(d_l * N_l)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from fnmatch import fnmatch

from torch import nn

from .config import SPARSIFY_DEFAULTS
from .registry import DISTRIBUTIONS
from .validation import UNIT_INTERVAL

__all__ = [
    "sparse_parameter_shapes",
    "compute_layer_densities",
    "layer_densities",
    "active_counts",
    "register_distribution",
    "erk_raw",
    "er_raw",
]

Shape = Sequence[int]
DistributionFn = Callable[[Mapping[str, Shape], float], dict[str, float]]


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch(name, pattern) for pattern in patterns)


def _as_patterns(patterns: str | Iterable[str] | None) -> list[str]:
    if patterns is None:
        return []
    return [patterns] if isinstance(patterns, str) else list(patterns)


def sparse_parameter_shapes(
    model: nn.Module,
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
) -> dict[str, tuple[int, ...]]:
    """Names (as in ``model.named_parameters()``) and shapes of the tensors that are trained sparse.

    Default rule: the ``weight`` of every ``nn.Linear`` and every convolution (``nn.Conv1d/2d/3d`` and
    their subclasses, e.g. timm's ``Conv2dSame``/``StdConv2d``), trainable parameters only.

    Args:
        model: any ``nn.Module`` (wrappers such as DDP or ``torch.compile`` are unwrapped by the caller).
        include: fnmatch pattern(s). When given, they *replace* the default rule: every trainable
            parameter with at least 2 dimensions whose name matches one of them is sparse.
        exclude: fnmatch pattern(s); matching parameters stay dense (applied after ``include``).

    Returns:
        ``{name: shape}`` in ``named_parameters()`` order.
    """
    include_patterns = _as_patterns(include)
    exclude_patterns = _as_patterns(exclude)
    layer_weights = {
        id(module.weight)
        for module in model.modules()
        if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd))
        and isinstance(module.weight, nn.Parameter)
    }
    shapes: dict[str, tuple[int, ...]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if include_patterns:
            selected = param.ndim >= 2 and _matches(name, include_patterns)
        else:
            selected = id(param) in layer_weights
        if selected and not _matches(name, exclude_patterns):
            shapes[name] = tuple(param.shape)
    return shapes


def erk_raw(shape: Shape) -> float:
    """Erdős–Rényi-Kernel scale of a tensor: ``sum(shape) / prod(shape)``."""
    return sum(shape) / math.prod(shape)


def er_raw(shape: Shape) -> float:
    """Erdős–Rényi scale, kernel size ignored: ``(n_out + n_in) / (n_out * n_in)``."""
    n_out = shape[0]
    n_in = shape[1] if len(shape) > 1 else 1
    return (n_out + n_in) / (n_out * n_in)


def _scaled_with_dense_cap(
    shapes: Mapping[str, Shape], density: float, raw: Callable[[Shape], float]
) -> dict[str, float]:
    """Per-layer density ``eps * raw_l``, capped at 1 by moving saturated layers into a dense set.

    Solves ``eps = (d * sum_{l not in D} N_l - (1 - d) * sum_{l in D} N_l) / sum_{l not in D} raw_l N_l``;
    while ``max eps * raw_l > 1``, every layer attaining the max joins the dense set D and eps is
    solved again. The result meets the overall density exactly (before per-layer rounding).
    """
    numel = {name: math.prod(shape) for name, shape in shapes.items()}
    scale = {name: raw(shape) for name, shape in shapes.items()}
    dense: set[str] = set()
    eps = 0.0
    while len(dense) < len(shapes):
        free = [name for name in shapes if name not in dense]
        budget = density * sum(numel[n] for n in free) - (1.0 - density) * sum(numel[n] for n in dense)
        eps = budget / sum(scale[n] * numel[n] for n in free)
        top = max(scale[n] for n in free)
        if eps * top <= 1.0:
            break
        dense.update(n for n in free if scale[n] == top)
    return {name: 1.0 if name in dense else eps * scale[name] for name in shapes}


def _uniform(shapes: Mapping[str, Shape], density: float) -> dict[str, float]:
    return dict.fromkeys(shapes, density)


def _erk(shapes: Mapping[str, Shape], density: float) -> dict[str, float]:
    return _scaled_with_dense_cap(shapes, density, erk_raw)


def _er(shapes: Mapping[str, Shape], density: float) -> dict[str, float]:
    return _scaled_with_dense_cap(shapes, density, er_raw)


def register_distribution(name: str, fn: DistributionFn, *, overwrite: bool = False) -> DistributionFn:
    """Register ``fn(shapes, density) -> {name: layer_density}`` as a layer-density distribution."""
    return DISTRIBUTIONS.register(name, fn, overwrite=overwrite)


register_distribution("uniform", _uniform)
register_distribution("er", _er)
register_distribution("erk", _erk)


def compute_layer_densities(
    shapes: Mapping[str, Shape], density: float, distribution: str
) -> dict[str, float]:
    """Per-layer densities for tensors of the given ``shapes`` at overall ``density``.

    Raises ``ValueError`` for a density outside (0, 1], an unknown distribution or no tensors.
    """
    density = UNIT_INTERVAL.check("density", density)
    fn = DISTRIBUTIONS.get(distribution)
    if not shapes:
        raise ValueError("no sparse tensors: nothing to compute densities for")
    densities = fn(shapes, density)
    for name, value in densities.items():
        if not (0.0 < value <= 1.0 + 1e-12):
            raise ValueError(
                f"distribution {distribution!r} gave density {value} for {name!r}, outside (0, 1]"
            )
    return {name: min(1.0, densities[name]) for name in shapes}


def layer_densities(
    model: nn.Module,
    density: float,
    distribution: str | None = None,
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
) -> dict[str, float]:
    """Per-layer target densities of ``model``'s sparse tensors at overall ``density`` with ``distribution``
    (``None``: the library's default, :data:`itop_timm.SPARSIFY_DEFAULTS`).

    >>> import timm, itop_timm
    >>> d = itop_timm.layer_densities(timm.create_model("resnet18"), 0.1, "erk")
    >>> d["conv1.weight"] > d["layer4.1.conv2.weight"]
    True
    """
    shapes = sparse_parameter_shapes(model, include, exclude)
    if not shapes:
        raise ValueError(
            f"{type(model).__name__} has no sparsifiable tensor (conv/linear weight) to sparsify"
        )
    return compute_layer_densities(shapes, density, distribution or SPARSIFY_DEFAULTS["distribution"])


def active_counts(shapes: Mapping[str, Shape], densities: Mapping[str, float]) -> dict[str, int]:
    """Exact number of active weights per layer: ``round(d_l * N_l)``, at least 1, at most ``N_l``."""
    counts = {}
    for name, shape in shapes.items():
        numel = math.prod(shape)
        counts[name] = min(numel, max(1, math.floor(densities[name] * numel + 0.5)))
    return counts
