"""The training run behind ``recipes/train.py`` and ``itop-timm train``: one plain Accelerate loop.

config -> :func:`~.preflight.preflight` (every input checked, nothing written) -> the parts from
:mod:`.builders` (timm model, 🤗 data, timm optimizer and scheduler, the Sparsifier, weight averaging)
-> ``accelerator.prepare`` -> the loop (``accelerate.accumulate`` / ``backward`` / ``optimizer.step``;
masks and topology updates ride on the step) -> :mod:`.reporting` (evaluation, metrics.jsonl, plots,
the sparse checkpoint, summary.json).
"""

from __future__ import annotations

import contextlib
import logging
import math
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..distributed import full_state_dict, is_sharded, load_full_state_dict
from ..serialization import atomic_write_text
from ..sparsifier import Sparsifier
from .builders import (
    build_averager,
    build_loaders,
    build_lr_schedule,
    build_optimizer,
    build_sparsifier,
    create_model,
)
from .checkpointing import checkpoint_dir, register_state_hooks, remove_stale_temporaries, save_checkpoint
from .config import TrainConfig
from .fsdp import enable_fsdp_on_cpu, fsdp_plugin
from .preflight import InputError, preflight
from .reporting import MetricsLog, check_masks_identical, evaluate, write_outputs
from .resources import configure_threads, resolve_num_workers
from .resume import load_training_state, loss_window_state, restore_loss_window
from .tensor_data import build_tensor_loaders, device_batches, use_in_memory

__all__ = ["run", "TrainState", "InputError"]

_logger = logging.getLogger(__name__)


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


def _not_training(sparsifier: Sparsifier | None) -> contextlib.AbstractContextManager:
    """Optimizer steps in here (FSDP state (de)serialisation initialises optimizer state with a zero
    step) are not training steps for the sparsifier."""
    return sparsifier.paused() if sparsifier is not None else contextlib.nullcontext()


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
    num_classes = cfg.model.num_classes or splits.num_classes
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
    threads = configure_threads(cfg.run.num_threads)

    model = create_model(cfg, num_classes)
    in_memory = use_in_memory(cfg.data, cfg.model, [splits.train, splits.val, splits.test])
    if in_memory:  # decoded once, augmented per batch on the device: workers only when asked for
        workers = 0 if cfg.data.num_workers == "auto" else int(cfg.data.num_workers)
        pin = accelerator.device.type == "cuda"
        train_set, loaders = build_tensor_loaders(cfg, splits, model, workers, pin_memory=pin)
    else:
        workers = resolve_num_workers(cfg.data.num_workers, threads, accelerator.device.type)
        train_set, loaders = build_loaders(cfg, splits, model, workers)
    _logger.info("data: %s path, %d loader worker(s)", "in-memory" if in_memory else "PIL", workers)
    optimizer = build_optimizer(cfg, model)
    names = list(loaders)
    prepared = accelerator.prepare(model, optimizer, *[loaders[n] for n in names])
    model, optimizer = prepared[0], prepared[1]
    loaders = dict(zip(names, prepared[2:], strict=True))
    train_loader = loaders["train"]
    steps_per_epoch = math.ceil(len(train_loader) / cfg.train.gradient_accumulation_steps)
    total_steps = cfg.train.epochs * steps_per_epoch
    scheduler, stages = build_lr_schedule(cfg, optimizer.optimizer, steps_per_epoch, total_steps)
    sparsifier = build_sparsifier(cfg, accelerator.unwrap_model(model), optimizer, total_steps)
    averager = build_averager(cfg, accelerator.unwrap_model(model), optimizer, sparsifier, steps_per_epoch)
    topology_updates: list[dict[str, Any]] = []  # filled by the sparsifier, drained after each step
    if sparsifier is not None:
        sparsifier.register_update_hook(lambda sp, stats: topology_updates.append(stats))

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
        with _not_training(sparsifier):
            load_training_state(accelerator, resume_dir)
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
    loss_count = restore_loss_window(state.loss_window, accelerator, loss_sum)
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
        state.loss_window = loss_window_state(accelerator, loss_sum, loss_count)
        with _not_training(sparsifier):
            save_checkpoint(accelerator, output, state.step, config_dict, cfg.run.keep_checkpoints)

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
        for x, y in device_batches(loader, train_set, epoch):
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
                    from ..averaging import update_bn

                    record["bn_batches"] = update_bn(
                        accelerator.unwrap_model(model), loaders["bn"], cfg.averaging.bn_update_batches
                    )
                log.write(record)
            for stats in topology_updates:
                update = {k: v for k, v in stats.items() if k != "layers"}
                if "skipped" not in update:
                    update["mask_fingerprint"] = check_masks_identical(sparsifier, state.step)
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
            topology_updates.clear()
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
                unwrapped = accelerator.unwrap_model(model)
                if main or is_sharded(unwrapped):  # sharded: every rank gathers
                    weights = full_state_dict(unwrapped)
                if main:
                    from safetensors.torch import save_file

                    from ..serialization import atomic_write_bytes

                    weights = {k: v.contiguous() for k, v in weights.items()}
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
        "num_threads": threads.threads,
        "num_threads_source": threads.source,
        "num_workers": workers,
        "data_path": "in_memory" if in_memory else "pil",
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
            load_full_state_dict(unwrapped, load_file(str(best_path)))
            best = evaluate(model, loaders["test"], accelerator)
            unwrapped.load_state_dict(current)
            summary |= {"test_top1_best": best["top1"], "test_top5_best": best["top5"]}
    if main:
        log.write({"event": "summary", "step": state.step, **summary})
    write_outputs(  # every rank: sharded masks and weights are gathered; rank 0 writes
        cfg,
        output,
        accelerator.unwrap_model(model),
        sparsifier,
        state.itop_history,
        log,
        summary,
        splits.class_names,
        main,
    )
    accelerator.wait_for_everyone()
    if cfg.run.tensorboard:
        accelerator.end_training()
    return summary
