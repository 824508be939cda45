"""What a run reports: evaluation, the JSON-lines metrics log, the topology updates (a subscriber of the
sparsifier's update hook, with the masks' cross-rank check), the best weights, and the files written
at the end (plots, the sparse checkpoint, ``summary.json``)."""

from __future__ import annotations

import json
from collections.abc import Mapping
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
from .config import TrainConfig, published_config
from .data import hub_dataset_id
from .loaders import resolve_data_config

__all__ = [
    "evaluate",
    "MetricsLog",
    "TopologyLog",
    "check_masks_identical",
    "save_best_weights",
    "evaluate_saved_weights",
    "write_outputs",
]


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

    def __init__(self, sparsifier: Sparsifier, ranks: int) -> None:
        self.sparsifier = sparsifier
        self.ranks = ranks
        self._updates: list[dict[str, Any]] = []
        self.handle = sparsifier.register_update_hook(lambda sp, stats: self._updates.append(stats))

    def write(self, log: MetricsLog, step: int, epoch: int, itop_history: list[dict[str, Any]]) -> None:
        """Log the updates of the optimizer step ``step`` (every rank: the mask check is collective)."""
        for stats in self._updates:
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
    """:func:`evaluate` with the weights of ``path`` loaded; the model's own weights are put back."""
    from safetensors.torch import load_file

    unwrapped = accelerator.unwrap_model(model)
    current = {k: v.detach().clone() for k, v in unwrapped.state_dict().items()}
    accelerator.wait_for_everyone()
    load_full_state_dict(unwrapped, load_file(str(path)))
    result = evaluate(model, loader, accelerator)
    unwrapped.load_state_dict(current)
    return result


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
