"""itop_timm: sparse training for timm models.

Dynamic sparse training with In-Time Over-Parameterization (ITOP), plugged into the loop you already
write with timm and Accelerate::

    import timm, itop_timm
    model = timm.create_model("resnet18", num_classes=10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sp = itop_timm.sparsify(model, optimizer, method="rigl", density=0.1, total_steps=10_000)
    for x, y in loader:
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(); loss.backward(); optimizer.step()   # masks + topology updates happen here
    sp.density, sp.itop_rate   # realised density, R_s (fraction of sparse weights ever active)

Importing the package also registers sparse optimizers (``rigl_sgd``, ``set_adamw``, ...) with timm's
``create_optimizer_v2`` (when ``timm.optim`` is imported, before or after). The public names are
imported on first access, so ``import itop_timm`` itself loads neither torch nor timm.

Where each concept lives (lower layers first; a module imports only from the layers below it):

* settings — ``validation`` (declared options, the one numeric validator), ``registry`` (name ->
  entry tables), ``config`` (``SparsityConfig``: every setting and its single default), ``schedules``,
  ``densities`` (which tensors are sparse, per-layer densities), ``masks`` (validating given masks);
* one layer's update — ``topology`` (``LayerView``, ``LayerPlan``, drop-and-grow of one mask),
  ``structure`` (``StructureRule``: how a method constrains where weights live);
* methods — ``methods/`` (one file per method: its score functions, defaults and structure rule);
  ``structured/dependency/`` (torch-pruning channel groups, the channel units Chase removes);
* the running sparsifier — ``mask_state`` (masks, union, gradient EMAs), ``masking`` (keeping them
  applied each step), ``updater`` (a topology update over all layers), ``optimizer_link`` (hooking
  one optimizer), ``sparsifier`` (``Sparsifier``, incl. ``restrict``), ``factory`` (``sparsify``),
  ``distributed`` (ranks and shards), ``unwrap`` (DDP / compile / Accelerate wrappers);
* files — ``serialization`` (safetensors + JSON, atomic), ``checkpoint/`` (format, save, card, load
  and verification, export, Hub download), ``hub`` (upload); ``structured/`` (RMDA, compaction,
  condensing) sits above ``checkpoint/``;
* around a run — ``averaging`` (PSWA/PWALKS), ``timm_optimizers`` (``rigl_sgd``, ...), ``plugins``,
  ``training/`` (the recipe: options engine, config sections, preflight, loop), ``cli``, ``timm_train``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._post_import import call_after_import
from .version import __version__

if TYPE_CHECKING:
    from . import averaging, methods, structured
    from .checkpoint import SparseState, export_checkpoint, load_sparse, save_sparse
    from .config import SPARSIFY_DEFAULTS, SparsityConfig
    from .densities import (
        compute_layer_densities,
        layer_densities,
        register_distribution,
        sparse_parameter_shapes,
    )
    from .factory import sparsify
    from .hub import push_to_hub
    from .masking import GRADIENT_MASKED_OPTIMIZERS
    from .methods import MethodInfo, get_method, register_method
    from .plugins import load_plugins
    from .registry import list_distributions, list_methods, list_schedules
    from .schedules import ScheduleInfo, create_schedule, register_schedule
    from .serialization import CheckpointError
    from .sparsifier import Sparsifier
    from .structure import RuleContext, StructureRule
    from .topology import LayerPlan, LayerView

#: public name -> the submodule that defines it (imported on first access, so ``import itop_timm`` and
#: the command lines' ``--help`` cost no torch import)
_LAZY = {
    "averaging": ".averaging",
    "methods": ".methods",
    "structured": ".structured",
    "SparseState": ".checkpoint",
    "export_checkpoint": ".checkpoint",
    "load_sparse": ".checkpoint",
    "save_sparse": ".checkpoint",
    "SPARSIFY_DEFAULTS": ".config",
    "SparsityConfig": ".config",
    "compute_layer_densities": ".densities",
    "layer_densities": ".densities",
    "register_distribution": ".densities",
    "sparse_parameter_shapes": ".densities",
    "sparsify": ".factory",
    "push_to_hub": ".hub",
    "GRADIENT_MASKED_OPTIMIZERS": ".masking",
    "MethodInfo": ".methods",
    "get_method": ".methods",
    "register_method": ".methods",
    "load_plugins": ".plugins",
    "list_distributions": ".registry",
    "list_methods": ".registry",
    "list_schedules": ".registry",
    "ScheduleInfo": ".schedules",
    "create_schedule": ".schedules",
    "register_schedule": ".schedules",
    "CheckpointError": ".serialization",
    "Sparsifier": ".sparsifier",
    "RuleContext": ".structure",
    "StructureRule": ".structure",
    "LayerPlan": ".topology",
    "LayerView": ".topology",
}


def __getattr__(name: str) -> Any:
    """The public names, each imported from its module on first access (then cached here)."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    imported = importlib.import_module(module, __name__)
    value = imported if module == f".{name}" else getattr(imported, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


def _install_timm_optimizers() -> None:
    from .timm_optimizers import install

    install()


# the sparse optimizer names in timm's registry: now if timm.optim is imported, else when it is
call_after_import("timm.optim", _install_timm_optimizers)

__all__ = [
    "__version__",
    "sparsify",
    "Sparsifier",
    "SparsityConfig",
    "SPARSIFY_DEFAULTS",
    "GRADIENT_MASKED_OPTIMIZERS",
    "layer_densities",
    "compute_layer_densities",
    "sparse_parameter_shapes",
    "list_methods",
    "list_distributions",
    "list_schedules",
    "register_method",
    "register_distribution",
    "register_schedule",
    "get_method",
    "MethodInfo",
    "LayerView",
    "LayerPlan",
    "StructureRule",
    "RuleContext",
    "averaging",
    "methods",
    "structured",
    "ScheduleInfo",
    "create_schedule",
    "save_sparse",
    "load_sparse",
    "export_checkpoint",
    "SparseState",
    "push_to_hub",
    "CheckpointError",
    "load_plugins",
]
