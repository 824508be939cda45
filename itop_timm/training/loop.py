"""The training run behind ``recipes/train.py`` and ``itop-timm train``: one plain Accelerate loop.

:func:`run` reads like Accelerate's example training functions, in the three parts of :class:`TrainingRun`:

* :meth:`~TrainingRun.set_up`: config -> :func:`~.preflight.preflight` (every input checked, nothing
  written) -> the Accelerator and the output folder -> the parts from :mod:`.builders` (timm model,
  🤗 data, timm optimizer and scheduler, the Sparsifier, weight averaging) -> ``accelerator.prepare``
  -> the state of the checkpoint resumed from;
* :meth:`~TrainingRun.train_epoch`: ``accelerator.accumulate`` / ``backward`` / ``optimizer.step``
  (masks and topology updates ride on the step), then per optimizer step the learning rate, the
  metrics log (topology updates through the sparsifier's update hook: :class:`~.reporting.TopologyLog`)
  and checkpoints (the logged lr is the one the step trained with); at the epoch's end validation, the
  best weights and the epoch's console line (:func:`~.reporting.epoch_line`, main process);
* :meth:`~TrainingRun.finish`: the last checkpoint, the test evaluation and :mod:`.reporting`'s outputs
  (metrics.jsonl, plots, the sparse checkpoint, summary.json).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from ..distributed import all_ranks_agree
from ..serialization import atomic_write_text
from ..sparsifier import Sparsifier
from ..validation import short_repr
from .builders import (
    build_accelerator,
    build_averager,
    build_data,
    build_lr_schedule,
    build_optimizer,
    build_sparsifier,
    create_model,
)
from .checkpointing import register_state_hooks, remove_stale_temporaries, save_checkpoint
from .config import TrainConfig
from .ddp import put_on_ddp, take_off_ddp
from .output_folder import OutputBusyError, OutputLock, remove_previous_results
from .preflight import InputError, preflight
from .reporting import (
    MetricsLog,
    TopologyLog,
    epoch_line,
    evaluate,
    evaluate_saved_weights,
    launch_warnings,
    save_best_weights,
    write_outputs,
)
from .resources import configure_threads
from .resume import TrainState, load_training_state, loss_window_state, restore_loss_window
from .tensor_data import device_batches

__all__ = ["run", "TrainingRun", "TrainState", "InputError"]

_logger = logging.getLogger(__name__)


def _not_training(sparsifier: Sparsifier | None) -> contextlib.AbstractContextManager:
    """Optimizer steps in here (FSDP state (de)serialisation initialises optimizer state with a zero
    step) are not training steps for the sparsifier."""
    return sparsifier.paused() if sparsifier is not None else contextlib.nullcontext()


def run(cfg: TrainConfig) -> dict[str, Any]:
    """Train as configured; returns the summary (also written to ``<output_dir>/summary.json``)."""
    training = TrainingRun(cfg)
    try:
        training.set_up()
        for epoch in range(training.state.epoch, cfg.train.epochs):
            training.train_epoch(epoch)
        return training.finish()
    finally:
        training.close()


class TrainingRun:
    """One run of the recipe: :meth:`set_up`, :meth:`train_epoch` for each epoch left, :meth:`finish`."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.output = Path(cfg.run.output_dir)
        self.best_path = self.output / "best.safetensors"
        self.lock: OutputLock | None = None

    # ------------------------------------------------------------------ set-up
    def set_up(self) -> None:
        """Check every input, then build and prepare the run's parts and restore a resumed checkpoint.
        Bad input raises :class:`InputError` before anything is written."""
        from accelerate.utils import set_seed

        cfg = self.cfg
        try:
            resume_dir, self.splits, checked_sparsity = preflight(cfg)
        except ValueError as err:
            raise InputError(str(err)) from err
        num_classes = cfg.model.num_classes or self.splits.num_classes
        self.accelerator = accelerator = build_accelerator(cfg, num_classes)
        self.main = accelerator.is_main_process
        if self.main:
            for warning in launch_warnings(
                accelerator.num_processes, accelerator.device.type, accelerator.mixed_precision
            ):
                _logger.warning("%s", warning)
        self._prepare_output(fresh=resume_dir is None)
        set_seed(cfg.train.seed)
        self.threads = configure_threads(cfg.run.num_threads)

        model = create_model(cfg, num_classes)
        self.data = data = build_data(cfg, self.splits, model, self.threads, accelerator.device)
        _logger.info(
            "data: %s path, %d loader worker(s)", "in-memory" if data.in_memory else "PIL", data.workers
        )
        optimizer = build_optimizer(cfg, model)
        names = list(data.loaders)
        # (no local reference to a DDP wrapper: a shrinking model takes it off while resuming)
        self.model, self.optimizer, *loaders = accelerator.prepare(
            model, optimizer, *[data.loaders[n] for n in names]
        )
        self.loaders = dict(zip(names, loaders, strict=True))
        self.train_loader = self.loaders["train"]
        steps_per_epoch = math.ceil(len(self.train_loader) / cfg.train.gradient_accumulation_steps)
        self.total_steps = cfg.train.epochs * steps_per_epoch
        self.scheduler, self.stages = build_lr_schedule(
            cfg, self.optimizer.optimizer, steps_per_epoch, self.total_steps
        )
        unwrapped = accelerator.unwrap_model(self.model)
        self.sparsifier = build_sparsifier(cfg, unwrapped, self.optimizer, self.total_steps, checked_sparsity)
        self.averager = build_averager(cfg, unwrapped, self.optimizer, self.sparsifier, steps_per_epoch)
        #: the model loses channels during training (Chase with shrink): sliced between optimizer steps
        self.shrinks = self.sparsifier is not None and self.sparsifier.shrinks
        self.topology = (
            TopologyLog(self.sparsifier, accelerator.num_processes, self._shrink_figures)
            if self.sparsifier is not None
            else None
        )

        self.state = TrainState()
        self._restore(resume_dir)
        self.log = MetricsLog(
            self.output / "metrics.jsonl", self.main, self.state.step if resume_dir is not None else None
        )
        if cfg.run.tensorboard:
            accelerator.init_trackers(
                "itop_timm",
                config={f"{k}.{kk}": str(vv) for k, v in cfg.to_dict().items() for kk, vv in v.items()},
            )
        self._start_clocks()

    def _prepare_output(self, fresh: bool) -> None:
        """The output folder, locked for this run, with the run's ``config.yaml``; a fresh run with
        ``run.overwrite`` first removes the old run's results."""
        output = self.output
        self._lock_output()
        if self.main:
            remove_stale_temporaries(output)
            if fresh and self.cfg.run.overwrite:
                remove_previous_results(output)
            atomic_write_text(output / "config.yaml", self.cfg.to_yaml())
        self.accelerator.wait_for_everyone()

    def _lock_output(self) -> None:
        """Take the output folder's lock (main process) before anything is written there; every rank
        stops with an :class:`InputError` when another run holds it."""
        busy = None
        if self.main:
            self.output.mkdir(parents=True, exist_ok=True)
            try:
                self.lock = OutputLock(self.output)
            except OutputBusyError as err:
                busy = err
        agree, _ = all_ranks_agree(int(busy is None), torch.empty(0, device=self.accelerator.device))
        if busy is not None or not agree:
            raise InputError(str(busy or f"{str(self.output)!r} is being written by another run"))

    def close(self) -> None:
        """Release the output folder's lock (:func:`run` calls it however the run ends)."""
        if self.lock is not None:
            self.lock.release()

    def _restore(self, resume_dir: Path | None) -> None:
        """Checkpoint the loop position with the sparsifier, averager and RMDA stages; load them when resuming."""
        stateful: dict[str, Any] = {"train_state": self.state}
        if self.sparsifier is not None:
            stateful["sparsifier"] = self.sparsifier
        if self.averager is not None:
            stateful["averaging"] = self.averager
        if self.stages is not None:
            stateful["rmda_stages"] = self.stages
        register_state_hooks(self.accelerator, stateful)
        if resume_dir is None:
            return
        # (a shrunk run's state first brings the freshly built model to the saved shapes: no DDP on it)
        with _not_training(self.sparsifier), self._unwrapped_if_shrinking():
            load_training_state(self.accelerator, resume_dir)
        state = self.state
        _logger.info(
            "resumed from %s at step %d (epoch %d, batch %d)",
            resume_dir,
            state.step,
            state.epoch,
            state.batches_in_epoch,
        )

    def _start_clocks(self) -> None:
        """The loss windows (of the log line and of the epoch), throughput and wall-clock counters, and
        the progress bar (one for the whole run, its description the epoch)."""
        from tqdm.auto import tqdm

        cfg, state = self.cfg, self.state
        self.criterion = torch.nn.CrossEntropyLoss(label_smoothing=cfg.train.label_smoothing)
        world = self.accelerator.num_processes
        self.samples_per_step = cfg.data.batch_size * world * cfg.train.gradient_accumulation_steps
        self.progress = tqdm(
            total=self.total_steps,
            initial=state.step,
            disable=not (self.main and cfg.run.progress),
            desc=f"epoch {state.epoch + 1}/{cfg.train.epochs}",
            dynamic_ncols=True,
        )
        self.loss_sum = torch.zeros((), device=self.accelerator.device)
        self.loss_count = restore_loss_window(state.loss_window, self.accelerator, self.loss_sum)
        # the epoch's mean train loss for its console line ([sum, batches]; after a mid-epoch resume:
        # over the batches trained since)
        self.epoch_loss = torch.zeros(2, device=self.accelerator.device)
        self.step_lr = self.optimizer.param_groups[0]["lr"]
        self.window_start, self.window_steps = time.perf_counter(), 0
        self.run_start = time.perf_counter() - state.train_seconds
        self.seen_writeback = self.averager.last_writeback if self.averager is not None else None
        self.model.train()

    # ------------------------------------------------------------------ one epoch
    def train_epoch(self, epoch: int) -> None:
        """Train ``epoch`` from where it stands (mid-epoch after a resume), then validate."""
        accelerator, state = self.accelerator, self.state
        state.epoch = epoch
        self.epoch_start = time.perf_counter()
        self.epoch_loss.zero_()
        self.progress.set_description(f"epoch {epoch + 1}/{self.cfg.train.epochs}")
        self.data.train_set.set_epoch(epoch)
        self.train_loader.set_epoch(epoch)
        loader = self.train_loader
        if state.batches_in_epoch:
            loader = accelerator.skip_first_batches(self.train_loader, state.batches_in_epoch)
        for x, y in device_batches(loader, self.data.train_set, epoch):
            # (self.model each batch: a shrink between steps wraps the model anew under DDP)
            with accelerator.accumulate(self.model):
                loss = self.criterion(self.model(x), y)
                accelerator.backward(loss)
                if accelerator.sync_gradients and self.cfg.optim.clip_grad is not None:
                    accelerator.clip_grad_norm_(self.model.parameters(), self.cfg.optim.clip_grad)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            state.batches_in_epoch += 1
            self.loss_sum += loss.detach()
            self.loss_count += 1
            self.epoch_loss[0] += loss.detach()
            self.epoch_loss[1] += 1
            if accelerator.sync_gradients:
                self._after_optimizer_step(epoch)
        self._end_epoch(epoch)

    def _after_optimizer_step(self, epoch: int) -> None:
        cfg, state = self.cfg, self.state
        if self.shrinks and self.sparsifier.shrink_pending:
            with self._unwrapped_if_shrinking():
                self.sparsifier.shrink()
            # the best weights so far no longer fit the model: the best is among the epochs after it
            state.best_val_top1, state.best_epoch = TrainState.best_val_top1, TrainState.best_epoch
        self.step_lr = self.optimizer.param_groups[0]["lr"]  # this step's, before the schedule moves on
        state.step += 1
        self.window_steps += 1
        self.progress.update(1)
        if self.scheduler is not None:
            self.scheduler.step_update(num_updates=state.step)
        if self.stages is not None:
            self.stages.step()
        self._log_averaging(epoch)
        if self.topology is not None:
            self.topology.write(self.log, state.step, epoch, state.itop_history)
        if state.step % cfg.run.log_interval == 0 or state.step == self.total_steps:
            self._log_train(epoch)
        if cfg.run.checkpoint_interval and state.step % cfg.run.checkpoint_interval == 0:
            if state.step < self.total_steps:
                self.checkpoint()

    @contextlib.contextmanager
    def _unwrapped_if_shrinking(self) -> Iterator[None]:
        """Inside, a model that shrinks is without its DDP wrapper (whose reducer holds the parameters
        a shrink slices: between steps, and while a checkpoint's state brings a fresh model to its
        shapes); a new wrapper is put on after."""
        if not (self.shrinks and isinstance(self.model, torch.nn.parallel.DistributedDataParallel)):
            yield
            return
        self.model = take_off_ddp(self.accelerator, self.model)
        try:
            yield
        finally:
            self.model = put_on_ddp(self.accelerator, self.model)

    def _shrink_figures(self) -> dict[str, Any]:
        """The shrunk model's MACs at the run's input size (batch 1), for the ``shrink`` record."""
        from ..structured import count_macs_and_params

        model_cfg = self.cfg.model
        unwrapped = self.accelerator.unwrap_model(self.model)
        ref = next(unwrapped.parameters())
        x = torch.zeros(
            1, model_cfg.in_chans, model_cfg.img_size, model_cfg.img_size, device=ref.device, dtype=ref.dtype
        )
        return {"macs": count_macs_and_params(unwrapped, x)[0]}

    def _log_averaging(self, epoch: int) -> None:
        """A weight-averaging write-back of this step: BatchNorm re-estimated, an ``averaging`` record."""
        averager = self.averager
        if averager is None or averager.last_writeback is self.seen_writeback:
            return
        self.seen_writeback = averager.last_writeback
        record = {"event": "averaging", "step": self.state.step, "epoch": epoch, **self.seen_writeback}
        if self.seen_writeback["wrote_back"] and self.cfg.averaging.bn_update_batches:
            # the averaged weights need BatchNorm statistics of their own
            from ..averaging import update_bn

            record["bn_batches"] = update_bn(
                self.accelerator.unwrap_model(self.model),
                self.loaders["bn"],
                self.cfg.averaging.bn_update_batches,
            )
        self.log.write(record)

    def _log_train(self, epoch: int) -> None:
        """The ``train`` record of the loss window since the last one, and the progress bar's figures."""
        accelerator, optimizer, sparsifier = self.accelerator, self.optimizer, self.sparsifier
        mean_loss = float(accelerator.reduce(self.loss_sum / max(self.loss_count, 1), "mean"))
        elapsed = time.perf_counter() - self.window_start
        record = {
            "event": "train",
            "step": self.state.step,
            "epoch": epoch,
            "loss": mean_loss,
            "lr": self.step_lr,  # the lr of the step just taken (param_groups hold the next step's)
            "samples_per_s": self.window_steps * self.samples_per_step / max(elapsed, 1e-9),
            "elapsed_s": time.perf_counter() - self.run_start,
        }
        if sparsifier is not None:
            record |= {"density": sparsifier.density, "itop_rate": sparsifier.itop_rate}
        if getattr(optimizer.optimizer, "regularizer", None) is not None:  # RMDA / ProxSGD
            record |= optimizer.optimizer.group_sparsity()
        self.log.write(record)
        if self.cfg.run.tensorboard:
            accelerator.log(
                {f"train/{k}": v for k, v in record.items() if k not in ("event",)}, step=self.state.step
            )
        postfix = {"loss": f"{mean_loss:.3f}", "lr": f"{record['lr']:.3g}"}
        if sparsifier is not None:
            postfix |= {"density": f"{record['density']:.3f}", "R_s": f"{record['itop_rate']:.3f}"}
        self.progress.set_postfix(postfix)
        self.loss_sum.zero_()
        self.loss_count = 0
        self.window_start, self.window_steps = time.perf_counter(), 0

    def _end_epoch(self, epoch: int) -> None:
        """Validation (and the best weights so far), the epoch's console line, the next epoch's position,
        an epoch-end checkpoint."""
        state = self.state
        val_top1 = None
        if "val" in self.loaders:
            result = self._log_eval("val", self.loaders["val"])
            val_top1 = result["top1"]
            if result["top1"] > state.best_val_top1:
                state.best_val_top1, state.best_epoch = result["top1"], epoch
                save_best_weights(self.accelerator, self.model, self.best_path)
        self._print_epoch(epoch, val_top1)
        state.epoch, state.batches_in_epoch = epoch + 1, 0
        if not self.cfg.run.checkpoint_interval and epoch + 1 < self.cfg.train.epochs:
            self.checkpoint()

    def _print_epoch(self, epoch: int, val_top1: float | None) -> None:
        """The epoch's console line (main process; the loss reduction is collective)."""
        loss_sum, batches = self.accelerator.reduce(self.epoch_loss, "sum").tolist()
        sparsifier = self.sparsifier
        density, itop_rate = (
            (None, None) if sparsifier is None else (sparsifier.density, sparsifier.itop_rate)
        )
        if self.main:  # (the figures above are collective when the model is sharded)
            seconds = time.perf_counter() - self.epoch_start
            loss = loss_sum / max(batches, 1)
            line = epoch_line(epoch + 1, self.cfg.train.epochs, loss, val_top1, density, itop_rate, seconds)
            _logger.info("%s", line)

    def _log_eval(self, split: str, loader: Any) -> dict[str, float]:
        state = self.state
        result = evaluate(self.model, loader, self.accelerator)
        record = {"event": "eval", "split": split, "epoch": state.epoch, "step": state.step, **result}
        self.log.write(record)
        if split == "val":
            state.eval_history.append(record)
        if self.cfg.run.tensorboard:
            self.accelerator.log({f"{split}/{k}": v for k, v in result.items()}, step=state.step)
        return result

    def checkpoint(self) -> None:
        """A training checkpoint of this step (collective: every rank calls it)."""
        state = self.state
        state.train_seconds = time.perf_counter() - self.run_start
        state.loss_window = loss_window_state(self.accelerator, self.loss_sum, self.loss_count)
        with _not_training(self.sparsifier):
            save_checkpoint(
                self.accelerator, self.output, state.step, self.cfg.to_dict(), self.cfg.run.keep_checkpoints
            )

    # ------------------------------------------------------------------ finish
    def finish(self) -> dict[str, Any]:
        """The last checkpoint, the test evaluation (last and best weights), the run's outputs; returns
        the summary. A failing test evaluation still writes the outputs (the trained model, a summary
        with ``test_error`` instead of the test figures) before the error propagates."""
        cfg, accelerator, state = self.cfg, self.accelerator, self.state
        self.progress.close()
        state.train_seconds = time.perf_counter() - self.run_start
        self.checkpoint()
        summary = self._summary()
        try:
            summary |= self._test_results()
        except Exception as err:
            summary["test_error"] = f"{type(err).__name__}: {short_repr(str(err), 300)}"
            if self.main:
                _logger.error(
                    "the test evaluation failed (%s); writing the trained model to %s first",
                    summary["test_error"],
                    self.output / "model",
                )
            self._write_outputs(summary)
            raise
        self._write_outputs(summary)
        accelerator.wait_for_everyone()
        if cfg.run.tensorboard:
            accelerator.end_training()
        return summary

    def _test_results(self) -> dict[str, Any]:
        """Top-1/top-5 on the test split of the last weights, and of the best ones where saved (``{}``
        without a test split)."""
        if "test" not in self.loaders:
            return {}
        last = evaluate(self.model, self.loaders["test"], self.accelerator)
        results = {
            "test_top1_last": last["top1"],
            "test_top5_last": last["top5"],
            "test_loss_last": last["loss"],
        }
        if self.best_path.exists():
            best = evaluate_saved_weights(self.accelerator, self.model, self.best_path, self.loaders["test"])
            results |= {"test_top1_best": best["top1"], "test_top5_best": best["top5"]}
        return results

    def _write_outputs(self, summary: dict[str, Any]) -> None:
        """The summary record, then the plots, the sparse checkpoint and ``summary.json`` (every rank)."""
        if self.main:
            self.log.write({"event": "summary", "step": self.state.step, **summary})
        write_outputs(  # every rank: sharded masks and weights are gathered; rank 0 writes
            self.cfg,
            self.output,
            self.accelerator.unwrap_model(self.model),
            self.sparsifier,
            self.state.itop_history,
            self.log,
            summary,
            self.splits.class_names,
            self.main,
        )

    def _summary(self) -> dict[str, Any]:
        cfg, state, seconds = self.cfg, self.state, max(self.state.train_seconds, 1e-9)
        validated = "val" in self.loaders
        summary: dict[str, Any] = {
            "model": cfg.model.name,
            "method": cfg.sparsity.method,
            "num_processes": self.accelerator.num_processes,
            "epochs": cfg.train.epochs,
            "total_steps": self.total_steps,
            "wall_time_s": state.train_seconds,
            "steps_per_s": self.total_steps / seconds,
            "samples_per_s": self.total_steps * self.samples_per_step / seconds,
            "best_val_top1": state.best_val_top1 if validated else None,
            "best_epoch": state.best_epoch if validated else None,
            "num_threads": self.threads.threads,
            "num_threads_source": self.threads.source,
            "num_workers": self.data.workers,
            "data_path": "in_memory" if self.data.in_memory else "pil",
        }
        if self.sparsifier is not None:
            summary |= {
                "density": self.sparsifier.density,
                "itop_rate": self.sparsifier.itop_rate,
                "target_density": cfg.sparsity.density,
            }
            if (plan := self.sparsifier.compute_plan) is not None:  # which layers the CPU kernels computed
                kernels = {n for n, c in plan["plan"].items() if c == "sparse"}
                summary["compute"] = {
                    "mode": plan["mode"],
                    "sparse_layers": sorted(kernels),
                    "dense_layers": sorted(
                        set(self.sparsifier.masks) - kernels
                    ),  # timed slower, or unsupported
                }
        return summary
