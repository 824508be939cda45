"""What an exact resume needs beyond Accelerate's own state: the loop's position (:class:`TrainState`),
the same config (less the settings that cannot change the result), the loss window between two log
lines, and a loud failure when Accelerate cannot restore the random number generators.

A checkpoint stores its run's config; :func:`config_differences` lists what the resuming run changed,
outside :data:`RESUME_MAY_DIFFER` (output, logging and loader settings), and the preflight refuses it.

The loop logs the mean loss of the batches since the previous log line. A checkpoint taken between two
log lines stores each process's partial window (sum and count), so the first line after a resume is
the same as in the uninterrupted run. Accelerate only logs at INFO when a checkpoint's RNG state
cannot be loaded and carries on; :func:`load_training_state` turns that into a :class:`CheckpointError`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..distributed import all_ranks_agree
from ..serialization import CheckpointError

__all__ = [
    "TrainState",
    "RESUME_MAY_DIFFER",
    "config_differences",
    "loss_window_state",
    "restore_loss_window",
    "load_training_state",
]

_logger = logging.getLogger(__name__)

_ACCELERATE_LOGGER = "accelerate.checkpointing"
_RNG_FAILURE = "Could not load random states"

#: keys that may change between a checkpoint and its resumption without changing the run's result.
RESUME_MAY_DIFFER = frozenset(
    {
        "run.resume",
        "run.overwrite",
        "run.progress",
        "run.tensorboard",
        "run.log_interval",
        "run.checkpoint_interval",
        "run.keep_checkpoints",
        "run.output_dir",
        "data.num_workers",
        "run.num_threads",
        "data.eval_batch_size",
        "data.data_dir",
    }
)


def config_differences(
    saved: Mapping[str, Any], current: Mapping[str, Any], ignore: frozenset[str] = RESUME_MAY_DIFFER
) -> list[str]:
    """``section.key: saved -> current`` for every setting that differs (except ``ignore``)."""
    diffs = []
    for section in sorted(set(saved) | set(current)):
        a, b = saved.get(section) or {}, current.get(section) or {}
        for key in sorted(set(a) | set(b)):
            name = f"{section}.{key}"
            if name not in ignore and a.get(key) != b.get(key):
                diffs.append(f"{name}: {a.get(key)!r} -> {b.get(key)!r}")
    return diffs


@dataclass
class TrainState:
    """Where the loop is, and what it has seen (saved in every checkpoint)."""

    epoch: int = 0
    batches_in_epoch: int = 0  # dataloader batches of `epoch` already consumed
    step: int = 0  # optimizer steps (synchronised gradient steps)
    best_val_top1: float = -1.0
    best_epoch: int = -1
    train_seconds: float = 0.0
    itop_history: list[dict[str, Any]] = field(default_factory=list)
    eval_history: list[dict[str, Any]] = field(default_factory=list)
    # per process: [loss sum, batch count] of the batches not yet logged (exact resume of the loss log)
    loss_window: list[list[float]] = field(default_factory=list)

    def state_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for key in self.__dataclass_fields__:
            if key == "loss_window" and key not in state:  # checkpoints of older itop_timm versions
                _logger.warning("the checkpoint has no loss window: the first logged loss may differ")
                state = {**state, key: []}
            if key not in state:
                raise ValueError(f"train state misses {key!r}")
            setattr(self, key, state[key])


def loss_window_state(accelerator: Any, loss_sum: torch.Tensor, loss_count: int) -> list[list[float]]:
    """``[[sum, count], ...]``, one pair per process, of the losses not yet logged (collective call)."""
    local = torch.tensor(
        [[float(loss_sum), float(loss_count)]], dtype=torch.float64, device=accelerator.device
    )
    gathered = accelerator.gather(local) if accelerator.num_processes > 1 else local
    return [[float(s), float(c)] for s, c in gathered.cpu().tolist()]


def restore_loss_window(window: list[list[float]], accelerator: Any, loss_sum: torch.Tensor) -> int:
    """Put this process's saved partial window into ``loss_sum``; returns its batch count (0 if none)."""
    if not window:
        return 0
    if len(window) != accelerator.num_processes:
        _logger.warning(
            "the checkpoint's loss window is from %d processes, this run has %d: the first logged loss "
            "after resuming covers only the batches since the resume",
            len(window),
            accelerator.num_processes,
        )
        return 0
    total, count = window[accelerator.process_index]
    loss_sum.fill_(total)
    return int(count)


def _rng_files_missing(resume_dir: Path, accelerator: Any) -> bool:
    from accelerate.utils import RNG_STATE_NAME

    return not (resume_dir / f"{RNG_STATE_NAME}_{accelerator.process_index}.pkl").is_file()


def load_training_state(accelerator: Any, resume_dir: str | Path) -> None:
    """``accelerator.load_state(resume_dir)``, raising :class:`CheckpointError` on every process if any
    process's random number generator state is missing or could not be loaded (the run would go on,
    but no longer reproduce the uninterrupted one). Accelerate reports a failed load only on the main
    process; the others are checked for a missing file."""
    from accelerate.utils import RNG_STATE_NAME

    resume_dir = Path(resume_dir)
    failed = _rng_files_missing(resume_dir, accelerator)
    watched = logging.getLogger(_ACCELERATE_LOGGER)
    shown_from = watched.getEffectiveLevel()

    def watch(record: logging.LogRecord) -> bool:
        nonlocal failed
        if _RNG_FAILURE in record.getMessage():  # accelerate prefixes "[RANK n] "
            failed = True
        return record.levelno >= shown_from  # what was hidden before stays hidden

    level = watched.level
    watched.addFilter(watch)
    watched.setLevel(min(shown_from, logging.INFO))
    try:
        accelerator.load_state(str(resume_dir))
    finally:
        watched.removeFilter(watch)
        watched.setLevel(level)
    _, flags = all_ranks_agree(int(failed))
    if any(flags):
        ranks = [rank for rank, flag in enumerate(flags) if flag]
        raise CheckpointError(
            f"{resume_dir}: the random number generator state of process(es) {ranks} "
            f"({RNG_STATE_NAME}_<process>.pkl) is missing or could not be loaded; the resumed run would "
            "not reproduce the uninterrupted one (resume from another checkpoint, or start afresh)"
        )
