"""Everything that can be wrong with a run's input, checked before anything is written."""

from __future__ import annotations

import difflib
import math
import os
from pathlib import Path
from typing import Any

import torch

from ..config import SparsityConfig
from ..densities import sparse_parameter_shapes
from ..sparsifier import Sparsifier
from .builders import create_model, sparsity_config
from .checkpointing import read_checkpoint_config, resolve_resume
from .config import TrainConfig
from .data import check_labels, load_splits
from .fsdp import check_fsdp_options
from .output_folder import check_writable, previous_results
from .reporting import read_metrics
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


def check_sparse_compute(cfg: TrainConfig) -> None:
    """``sparsity.compute=sparse`` runs fp32 CPU kernels: refuse a GPU run and mixed precision."""
    if not cfg.run.cpu and torch.cuda.is_available():
        raise ValueError(
            "sparsity.compute=sparse runs CPU kernels, and this run would train on the GPU: "
            "set run.cpu true, or use sparsity.compute masked (or auto, which stays dense on a GPU)"
        )
    if cfg.train.mixed_precision not in ("no", None):
        raise ValueError(
            f"sparsity.compute=sparse computes in fp32, not with train.mixed_precision="
            f"{cfg.train.mixed_precision}: set train.mixed_precision no, or use sparsity.compute auto"
        )


def single_process_steps(cfg: TrainConfig, train_samples: int) -> int:
    """The run's optimizer steps on one process (the train loader drops a last partial batch); with
    several processes sharing the batches, a run has at most this many."""
    batches = max(1, train_samples // cfg.data.batch_size)
    return cfg.train.epochs * math.ceil(batches / cfg.train.gradient_accumulation_steps)


def check_shrink_options(cfg: TrainConfig) -> None:
    """Refuse what a model that shrinks during training (Chase with ``shrink``) cannot run under."""
    if cfg.train.fsdp:
        raise ValueError(
            "sparsity.method_options.shrink with train.fsdp=true: sharded parameters cannot be sliced in "
            "place (Chase traces whole tensors); use DDP (train.fsdp false) or leave shrink off"
        )
    backend = os.environ.get("ACCELERATE_DYNAMO_BACKEND", "no")
    if backend.lower() != "no":
        raise ValueError(
            f"sparsity.method_options.shrink with torch.compile (accelerate launch --dynamo_backend "
            f"{backend.lower()}): every shrink changes the parameters' shapes, so the compiled model would be "
            f"recompiled at every channel removal, past torch.compile's recompile limit; launch with "
            f"--dynamo_backend no, or leave shrink off"
        )


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
    if config is not None and config.compute == "sparse":
        check_sparse_compute(cfg)
    if config is not None and (rule := config.structure_rule()) is not None and rule.shrinks:
        check_shrink_options(cfg)
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
    check_writable(cfg.run.output_dir)
    resume = None
    if cfg.run.resume:
        resume = resolve_resume(cfg.run.resume, cfg.run.output_dir)
        diffs = config_differences(read_checkpoint_config(resume), cfg.to_dict())
        if diffs:
            raise ValueError(
                f"cannot resume {str(resume)!r}: it was saved with a different config:\n  "
                + "\n  ".join(diffs)
            )
        read_metrics(Path(cfg.run.output_dir) / "metrics.jsonl")  # only its last line may be torn
    elif not cfg.run.overwrite and (found := previous_results(cfg.run.output_dir)):
        resume_hint = "pass --run.resume latest to continue it, " if "checkpoints" in found else ""
        raise ValueError(
            f"{cfg.run.output_dir!r} already holds the results of another run ({', '.join(found)}): "
            f"{resume_hint}pass --run.output_dir to start elsewhere, or --run.overwrite true to replace them"
        )
    splits = load_splits(cfg.data, cfg.train.seed)
    if cfg.model.num_classes is not None and cfg.model.num_classes < splits.num_classes:
        raise ValueError(
            f"model.num_classes={cfg.model.num_classes} but the data set has {splits.num_classes} classes"
        )
    check_labels(splits, cfg.model.num_classes or splits.num_classes, cfg.data)  # e.g. -1: unlabeled
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
    if config is not None:  # at the run's length: a structure rule checks its schedule (chase: T_c)
        config = sparsity_config(cfg, single_process_steps(cfg, len(splits.train)))
    if config is not None and (config.structure_rule() is not None or config.compute != "masked"):
        # the method's structure rule checks the architecture (chase: removable channel groups), and
        # compute sparse/auto checks the layers and builds the kernels, when a sparsifier binds them:
        # a throw-away one on the probe
        with torch.random.fork_rng():
            Sparsifier(probe, torch.optim.SGD(probe.parameters(), lr=0.0), config).remove()
    return resume, splits, config
