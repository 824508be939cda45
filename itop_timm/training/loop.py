"""The training run behind ``recipes/train.py`` and ``itop-timm train``: a plain Accelerate loop.

config -> model (``timm.create_model``) -> data (🤗 datasets + timm transforms) -> timm optimizer
(``create_optimizer_v2``) and scheduler (``create_scheduler_v2``) -> ``itop_timm.sparsify`` -> loop
(``accelerator.accumulate`` / ``backward`` / ``optimizer.step``) -> evaluation, checkpoints, logs,
plots, a sparse checkpoint. Everything that can be wrong with the input is checked before anything
is written.
"""

from __future__ import annotations

import difflib
import json
import logging
import math
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .. import plots
from ..densities import sparse_parameter_shapes
from ..distributed import all_ranks_agree, masks_fingerprint
from ..serialization import atomic_write_text
from ..sparsifier import Sparsifier, SparsityConfig, sparsify
from .checkpointing import (
    checkpoint_dir,
    list_checkpoints,
    read_checkpoint_config,
    register_state_hooks,
    remove_stale_temporaries,
    resolve_resume,
    save_checkpoint,
)
from .config import TrainConfig, config_differences
from .data import ImageClassificationDataset, build_transforms, load_splits, make_loader, resolve_data_config

__all__ = ["run", "TrainState", "InputError", "preflight", "create_model", "evaluate"]

_logger = logging.getLogger(__name__)


class InputError(ValueError):
    """Bad input (config, model name, data, resume folder) found before training started."""


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

    def state_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for key in self.__dataclass_fields__:
            if key not in state:
                raise ValueError(f"train state misses {key!r}")
            setattr(self, key, state[key])


def check_model_name(name: str) -> None:
    import timm

    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
        hint = f"; did you mean {close}?" if close else "; see timm.list_models()"
        raise ValueError(f"unknown timm model {name!r}{hint}")


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


def preflight(cfg: TrainConfig) -> tuple[Path | None, Any]:
    """Validate everything that can be checked before training, writing nothing.

    Returns (checkpoint folder to resume from or None, the loaded data splits).
    """
    check_model_name(cfg.model.name)
    if cfg.train.mixed_precision == "fp16" and (cfg.run.cpu or not torch.cuda.is_available()):
        raise ValueError("train.mixed_precision=fp16 needs a CUDA GPU (loss scaling); use bf16 on the CPU")
    if not cfg.dense:
        options = {
            k: v for k, v in vars(cfg.sparsity).items() if k not in ("stop_fraction", "seed", "method")
        }
        SparsityConfig.resolve(cfg.sparsity.method, total_steps=1, **options)  # raises on bad values
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
        raise ValueError(
            f"no sparse tensor in {cfg.model.name} matches sparsity.include={cfg.sparsity.include} "
            f"minus sparsity.exclude={cfg.sparsity.exclude}"
        )
    return resume, splits


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: Any, accelerator: Any) -> dict[str, float]:
    """Top-1 / top-5 accuracy (%) and mean loss over ``loader`` (all processes)."""
    model.eval()
    correct1 = correct5 = loss_sum = 0.0
    count = 0
    for x, y in loader:
        logits = model(x).float()
        loss = F.cross_entropy(logits, y, reduction="none")
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        hit = top == y[:, None]
        loss, hit1, hit5, y = accelerator.gather_for_metrics((loss, hit[:, 0], hit.any(dim=1), y))
        loss_sum += float(loss.sum())
        correct1 += float(hit1.sum())
        correct5 += float(hit5.sum())
        count += y.numel()
    model.train()
    count = max(count, 1)
    return {
        "top1": 100.0 * correct1 / count,
        "top5": 100.0 * correct5 / count,
        "loss": loss_sum / count,
        "samples": count,
    }


class MetricsLog:
    """One JSON object per line in ``metrics.jsonl`` (main process only)."""

    def __init__(self, path: Path, enabled: bool, resume_step: int | None) -> None:
        self.path = path
        self.enabled = enabled
        if enabled and resume_step is not None and path.exists():
            kept = [
                line
                for line in path.read_text().splitlines()
                if line and json.loads(line).get("step", 0) <= resume_step
            ]
            atomic_write_text(path, "".join(line + "\n" for line in kept))
        elif enabled and resume_step is None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("")

    def write(self, record: Mapping[str, Any]) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record, default=float) + "\n")

    def records(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line]


def _check_masks_identical(sparsifier: Sparsifier, step: int) -> int:
    """All-gather a hash of the masks; stop with an error unless every rank holds the same masks."""
    masks = list(sparsifier.masks.values())
    agree, values = all_ranks_agree(masks_fingerprint(masks), masks[0])
    if not agree:
        raise RuntimeError(
            f"masks differ between ranks after the topology update at step {step}: fingerprints {values}"
        )
    return values[0]


def _build_loaders(
    cfg: TrainConfig, splits: Any, model: torch.nn.Module
) -> tuple[ImageClassificationDataset, dict[str, Any]]:
    """The training set (its augmentation is seeded per epoch) and the train/val/test(/bn) DataLoaders."""
    train_tf, eval_tf = build_transforms(cfg.data, cfg.model, model)
    mode = "L" if cfg.model.in_chans == 1 else "RGB"
    seed, workers = cfg.train.seed, cfg.data.num_workers

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


def _build_optimizer(cfg: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
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


def _build_lr_schedule(
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


def _build_sparsifier(
    cfg: TrainConfig, model: torch.nn.Module, optimizer: torch.optim.Optimizer, total_steps: int
) -> Sparsifier | None:
    if cfg.dense:
        return None
    s = cfg.sparsity
    return sparsify(
        model,
        optimizer,
        method=s.method,
        density=s.density,
        distribution=s.distribution,
        update_interval=s.update_interval,
        prune_rate=s.prune_rate,
        final_prune_rate=s.final_prune_rate,
        prune_schedule=s.prune_schedule,
        total_steps=total_steps,
        stop_step=None if s.stop_fraction is None else int(s.stop_fraction * total_steps),
        seed=cfg.train.seed if s.seed is None else s.seed,
        include=s.include,
        exclude=s.exclude,
    )


def run(cfg: TrainConfig) -> dict[str, Any]:
    """Train as configured; returns the summary (also written to ``<output_dir>/summary.json``)."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed
    from tqdm.auto import tqdm

    try:
        resume_dir, splits = preflight(cfg)
    except ValueError as err:
        raise InputError(str(err)) from err
    output = Path(cfg.run.output_dir)
    accelerator = Accelerator(
        # without a GPU, Accelerate only sets up multi-process (gloo) training when told it runs on the CPU
        cpu=cfg.run.cpu or not torch.cuda.is_available(),
        mixed_precision=cfg.train.mixed_precision,
        gradient_accumulation_steps=cfg.train.gradient_accumulation_steps,
        log_with="tensorboard" if cfg.run.tensorboard else None,
        project_config=ProjectConfiguration(project_dir=str(output), logging_dir=str(output / "tensorboard")),
    )
    main = accelerator.is_main_process
    if main:
        output.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(output)
        if resume_dir is None and cfg.run.overwrite:  # a fresh run replaces the old one's checkpoints
            shutil.rmtree(checkpoint_dir(output), ignore_errors=True)
            (output / "best.safetensors").unlink(missing_ok=True)
        atomic_write_text(output / "config.yaml", cfg.to_yaml())
    accelerator.wait_for_everyone()
    set_seed(cfg.train.seed)

    num_classes = cfg.model.num_classes or splits.num_classes
    model = create_model(cfg, num_classes)
    train_set, loaders = _build_loaders(cfg, splits, model)
    optimizer = _build_optimizer(cfg, model)
    names = list(loaders)
    prepared = accelerator.prepare(model, optimizer, *[loaders[n] for n in names])
    model, optimizer = prepared[0], prepared[1]
    loaders = dict(zip(names, prepared[2:], strict=True))
    train_loader = loaders["train"]
    steps_per_epoch = math.ceil(len(train_loader) / cfg.train.gradient_accumulation_steps)
    total_steps = cfg.train.epochs * steps_per_epoch
    scheduler, stages = _build_lr_schedule(cfg, optimizer.optimizer, steps_per_epoch, total_steps)
    sparsifier = _build_sparsifier(cfg, accelerator.unwrap_model(model), optimizer, total_steps)
    averager = None
    if cfg.averaging.enabled:
        from ..averaging import PeriodicWeightAveraging, update_bn

        averager = PeriodicWeightAveraging(
            accelerator.unwrap_model(model),
            optimizer,
            period_steps=max(1, round(cfg.averaging.period_epochs * steps_per_epoch)),
            sample_prob=cfg.averaging.sample_prob,
            last_fraction=cfg.averaging.last_fraction,
            sparsifier=sparsifier,
            seed=cfg.train.seed,
        )

    state = TrainState()
    stateful: dict[str, Any] = {"train_state": state}
    if sparsifier is not None:
        stateful["sparsifier"] = sparsifier
    if averager is not None:
        stateful["averaging"] = averager
    if stages is not None:
        stateful["rmda_stages"] = stages
    register_state_hooks(accelerator, stateful)
    if resume_dir is not None:
        accelerator.load_state(str(resume_dir))
        _logger.info(
            "resumed from %s at step %d (epoch %d, batch %d)",
            resume_dir,
            state.step,
            state.epoch,
            state.batches_in_epoch,
        )
    log = MetricsLog(output / "metrics.jsonl", main, state.step if resume_dir is not None else None)
    if cfg.run.tensorboard:
        accelerator.init_trackers(
            "itop_timm",
            config={f"{k}.{kk}": str(vv) for k, v in cfg.to_dict().items() for kk, vv in v.items()},
        )

    config_dict = cfg.to_dict()
    best_path = output / "best.safetensors"
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=cfg.train.label_smoothing)
    world = accelerator.num_processes
    samples_per_step = cfg.data.batch_size * world * cfg.train.gradient_accumulation_steps
    progress = tqdm(
        total=total_steps,
        initial=state.step,
        disable=not (main and cfg.run.progress),
        desc="train",
        dynamic_ncols=True,
    )
    loss_sum = torch.zeros((), device=accelerator.device)
    loss_count = 0
    window_start, window_steps = time.perf_counter(), 0
    run_start = time.perf_counter() - state.train_seconds

    def log_eval(split: str, loader: Any) -> dict[str, float]:
        result = evaluate(model, loader, accelerator)
        record = {"event": "eval", "split": split, "epoch": state.epoch, "step": state.step, **result}
        log.write(record)
        if split == "val":
            state.eval_history.append(record)
        if cfg.run.tensorboard:
            accelerator.log({f"{split}/{k}": v for k, v in result.items()}, step=state.step)
        return result

    def checkpoint() -> None:
        state.train_seconds = time.perf_counter() - run_start
        save_checkpoint(accelerator, output, state.step, config_dict, cfg.run.keep_checkpoints)

    seen_update = sparsifier.last_update if sparsifier is not None else None
    seen_writeback = averager.last_writeback if averager is not None else None
    model.train()
    start_epoch = state.epoch
    for epoch in range(start_epoch, cfg.train.epochs):
        state.epoch = epoch
        train_set.set_epoch(epoch)
        train_loader.set_epoch(epoch)
        loader = train_loader
        if state.batches_in_epoch:
            loader = accelerator.skip_first_batches(train_loader, state.batches_in_epoch)
        for x, y in loader:
            with accelerator.accumulate(model):
                loss = criterion(model(x), y)
                accelerator.backward(loss)
                if accelerator.sync_gradients and cfg.optim.clip_grad is not None:
                    accelerator.clip_grad_norm_(model.parameters(), cfg.optim.clip_grad)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            state.batches_in_epoch += 1
            loss_sum += loss.detach()
            loss_count += 1
            if not accelerator.sync_gradients:
                continue
            state.step += 1
            window_steps += 1
            progress.update(1)
            if scheduler is not None:
                scheduler.step_update(num_updates=state.step)
            if stages is not None:
                stages.step()
            if averager is not None and averager.last_writeback is not seen_writeback:
                seen_writeback = averager.last_writeback
                record = {"event": "averaging", "step": state.step, "epoch": epoch, **seen_writeback}
                if seen_writeback["wrote_back"] and cfg.averaging.bn_update_batches:
                    # the averaged weights need BatchNorm statistics of their own
                    record["bn_batches"] = update_bn(
                        accelerator.unwrap_model(model), loaders["bn"], cfg.averaging.bn_update_batches
                    )
                log.write(record)
            if sparsifier is not None and sparsifier.last_update is not seen_update:
                seen_update = sparsifier.last_update
                update = {k: v for k, v in seen_update.items() if k != "layers"}
                if "skipped" not in update:
                    update["mask_fingerprint"] = _check_masks_identical(sparsifier, state.step)
                    update["ranks"] = world
                    state.itop_history.append({"step": state.step, "itop_rate": update["itop_rate"]})
                log.write(
                    {
                        "event": "topology_update",
                        "epoch": epoch,
                        **update,
                        "sparsifier_step": update["step"],
                        "step": state.step,
                    }
                )
            if state.step % cfg.run.log_interval == 0 or state.step == total_steps:
                mean_loss = float(accelerator.reduce(loss_sum / max(loss_count, 1), "mean"))
                elapsed = time.perf_counter() - window_start
                record = {
                    "event": "train",
                    "step": state.step,
                    "epoch": epoch,
                    "loss": mean_loss,
                    "lr": optimizer.param_groups[0]["lr"],
                    "samples_per_s": window_steps * samples_per_step / max(elapsed, 1e-9),
                    "elapsed_s": time.perf_counter() - run_start,
                }
                if sparsifier is not None:
                    record |= {"density": sparsifier.density, "itop_rate": sparsifier.itop_rate}
                if getattr(optimizer.optimizer, "regularizer", None) is not None:  # RMDA / ProxSGD
                    record |= optimizer.optimizer.group_sparsity()
                log.write(record)
                if cfg.run.tensorboard:
                    accelerator.log(
                        {f"train/{k}": v for k, v in record.items() if k not in ("event",)}, step=state.step
                    )
                postfix = {"loss": f"{mean_loss:.3f}", "lr": f"{record['lr']:.3g}"}
                if sparsifier is not None:
                    postfix |= {"density": f"{record['density']:.3f}", "R_s": f"{record['itop_rate']:.3f}"}
                progress.set_postfix(postfix)
                loss_sum.zero_()
                loss_count = 0
                window_start, window_steps = time.perf_counter(), 0
            if (
                cfg.run.checkpoint_interval
                and state.step % cfg.run.checkpoint_interval == 0
                and state.step < total_steps
            ):
                checkpoint()
        # end of epoch
        if "val" in loaders:
            result = log_eval("val", loaders["val"])
            if result["top1"] > state.best_val_top1:
                state.best_val_top1, state.best_epoch = result["top1"], epoch
                if main:
                    from safetensors.torch import save_file

                    from ..serialization import atomic_write_bytes

                    weights = {
                        k: v.detach().cpu().contiguous()
                        for k, v in accelerator.unwrap_model(model).state_dict().items()
                    }
                    atomic_write_bytes(best_path, lambda p, w=weights: save_file(w, str(p)))
        state.epoch, state.batches_in_epoch = epoch + 1, 0
        if not cfg.run.checkpoint_interval and epoch + 1 < cfg.train.epochs:
            checkpoint()
    progress.close()
    state.train_seconds = time.perf_counter() - run_start
    checkpoint()

    summary: dict[str, Any] = {
        "model": cfg.model.name,
        "method": cfg.sparsity.method,
        "num_processes": world,
        "epochs": cfg.train.epochs,
        "total_steps": total_steps,
        "wall_time_s": state.train_seconds,
        "steps_per_s": total_steps / max(state.train_seconds, 1e-9),
        "samples_per_s": total_steps * samples_per_step / max(state.train_seconds, 1e-9),
        "best_val_top1": state.best_val_top1 if "val" in loaders else None,
        "best_epoch": state.best_epoch if "val" in loaders else None,
    }
    if sparsifier is not None:
        summary |= {
            "density": sparsifier.density,
            "itop_rate": sparsifier.itop_rate,
            "target_density": cfg.sparsity.density,
        }
    if "test" in loaders:
        last = evaluate(model, loaders["test"], accelerator)
        summary |= {
            "test_top1_last": last["top1"],
            "test_top5_last": last["top5"],
            "test_loss_last": last["loss"],
        }
        if best_path.exists():
            from safetensors.torch import load_file

            unwrapped = accelerator.unwrap_model(model)
            current = {k: v.detach().clone() for k, v in unwrapped.state_dict().items()}
            accelerator.wait_for_everyone()
            unwrapped.load_state_dict(load_file(str(best_path)))
            best = evaluate(model, loaders["test"], accelerator)
            unwrapped.load_state_dict(current)
            summary |= {"test_top1_best": best["top1"], "test_top5_best": best["top5"]}
    if main:
        log.write({"event": "summary", "step": state.step, **summary})
        _write_outputs(
            cfg, output, accelerator.unwrap_model(model), sparsifier, state, log, summary, splits.class_names
        )
    accelerator.wait_for_everyone()
    if cfg.run.tensorboard:
        accelerator.end_training()
    return summary


def _write_outputs(
    cfg: TrainConfig,
    output: Path,
    model: torch.nn.Module,
    sparsifier: Sparsifier | None,
    state: TrainState,
    log: MetricsLog,
    summary: dict[str, Any],
    class_names: list[str],
) -> None:
    records = log.records()
    plots.plot_learning_curves(
        [r for r in records if r.get("event") == "train"],
        [r for r in records if r.get("event") == "eval"],
        output / "plots" / "learning_curves.png",
        title=f"{cfg.model.name} {cfg.sparsity.method}",
    )
    if sparsifier is not None:
        history = [{"step": 0, "itop_rate": sparsifier.density}, *state.itop_history]
        plots.plot_itop_rate(
            history,
            output / "plots" / "itop_rate.png",
            density=sparsifier.density,
            title=f"R_s: {cfg.model.name} {cfg.sparsity.method} d={cfg.sparsity.density}",
        )
        plots.plot_layer_densities(
            sparsifier.layer_densities(),
            output / "plots" / "layer_density.png",
            itop_rates=sparsifier.layer_itop_rates(),
            target=sparsifier.target_densities,
        )
    if cfg.run.save_sparse:
        from ..checkpoint import save_sparse

        metrics = {
            k: summary[k]
            for k in ("test_top1_last", "test_top5_last", "best_val_top1")
            if summary.get(k) is not None
        }
        save_sparse(
            model,
            sparsifier,
            output / "model",
            model_name=cfg.model.name,
            metrics=metrics,
            dataset=cfg.data.dataset,
            label_names=class_names,
            data_config=resolve_data_config(cfg.data, cfg.model, model),
        )
    atomic_write_text(output / "summary.json", json.dumps(summary, indent=2))
