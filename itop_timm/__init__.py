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
``create_optimizer_v2``.
"""

from importlib.metadata import PackageNotFoundError, version

from . import srigl as _srigl  # noqa: F401  (registers the srigl method)
from . import timm_optimizers as _timm_optimizers
from .checkpoint import SparseState, export_checkpoint, load_sparse, save_sparse
from .config import SPARSIFY_DEFAULTS, SparsityConfig
from .densities import (
    compute_layer_densities,
    layer_densities,
    register_distribution,
    sparse_parameter_shapes,
)
from .hub import push_to_hub
from .methods import LayerView, MethodInfo, get_method, register_method
from .plugins import load_plugins
from .registry import list_distributions, list_methods, list_schedules
from .schedules import ScheduleInfo, create_schedule, register_schedule
from .serialization import CheckpointError
from .sparsifier import GRADIENT_MASKED_OPTIMIZERS, Sparsifier, sparsify
from .structure import LayerPlan, StructureRule
from .structured import chase as _chase  # noqa: F401  (registers the chase method)

try:
    __version__ = version("itop-timm")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0.0.0+unknown"

_timm_optimizers.install()

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
