"""The training recipe as a library: config, data, the Accelerate loop, checkpoints.

``recipes/train.py`` and ``itop-timm train`` both call :func:`main`.
"""

from .config import TrainConfig, load_config
from .entry import build_parser, main
from .loop import run

__all__ = ["TrainConfig", "load_config", "run", "main", "build_parser"]
