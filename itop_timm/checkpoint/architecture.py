"""Which architecture a checkpoint holds: timm's name when saving; timm's model, plus a registered
rebuilder for an architecture that is not timm's own (a compacted model), when loading.

The rebuilder registry is the checkpoint format's one extension point: a model carrying
``model.itop_timm_pruning_history`` (set by ``itop_timm.structured.compact``) has that JSON record saved
under the metadata key ``"structured"``; ``load_sparse`` builds timm's architecture from ``config.json``
and hands it, with the record, to the function registered under that key (``itop_timm.structured``
registers ``rebuild_compacted``). The format knows nothing else about structure, and ``structured/``
imports this package, never the other way round.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from torch import nn

from ..registry import Registry
from ..serialization import CheckpointError
from .format import CONFIG_FILE, SPARSITY_FILE

__all__ = [
    "ARCHITECTURE_ATTR",
    "ARCHITECTURE_KEY",
    "ARCHITECTURE_REBUILDERS",
    "register_architecture_rebuilder",
    "timm_architecture",
    "build_model",
]

#: the model attribute holding a non-timm architecture's JSON record
ARCHITECTURE_ATTR = "itop_timm_pruning_history"
#: the metadata key (and registry name) of that record
ARCHITECTURE_KEY = "structured"
#: ``itop_timm.structured`` registers its rebuilder; named here by module only (imported when a compacted
#: checkpoint is loaded), so this package never imports the layer above it at import time
ARCHITECTURE_REBUILDERS: Registry[Callable[[nn.Module, Mapping[str, Any]], nn.Module]] = Registry(
    "architecture rebuilder", "itop_timm.structured.compacted"
)


def register_architecture_rebuilder(
    rebuild: Callable[[nn.Module, Mapping[str, Any]], nn.Module], *, overwrite: bool = False
) -> None:
    """Register ``rebuild(model, record) -> model``, which gives a freshly built timm model the
    architecture recorded in ``model.itop_timm_pruning_history`` (raising ``ValueError`` when the
    record does not fit)."""
    ARCHITECTURE_REBUILDERS.register(ARCHITECTURE_KEY, rebuild, overwrite=overwrite)


def timm_architecture(model: nn.Module, model_name: str | None) -> str:
    """The timm architecture name of ``model`` (``model_name``, else its ``pretrained_cfg``'s)."""
    name = model_name or getattr(model, "pretrained_cfg", {}).get("architecture")
    if not name:
        raise ValueError("cannot tell the timm architecture of this model: pass model_name=")
    import timm

    name = name.split(":")[-1].split(".")[0] if not timm.is_model(name) else name
    if not timm.is_model(name):
        raise ValueError(f"model_name {name!r} is not a timm architecture")
    return name


def build_model(folder: Path, arch: str, meta: Mapping[str, Any]) -> nn.Module:
    """The architecture exactly as timm builds it from ``config.json`` (plus a recorded compaction)."""
    import timm

    if not timm.is_model(arch):
        raise CheckpointError(f"{folder / CONFIG_FILE}: unknown timm architecture {arch!r}")
    try:
        model = timm.create_model(
            f"local-dir:{folder}", pretrained=False
        )  # timm's own reading of config.json
    except Exception as err:
        raise CheckpointError(
            f"{folder / CONFIG_FILE}: timm cannot build {arch!r} from it ({type(err).__name__}: {err})"
        ) from err
    if ARCHITECTURE_KEY in meta:
        if ARCHITECTURE_KEY not in ARCHITECTURE_REBUILDERS:
            raise CheckpointError(
                f"{folder / SPARSITY_FILE}: holds a compacted architecture; import itop_timm.structured to load it"
            )
        try:
            model = ARCHITECTURE_REBUILDERS.get(ARCHITECTURE_KEY)(model, meta[ARCHITECTURE_KEY])
        except Exception as err:  # hostile history: any failure to replay it is a defect of the file
            raise CheckpointError(
                f"{folder / SPARSITY_FILE}: cannot rebuild the compacted architecture ({type(err).__name__}: {err})"
            ) from err
    return model
