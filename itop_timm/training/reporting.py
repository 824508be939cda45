"""What a run reports: the console (log lines through the progress bar, on the main process, one line
per epoch, warnings about the launch), evaluation, the JSON-lines metrics log, the topology updates (a
subscriber of the sparsifier's update hook, with the masks' cross-rank check), the best weights, and
the files written at the end (plots, the sparse checkpoint, ``summary.json``)."""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .. import plots
from ..distributed import (
    all_ranks_agree,
    full_state_dict,
    is_sharded,
    load_full_state_dict,
    masks_fingerprint,
)
from ..serialization import atomic_write_text
from ..sparsifier import Sparsifier
from ..validation import short_repr
from .config import TrainConfig, published_config
from .data import hub_dataset_id
from .loaders import resolve_data_config

__all__ = [
    "ConsoleHandler",
    "MainProcessOnly",
    "configure_console",
    "epoch_line",
    "launch_warnings",
    "evaluate",
    "MetricsLog",
    "TopologyLog",
    "check_masks_identical",
    "save_best_weights",
    "evaluate_saved_weights",
    "write_outputs",
]


#: The console's line format (the recipe's command line; timm's route keeps timm's own).
CONSOLE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class ConsoleHandler(logging.StreamHandler):
    """A stream handler that writes through ``tqdm.write``: a log line goes above the progress bar,
    which is redrawn below it, instead of breaking it."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=self.stream)
            self.flush()
        except RecursionError:
            raise
        except Exception:  # as logging.StreamHandler: a failing handler never stops the run
            self.handleError(record)


def process_rank() -> int:
    """This process's rank as set by the launcher (``RANK``: torchrun, ``accelerate launch``); 0 without one."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


class MainProcessOnly(logging.Filter):
    """Passes every record on rank 0, and only warnings and errors on the other ranks: with N processes
    each informational line is printed once, not N times."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or process_rank() == 0


def configure_console(level: int | str = logging.INFO) -> None:
    """Root logging for the recipe's command line: :class:`ConsoleHandler` on stderr with
    :class:`MainProcessOnly` (a no-op when the root logger already has handlers, as
    :func:`logging.basicConfig`)."""
    handler = ConsoleHandler()
    handler.setFormatter(logging.Formatter(CONSOLE_FORMAT))
    handler.addFilter(MainProcessOnly())
    logging.basicConfig(level=level, handlers=[handler])


def epoch_line(
    epoch: int,
    epochs: int,
    train_loss: float,
    val_top1: float | None,
    density: float | None,
    itop_rate: float | None,
    seconds: float,
) -> str:
    """The console's line of one finished epoch (``epoch`` counted from 1), as timm prints one: train
    loss, validation top-1, density, R_s and the epoch's wall time (absent figures are left out)."""
    parts = [f"epoch {epoch}/{epochs}", f"train loss {train_loss:.4f}"]
    if val_top1 is not None:
        parts.append(f"val top-1 {val_top1:.2f}%")
    if density is not None:
        parts.append(f"density {density:.4f}")
    if itop_rate is not None:
        parts.append(f"R_s {itop_rate:.4f}")
    parts.append(f"time {seconds:.1f}s")
    return "  ".join(parts)


_NUM_PROCESSES = re.compile(r"--num[_-]processes(?:=(\d+))?$")


def requested_processes(launcher_argv: Sequence[str]) -> int | None:
    """The ``--num_processes`` of an ``accelerate launch`` command line (``None``: not one, or not given)."""
    accelerate_launch = any(a.endswith("accelerate.commands.launch") for a in launcher_argv) or (
        "launch" in launcher_argv and any(os.path.basename(a) == "accelerate" for a in launcher_argv)
    )
    if not accelerate_launch:
        return None
    for i, arg in enumerate(launcher_argv):
        match = _NUM_PROCESSES.match(arg)
        if match is None:
            continue
        value = match.group(1) if match.group(1) is not None else (launcher_argv[i + 1 : i + 2] or [""])[0]
        return int(value) if value.isdigit() else None
    return None


def launcher_argv() -> list[str]:
    """The command line of the process that started this one (``[]`` when it cannot be read)."""
    try:
        import psutil  # a dependency of Accelerate

        return list(psutil.Process(os.getppid()).cmdline())
    except Exception:  # no such process, no permission, no psutil: nothing to compare
        return []


def launch_warnings(
    num_processes: int, device_type: str, mixed_precision: str, launcher: Sequence[str] | None = None
) -> list[str]:
    """What the console should warn about how the run was launched (the main process logs them):

    * ``accelerate launch --num_processes N`` without ``--multi_gpu`` (or another distributed flag)
      starts a single process: the requested and actual world sizes differ;
    * bf16 autocast on a CPU, which can be far slower than fp32 (about 10x measured at the demo's
      shape on an AVX-512-BF16 CPU).

    ``launcher``: the parent process's command line (default: read with psutil)."""
    warnings = []
    requested = requested_processes(launcher_argv() if launcher is None else launcher)
    if requested is not None and requested != num_processes:
        warnings.append(
            f"accelerate launch was asked for {requested} processes but this run has {num_processes}: "
            "without a GPU per process, accelerate launch starts several processes only with --multi_gpu "
            f"(e.g. accelerate launch --multi_gpu --num_processes {requested} ...)"
        )
    if device_type == "cpu" and mixed_precision == "bf16":
        warnings.append(
            "bf16 autocast on the CPU: often much slower than fp32 (about 10x measured at the demo's shape); "
            "for CPU training set train.mixed_precision: no"
        )
    return warnings


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
    if count == 0:  # preflight refuses empty splits: an accuracy over no sample is never reported
        raise ValueError("evaluation over an empty split: nothing was measured")
    return {
        "top1": 100.0 * correct1 / count,
        "top5": 100.0 * correct5 / count,
        "loss": loss_sum / count,
        "samples": count,
    }


def _json_record(line: str) -> dict[str, Any] | None:
    """The JSON object on ``line``, ``None`` when it is not one."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def read_metrics(path: Path) -> tuple[list[tuple[str, dict[str, Any]]], str | None]:
    """The records of a metrics log as ``(line, record)`` pairs, and its torn last line (``None`` when
    the last line is whole): a run killed (or out of disk) while appending leaves at most that one
    broken. A broken line before the last is not a torn append: ``ValueError`` naming file and line."""
    lines = path.read_text(errors="replace").splitlines() if path.exists() else []
    records: list[tuple[str, dict[str, Any]]] = []
    for number, line in enumerate(lines, 1):
        if not line:
            continue
        record = _json_record(line)
        if record is None:
            if number == len(lines):
                return records, line
            raise ValueError(
                f"{str(path)!r} line {number} is not a JSON record: {short_repr(line)} (only the last line "
                "can be torn by a killed run; move the file away to resume without its history)"
            )
        records.append((line, record))
    return records, None


class MetricsLog:
    """One JSON object per line in ``metrics.jsonl`` (main process only). A resumed run keeps the
    records up to its step; a torn last record (the run was killed while appending it) is dropped
    with a warning."""

    def __init__(self, path: Path, enabled: bool, resume_step: int | None) -> None:
        self.path = path
        self.enabled = enabled
        if enabled and resume_step is not None and path.exists():
            records, torn = read_metrics(path)
            if torn is not None:
                logging.getLogger(__name__).warning(
                    "%s: dropped its torn last record (the run was stopped while writing it): %s",
                    path,
                    short_repr(torn),
                )
            kept = [line for line, record in records if record.get("step", 0) <= resume_step]
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
        return [record for _, record in read_metrics(self.path)[0]]


def check_masks_identical(sparsifier: Sparsifier, step: int) -> int:
    """All-gather a hash of the masks; stop with an error unless every rank holds the same masks."""
    masks = list(sparsifier.masks.values())
    agree, values = all_ranks_agree(masks_fingerprint(masks), masks[0])
    if not agree:
        raise RuntimeError(
            f"masks differ between ranks after the topology update at step {step}: fingerprints {values}"
        )
    return values[0]


class TopologyLog:
    """Subscriber of a sparsifier's topology updates (:meth:`~itop_timm.Sparsifier.register_update_hook`):
    each becomes a ``topology_update`` record of the metrics log and, unless skipped, a point of the
    R_s history, with the masks checked identical on every rank.

    The hook runs inside ``optimizer.step()``; the records are written by :meth:`write` once the step
    is complete (after the step's weight-averaging record, and with the collective mask check outside
    the optimizer step).
    """

    def __init__(
        self,
        sparsifier: Sparsifier,
        ranks: int,
        shrink_figures: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        self.sparsifier = sparsifier
        self.ranks = ranks
        self.shrink_figures = shrink_figures
        self._updates: list[dict[str, Any]] = []
        self.handle = sparsifier.register_update_hook(lambda sp, stats: self._updates.append(stats))

    def write(self, log: MetricsLog, step: int, epoch: int, itop_history: list[dict[str, Any]]) -> None:
        """Log the updates of the optimizer step ``step`` (every rank: the mask check is collective). A
        live shrink (``event`` ``shrink``) becomes a ``shrink`` record with the parameters before and
        after and ``shrink_figures()`` (the recipe: the smaller model's MACs)."""
        for stats in self._updates:
            if stats.get("event") == "shrink":
                record = {k: v for k, v in stats.items() if k not in ("cuts", "event", "step")}
                record["mask_fingerprint"] = check_masks_identical(self.sparsifier, step)
                if self.shrink_figures is not None:
                    record |= self.shrink_figures()
                log.write(
                    {
                        "event": "shrink",
                        "epoch": epoch,
                        "step": step,
                        "sparsifier_step": stats["step"],
                        **record,
                    }
                )
                continue
            update = {k: v for k, v in stats.items() if k != "layers"}
            if "skipped" not in update:
                update["mask_fingerprint"] = check_masks_identical(self.sparsifier, step)
                update["ranks"] = self.ranks
                itop_history.append({"step": step, "itop_rate": update["itop_rate"]})
            log.write(
                {
                    "event": "topology_update",
                    "epoch": epoch,
                    **update,
                    "sparsifier_step": update["step"],
                    "step": step,
                }
            )
        self._updates.clear()


def save_best_weights(accelerator: Any, model: torch.nn.Module, path: Path) -> None:
    """The (unwrapped) model's full weights as safetensors at ``path``, written atomically by the main
    process (a sharded model is gathered on every rank)."""
    unwrapped = accelerator.unwrap_model(model)
    main = accelerator.is_main_process
    if main or is_sharded(unwrapped):  # sharded: every rank gathers
        weights = full_state_dict(unwrapped)
    if main:
        from safetensors.torch import save_file

        from ..serialization import atomic_write_bytes

        weights = {k: v.contiguous() for k, v in weights.items()}
        atomic_write_bytes(path, lambda p, w=weights: save_file(w, str(p)))


def evaluate_saved_weights(
    accelerator: Any, model: torch.nn.Module, path: Path, loader: Any
) -> dict[str, float]:
    """:func:`evaluate` with the weights of ``path`` loaded; the model's own weights are put back (also
    when the evaluation fails)."""
    from safetensors.torch import load_file

    unwrapped = accelerator.unwrap_model(model)
    current = {k: v.detach().clone() for k, v in unwrapped.state_dict().items()}
    accelerator.wait_for_everyone()
    try:
        load_full_state_dict(unwrapped, load_file(str(path)))
        return evaluate(model, loader, accelerator)
    finally:
        unwrapped.load_state_dict(current)


def write_outputs(
    cfg: TrainConfig,
    output: Path,
    model: torch.nn.Module,
    sparsifier: Sparsifier | None,
    itop_history: list[dict[str, Any]],
    log: MetricsLog,
    summary: dict[str, Any],
    class_names: list[str],
    main: bool = True,
) -> None:
    """Plots, the sparse checkpoint and ``summary.json``. Call on every rank when the model is sharded
    (masks and weights are gathered; ``main`` writes), else on the main process only."""
    if main:
        records = log.records()
        plots.plot_learning_curves(
            [r for r in records if r.get("event") == "train"],
            [r for r in records if r.get("event") == "eval"],
            output / "plots" / "learning_curves.png",
            title=f"{cfg.model.name} {cfg.sparsity.method}",
        )
    if sparsifier is not None:
        density = sparsifier.density  # every rank: sharded masks are counted over all ranks
        layer_densities, layer_itop_rates = sparsifier.layer_densities(), sparsifier.layer_itop_rates()
    if sparsifier is not None and main:
        history = [{"step": 0, "itop_rate": density}, *itop_history]
        plots.plot_itop_rate(
            history,
            output / "plots" / "itop_rate.png",
            density=density,
            title=f"R_s: {cfg.model.name} {cfg.sparsity.method} d={cfg.sparsity.density}",
        )
        plots.plot_layer_densities(
            layer_densities,
            output / "plots" / "layer_density.png",
            itop_rates=layer_itop_rates,
            target=sparsifier.target_densities,
        )
    if cfg.run.save_sparse and (main or is_sharded(model)):  # sharded: every rank gathers, rank 0 writes
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
            dataset=hub_dataset_id(cfg.data.dataset),
            training_config=published_config(cfg),
            label_names=class_names,
            data_config=resolve_data_config(cfg.data, cfg.model, model),
        )
        structure = sparsifier.structure if sparsifier is not None else None
        if main and structure is not None and structure.compacts:  # chase: the removed channels go for real
            from ..structured import compact_checkpoint

            size = (cfg.model.in_chans, cfg.model.img_size, cfg.model.img_size)
            report = compact_checkpoint(output / "model", output / "compacted", input_size=size)
            summary["compacted"] = {
                k: report[k]
                for k in ("params_ratio", "macs_ratio", "channels_removed_total", "max_abs_output_change")
            }
    if main:
        atomic_write_text(output / "summary.json", json.dumps(summary, indent=2))
