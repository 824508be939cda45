"""Training checkpoints: ``accelerator.save_state`` folders, written atomically, plus the itop_timm
objects (sparsifier, weight averaging, loop position) stored as safetensors + JSON.

Layout: ``<output_dir>/checkpoints/step_00000500/`` holds Accelerate's files (``model.safetensors``,
optimizer and RNG states), ``itop_timm_state.safetensors`` and ``train_config.json``. The folder is
built under a temporary name and renamed when complete, so a crash mid-save never leaves a
half-written checkpoint; ``latest`` only ever sees complete ones.

Accelerate's ``register_for_checkpointing`` unpickles custom objects with ``weights_only=False``;
itop_timm's objects are therefore attached through Accelerate's save/load *state hooks* instead and
never pickled (Accelerate itself loads its own files with ``weights_only=True``).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from ..serialization import (
    CheckpointError,
    atomic_write_text,
    load_state_file,
    read_json_file,
    save_state_file,
)

__all__ = [
    "Stateful",
    "STATE_FILE",
    "CONFIG_FILE",
    "checkpoint_dir",
    "list_checkpoints",
    "latest_checkpoint",
    "resolve_resume",
    "register_state_hooks",
    "save_checkpoint",
    "read_checkpoint_config",
]

_logger = logging.getLogger(__name__)

STATE_FILE = "itop_timm_state.safetensors"
CONFIG_FILE = "train_config.json"
_STEP_DIR = re.compile(r"^step_(\d{8,})$")


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


def checkpoint_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoint folders under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(root: str | Path) -> Path | None:
    checkpoints = list_checkpoints(root)
    return checkpoints[-1] if checkpoints else None


def resolve_resume(resume: str, output_dir: str | Path) -> Path:
    """``"latest"`` or a folder -> a complete checkpoint folder; ``ValueError`` otherwise."""
    if resume == "latest":
        found = latest_checkpoint(checkpoint_dir(output_dir))
        if found is None:
            raise ValueError(f"--run.resume latest: no checkpoint in {str(checkpoint_dir(output_dir))!r}")
        return found
    path = Path(resume)
    if not path.is_dir():
        raise ValueError(f"resume checkpoint {resume!r} is not a folder")
    if path.name == "checkpoints" and latest_checkpoint(path) is not None:
        return latest_checkpoint(path)  # type: ignore[return-value]
    for required in (STATE_FILE, CONFIG_FILE):
        if not (path / required).is_file():
            raise ValueError(f"resume checkpoint {resume!r} is incomplete: {required} is missing")
    return path


def read_checkpoint_config(path: str | Path) -> dict[str, Any]:
    """The run config stored in a training checkpoint (a :class:`CheckpointError` naming the file if unreadable)."""
    file = Path(path) / CONFIG_FILE
    config = read_json_file(file, "run config")
    if not isinstance(config, dict) or not all(isinstance(v, dict) for v in config.values()):
        raise CheckpointError(f"{file}: cannot read the run's config (a mapping of sections is expected)")
    return config


def register_state_hooks(accelerator: Any, objects: Mapping[str, Stateful]) -> None:
    """Save/load ``objects`` with every ``accelerator.save_state`` / ``load_state`` (safetensors + JSON)."""

    def save_hook(models: Any, weights: Any, output_dir: str) -> None:
        state = {name: obj.state_dict() for name, obj in objects.items()}  # every rank: sharded masks gather
        if accelerator.is_main_process:
            save_state_file(Path(output_dir) / STATE_FILE, state)

    def load_hook(models: Any, input_dir: str) -> None:
        state = load_state_file(Path(input_dir) / STATE_FILE)
        missing = [name for name in objects if name not in state]
        if missing:
            raise CheckpointError(f"{input_dir}/{STATE_FILE}: no state for {missing}")
        for name, obj in objects.items():
            obj.load_state_dict(state[name])

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def save_checkpoint(
    accelerator: Any, output_dir: str | Path, step: int, config: Mapping[str, Any], keep: int
) -> Path:
    """``accelerator.save_state`` into ``checkpoints/step_<step>`` atomically; keep the newest ``keep``."""
    root = checkpoint_dir(output_dir)
    final = root / f"step_{step:08d}"
    tmp = root / f".step_{step:08d}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        atomic_write_text(tmp / CONFIG_FILE, json.dumps(config, indent=2))
        for file in tmp.iterdir():
            with open(file, "rb+") as f:
                os.fsync(f.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        _logger.info("checkpoint saved: %s", final)
    accelerator.wait_for_everyone()
    return final


def remove_stale_temporaries(output_dir: str | Path) -> None:
    """Delete half-written checkpoint folders left by a crash."""
    root = checkpoint_dir(output_dir)
    if root.is_dir():
        for p in root.glob(".step_*.tmp"):
            shutil.rmtree(p, ignore_errors=True)
