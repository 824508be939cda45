"""The training recipe as a library: config, data, the Accelerate loop, checkpoints.

``recipes/train.py`` and ``itop-timm train`` both call :func:`main`. :func:`run` (the loop: torch,
timm, Accelerate, 🤗 datasets) is imported on first use, so ``--help`` answers without them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .config import TrainConfig, load_config
from .entry import build_parser, main

if TYPE_CHECKING:
    from .loop import run

__all__ = ["TrainConfig", "load_config", "run", "main", "build_parser"]


def __getattr__(name: str) -> Any:
    if name == "run":
        from .loop import run

        return run
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
