"""Matplotlib PNG plots of a sparse run: R_s over training, per-layer density, learning curves."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["pyplot", "save_figure", "plot_itop_rate", "plot_layer_densities", "plot_learning_curves"]


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the non-interactive Agg backend (files only, no display needed)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: str | Path) -> Path:
    """Lay out ``fig``, write it as a 120-dpi PNG to ``path`` (parent folders created) and close it."""
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    pyplot().close(fig)
    return path


def plot_itop_rate(
    history: Sequence[Mapping[str, Any]], path: str | Path, density: float | None = None, title: str = ""
) -> Path:
    """R_s (and density) vs optimizer step from records with ``step`` and ``itop_rate``."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    steps = [r["step"] for r in history]
    ax.plot(steps, [r["itop_rate"] for r in history], marker=".", label="R_s (ever-active fraction)")
    if density is not None:
        ax.axhline(density, color="grey", linestyle="--", label=f"density {density:.3f}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("fraction of sparse weights")
    ax.set_ylim(0, min(1.0, max([r["itop_rate"] for r in history] + [density or 0]) * 1.1 + 0.02))
    ax.set_title(title or "In-Time Over-Parameterization rate R_s")
    ax.grid(alpha=0.3)
    ax.legend()
    return save_figure(fig, path)


def plot_layer_densities(
    densities: Mapping[str, float],
    path: str | Path,
    itop_rates: Mapping[str, float] | None = None,
    target: Mapping[str, float] | None = None,
    title: str = "",
) -> Path:
    """One bar per sparse tensor: realised density, optionally its R_s and the target density."""
    plt = pyplot()
    names = list(densities)
    width = max(6.0, 0.18 * len(names))
    fig, ax = plt.subplots(figsize=(width, 4.5))
    x = range(len(names))
    if itop_rates is not None:
        ax.bar(x, [itop_rates[n] for n in names], color="tab:orange", alpha=0.45, label="R_s per layer")
    ax.bar(x, [densities[n] for n in names], color="tab:blue", label="density")
    if target is not None:
        ax.scatter(x, [target[n] for n in names], color="black", marker="_", s=60, label="target", zorder=3)
    ax.set_xticks(list(x))
    ax.set_xticklabels([n.removesuffix(".weight") for n in names], rotation=90, fontsize=6)
    ax.set_ylabel("fraction of weights")
    ax.set_ylim(0, 1.02)
    ax.set_title(title or "per-layer density")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return save_figure(fig, path)


def plot_learning_curves(
    train: Sequence[Mapping[str, Any]], evals: Sequence[Mapping[str, Any]], path: str | Path, title: str = ""
) -> Path:
    """Training loss vs step (left) and validation/test top-1 vs epoch (right)."""
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    if train:
        left.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss")
    val = [r for r in evals if r.get("split") == "val"]
    if val:
        left.plot([r["step"] for r in val], [r["loss"] for r in val], marker="o", label="val loss")
        right.plot([r["epoch"] for r in val], [r["top1"] for r in val], marker="o", label="val top-1")
    left.set_xlabel("optimizer step")
    left.set_ylabel("loss")
    left.grid(alpha=0.3)
    left.legend()
    right.set_xlabel("epoch")
    right.set_ylabel("top-1 accuracy (%)")
    right.grid(alpha=0.3)
    if val:
        right.legend()
    fig.suptitle(title or "learning curves")
    return save_figure(fig, path)
