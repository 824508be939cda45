"""Everything that can be wrong with a run's input, checked before anything is written."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import torch

from ..config import SparsityConfig
from ..densities import sparse_parameter_shapes
from ..sparsifier import Sparsifier
from .builders import create_model, sparsity_config
from .checkpointing import checkpoint_dir, list_checkpoints, read_checkpoint_config, resolve_resume
from .config import TrainConfig
from .data import load_splits
from .fsdp import check_fsdp_options
from .resume import config_differences

__all__ = ["InputError", "check_model_name", "preflight"]


class InputError(ValueError):
    """Bad input (config, model name, data, resume folder) found before training started."""


def check_model_name(name: str) -> None:
    import timm

    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
        hint = f"; did you mean {close}?" if close else "; see timm.list_models()"
        raise ValueError(f"unknown timm model {name!r}{hint}")


def preflight(cfg: TrainConfig) -> tuple[Path | None, Any, SparsityConfig | None]:
    """Validate everything that can be checked before training, writing nothing.

    Returns (checkpoint folder to resume from or None, the loaded data splits, the sparsity config the
    architecture was checked with or None for a dense run: its structure rule is built and has traced
    the model, so the run reuses it).
    """
    check_model_name(cfg.model.name)
    check_fsdp_options(cfg)
    if cfg.train.mixed_precision == "fp16" and (cfg.run.cpu or not torch.cuda.is_available()):
        raise ValueError("train.mixed_precision=fp16 needs a CUDA GPU (loss scaling); use bf16 on the CPU")
    # the method's defaults and options, validated (total_steps is known once the data is prepared)
    config = None if cfg.dense else sparsity_config(cfg, total_steps=1)
    if cfg.optim.opt.lower() in ("rmda", "proxsgd") and cfg.optim.weight_decay:
        raise ValueError(
            f"optim.opt={cfg.optim.opt} takes no weight decay (its weight_lambda regularises): set optim.weight_decay 0"
        )
    if cfg.optim.opt.lower() == "rmda" and cfg.sched.name.lower() not in ("multistep", "none"):
        raise ValueError(
            f"optim.opt=rmda follows the paper's stage schedule: sched.name multistep (or none), got {cfg.sched.name!r}"
        )
    if cfg.averaging.enabled:
        from ..averaging import validate_averaging_options

        validate_averaging_options(cfg.averaging)
    if cfg.run.tensorboard:
        try:
            import tensorboard  # noqa: F401
        except ImportError as err:
            raise ValueError(
                "run.tensorboard=true needs the tensorboard package (pip install itop-timm[tensorboard])"
            ) from err
    resume = None
    if cfg.run.resume:
        resume = resolve_resume(cfg.run.resume, cfg.run.output_dir)
        diffs = config_differences(read_checkpoint_config(resume), cfg.to_dict())
        if diffs:
            raise ValueError(
                f"cannot resume {str(resume)!r}: it was saved with a different config:\n  "
                + "\n  ".join(diffs)
            )
    elif list_checkpoints(checkpoint_dir(cfg.run.output_dir)) and not cfg.run.overwrite:
        raise ValueError(
            f"{cfg.run.output_dir!r} already holds checkpoints of another run: pass --run.resume latest to continue it, "
            "--run.output_dir to start elsewhere, or --run.overwrite true"
        )
    splits = load_splits(cfg.data, cfg.train.seed)
    if cfg.model.num_classes is not None and cfg.model.num_classes < splits.num_classes:
        raise ValueError(
            f"model.num_classes={cfg.model.num_classes} but the data set has {splits.num_classes} classes"
        )
    with (
        torch.random.fork_rng()
    ):  # a probe model: its arguments and sparse tensors are checked, the RNG untouched
        try:
            probe = create_model(cfg, cfg.model.num_classes or splits.num_classes)
        except (TypeError, ValueError, RuntimeError) as err:
            raise ValueError(f"timm cannot build {cfg.model.name!r} with this config: {err}") from err
    if not cfg.dense and not sparse_parameter_shapes(probe, cfg.sparsity.include, cfg.sparsity.exclude):
        sections = cfg.to_dict()["sparsity"]  # patterns as lists, as in the YAML
        raise ValueError(
            f"no sparse tensor in {cfg.model.name} matches sparsity.include={sections['include']} "
            f"minus sparsity.exclude={sections['exclude']}"
        )
    if config is not None and config.structure_rule() is not None:
        # the method's structure rule checks the architecture (chase: removable channel groups) when a
        # sparsifier binds it: a throw-away one on the probe
        with torch.random.fork_rng():
            Sparsifier(probe, torch.optim.SGD(probe.parameters(), lr=0.0), config).remove()
    return resume, splits, config
