"""Builders of a training run's parts from its config: the Accelerator, the timm model, data loaders,
optimizer, learning-rate schedule, sparsifier and weight averager. Each is one call to the library it
comes from."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import SparsityConfig
from ..sparsifier import Sparsifier
from .config import TrainConfig
from .fsdp import enable_fsdp_on_cpu, fsdp_plugin
from .loaders import ImageClassificationDataset, build_transforms, make_loader
from .resources import ThreadPlan, resolve_num_workers
from .tensor_data import build_tensor_loaders, use_in_memory

__all__ = [
    "build_accelerator",
    "create_model",
    "RunData",
    "build_data",
    "build_loaders",
    "build_optimizer",
    "build_lr_schedule",
    "build_sparsifier",
    "build_averager",
]


def create_model(cfg: TrainConfig, num_classes: int) -> torch.nn.Module:
    """``timm.create_model`` with the config's classes, channels and (for ViT-like models) resolution."""
    import timm

    kwargs = dict(cfg.model.kwargs)
    common = {"pretrained": cfg.model.pretrained, "num_classes": num_classes, "in_chans": cfg.model.in_chans}
    if "img_size" not in kwargs:
        try:
            return timm.create_model(cfg.model.name, img_size=cfg.model.img_size, **common, **kwargs)
        except TypeError as err:
            if "img_size" not in str(err):
                raise
    return timm.create_model(cfg.model.name, **common, **kwargs)


def build_accelerator(cfg: TrainConfig, num_classes: int) -> Any:
    """The run's ``accelerate.Accelerator``: mixed precision, gradient accumulation, TensorBoard, and
    FSDP2 (one unit per timm block) when ``train.fsdp``."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    output = Path(cfg.run.output_dir)
    plugin = None
    if cfg.train.fsdp:
        with torch.device("meta"):  # only the module classes are read
            plugin = fsdp_plugin(create_model(cfg, num_classes))
    accelerator = Accelerator(
        fsdp_plugin=plugin,
        # without a GPU, Accelerate only sets up multi-process (gloo) training when told it runs on the CPU
        cpu=cfg.run.cpu or not torch.cuda.is_available(),
        mixed_precision=cfg.train.mixed_precision,
        gradient_accumulation_steps=cfg.train.gradient_accumulation_steps,
        log_with="tensorboard" if cfg.run.tensorboard else None,
        project_config=ProjectConfiguration(project_dir=str(output), logging_dir=str(output / "tensorboard")),
    )
    if plugin is not None:
        enable_fsdp_on_cpu(accelerator, plugin)
    return accelerator


@dataclass
class RunData:
    """The training set (seeded per epoch), the loaders by role (before ``accelerator.prepare``), and
    how they were built."""

    train_set: Any
    loaders: dict[str, Any]
    workers: int
    in_memory: bool


def build_data(
    cfg: TrainConfig, splits: Any, model: torch.nn.Module, threads: ThreadPlan, device: torch.device
) -> RunData:
    """The in-memory path (:mod:`.tensor_data`) when the decoded splits fit, else timm's PIL one
    (:func:`build_loaders`) with ``data.num_workers`` resolved for ``threads`` and ``device``."""
    in_memory = use_in_memory(cfg.data, cfg.model, [splits.train, splits.val, splits.test])
    if in_memory:  # decoded once, augmented per batch on the device: workers only when asked for
        workers = 0 if cfg.data.num_workers == "auto" else int(cfg.data.num_workers)
        pin = device.type == "cuda"
        train_set, loaders = build_tensor_loaders(cfg, splits, model, workers, pin_memory=pin)
    else:
        workers = resolve_num_workers(cfg.data.num_workers, threads, device.type)
        train_set, loaders = build_loaders(cfg, splits, model, workers)
    return RunData(train_set, loaders, workers, in_memory)


def build_loaders(
    cfg: TrainConfig, splits: Any, model: torch.nn.Module, workers: int
) -> tuple[ImageClassificationDataset, dict[str, Any]]:
    """The training set (its augmentation is seeded per epoch) and the train/val/test(/bn) DataLoaders
    of timm's PIL transforms, run by ``workers`` loader processes (the in-memory path:
    :func:`itop_timm.training.tensor_data.build_tensor_loaders`)."""
    train_tf, eval_tf = build_transforms(cfg.data, cfg.model, model)
    mode = "L" if cfg.model.in_chans == 1 else "RGB"
    seed = cfg.train.seed

    def dataset(split: Any, transform: Any, augment_seed: int | None = None) -> ImageClassificationDataset:
        return ImageClassificationDataset(
            split, splits.image_column, splits.label_column, transform, mode, seed=augment_seed
        )

    train_set = dataset(splits.train, train_tf, seed)
    loaders = {
        "train": make_loader(train_set, cfg.data.batch_size, train=True, seed=seed, num_workers=workers)
    }
    for name in ("val", "test"):
        split = getattr(splits, name)
        if split is not None:
            loaders[name] = make_loader(
                dataset(split, eval_tf), cfg.data.eval_batch_size, train=False, seed=seed, num_workers=workers
            )
    if cfg.averaging.enabled and cfg.averaging.bn_update_batches:
        # BatchNorm re-estimation after a weight-averaging write-back: training images, no augmentation
        loaders["bn"] = make_loader(
            dataset(splits.train, eval_tf), cfg.data.batch_size, train=False, seed=seed, num_workers=workers
        )
    return train_set, loaders


def build_optimizer(cfg: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    """timm's ``create_optimizer_v2``; ``regularizer: coupled`` becomes a group LASSO over torch-pruning's
    removable channel groups (RMDA / ProxSGD)."""
    from timm.optim import create_optimizer_v2

    kwargs = dict(cfg.optim.kwargs)
    if kwargs.get("regularizer") == "coupled":
        from ..structured import GroupLasso

        example = torch.zeros(1, cfg.model.in_chans, cfg.model.img_size, cfg.model.img_size)
        kwargs["regularizer"] = GroupLasso.coupled(model, example)
    return create_optimizer_v2(
        model,
        cfg.optim.opt,
        lr=cfg.optim.lr,
        weight_decay=cfg.optim.weight_decay,
        momentum=cfg.optim.momentum,
        **kwargs,
    )


def build_lr_schedule(
    cfg: TrainConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int, total_steps: int
) -> tuple[Any, Any]:
    """(timm scheduler stepped per optimizer step, or RMDA's milestone stages), either may be None."""
    from timm.scheduler import create_scheduler_v2

    name = cfg.sched.name.lower()
    if cfg.optim.opt.lower() == "rmda":
        if name != "multistep":
            return None, None
        from ..structured import RMDAStages  # the paper's stages: lr x decay, c / decay, restart

        milestones = [max(1, round(m * total_steps)) for m in cfg.sched.milestones]
        return None, RMDAStages(optimizer, milestones, gamma=cfg.sched.decay_rate)
    if name == "none":
        return None, None
    scheduler, _ = create_scheduler_v2(
        optimizer,
        sched=cfg.sched.name,
        num_epochs=cfg.train.epochs,
        decay_milestones=[m * cfg.train.epochs for m in cfg.sched.milestones],
        decay_rate=cfg.sched.decay_rate,
        warmup_epochs=cfg.sched.warmup_epochs,
        warmup_lr=cfg.sched.warmup_lr,
        min_lr=cfg.sched.min_lr,
        step_on_epochs=False,
        updates_per_epoch=steps_per_epoch,
    )
    return scheduler, None


def build_sparsifier(
    cfg: TrainConfig,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    checked: SparsityConfig | None = None,
) -> Sparsifier | None:
    """The run's :class:`~itop_timm.Sparsifier` (``None`` for ``sparsity.method: dense``); ``checked``:
    the config preflight checked the architecture with, whose structure rule (and trace) is reused."""
    if cfg.dense:
        return None
    config = sparsity_config(cfg, total_steps)
    if checked is not None:
        config = checked.replace(**config.library_fields())
    # a model that shrinks (Chase with shrink) is sliced between steps, where the loop can take a DDP
    # wrapper off: TrainingRun.shrink_between_steps
    return Sparsifier(model, optimizer, config, defer_shrink=True)


def sparsity_config(cfg: TrainConfig, total_steps: int) -> SparsityConfig:
    """The run's resolved :class:`~itop_timm.SparsityConfig`; a structure rule that traces the model
    (chase's ``input_size``) traces it at the run's input size unless the config sets one."""
    config = cfg.sparsity.for_run(total_steps, cfg.train.seed)
    rule = config.method_info.structure
    options = config.method_options or {}
    if (
        rule is not None
        and "input_size" in {f.name for f in dataclasses.fields(rule)}
        and "input_size" not in options
    ):
        size = [cfg.model.in_chans, cfg.model.img_size, cfg.model.img_size]
        config = config.replace(method_options={**options, "input_size": size})
    return config


def build_averager(
    cfg: TrainConfig,
    model: torch.nn.Module,
    optimizer: Any,
    sparsifier: Sparsifier | None,
    steps_per_epoch: int,
) -> Any:
    """Periodic sampled weight averaging as configured (``None`` when ``averaging.enabled`` is false)."""
    if not cfg.averaging.enabled:
        return None
    from ..averaging import PeriodicWeightAveraging

    return PeriodicWeightAveraging(
        model,
        optimizer,
        period_steps=max(1, round(cfg.averaging.period_epochs * steps_per_epoch)),
        sample_prob=cfg.averaging.sample_prob,
        last_fraction=cfg.averaging.last_fraction,
        sparsifier=sparsifier,
        seed=cfg.train.seed,
    )
