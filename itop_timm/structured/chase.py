"""Chase (Yin et al., NeurIPS 2023): channel-level dynamic sparsity that ends in a smaller dense network.

Unstructured RigL inside the channels still alive, while whole channels are removed on their own
schedule (REFERENCE §4):

* removable units are torch-pruning's coupled channel groups (:mod:`.dependency`) with one producer
  convolution/linear layer (depthwise convolutions on the same channels allowed) whose channels are
  read only by sparse layers: the inner channels of a block. Never the stem (timm's ``first_conv`` and
  its module), the residual stream (several producers), the classifier, or a group whose removal is
  not exact (LayerNorm, attention);
* at steps ``j · removal_interval − ΔT/2`` and at ``T_c = removal_end_fraction · T``, the target removed
  fraction is ``S_c(t) = channel_sparsity · (1 − (1 − t/T_c)³)``; the alive channels with the lowest
  UMM (mean ``|w|`` of the producer's row, zeros included) go, ranked over all groups, each group
  keeping ``min_channel_ratio · (1 − channel_sparsity)`` of its channels (``ranking="layer"``, not in
  the paper: every group loses the fraction ``S_c(t)``, its lowest-UMM channels). A removed channel's rows and
  the columns reading it are masked for good, so ``compact`` slices it out exactly;
* the global budget stays ``density × N``: per-layer counts are re-derived with the run's distribution
  on the shrunken shapes, and the next topology update regrows the weights lost with the channels.

Defaults from the official code (CIFAR): ``channel_sparsity`` 0.5 (``--start_layer_rate``),
``min_channel_ratio`` 0.2 (``--minumum_ratio``), removal every 8 ΔT (``--layer_interval 8000`` with
``--update_frequency 1000``) until 130 of 160 epochs (``--stop_gmp_epochs``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from ..densities import active_counts, compute_layer_densities
from ..distributed import broadcast_masks, full_tensor, is_sharded
from ..methods import MethodInfo, gradient_score, magnitude_score, register_method
from ..structure import LayerPlan, StructureRule, check_fraction

if TYPE_CHECKING:
    from ..config import SparsityConfig
    from ..methods import LayerView
    from ..sparsifier import Sparsifier

__all__ = ["ChaseRule", "ChannelUnit", "removable_units"]


@dataclass
class ChannelUnit:
    """One removable channel group: ``scored`` is the producer weight whose rows give UMM; ``rows`` and
    ``cols`` are ``(parameter, positions, channel of each position)`` along dim 0 / dim 1."""

    name: str
    num_channels: int
    scored: str
    rows: list[tuple[str, torch.Tensor, torch.Tensor]]
    cols: list[tuple[str, torch.Tensor, torch.Tensor]]


def _stem_prefix(model: nn.Module) -> str | None:
    first = (getattr(model, "pretrained_cfg", None) or {}).get("first_conv")
    if not isinstance(first, str):
        return None
    return first.rsplit(".", 1)[0] + "." if "." in first else first + "."


def _is_depthwise(model: nn.Module, param_name: str) -> bool:
    module = model.get_submodule(param_name.rsplit(".", 1)[0]) if "." in param_name else model
    return isinstance(module, nn.modules.conv._ConvNd) and module.groups > 1


def default_input_size(model: nn.Module) -> tuple[int, ...]:
    """``(C, H, W)`` for tracing: timm's ``pretrained_cfg`` size (a ViT's own ``patch_embed.img_size``),
    with the channels of the model's first convolution/linear layer."""
    size = list((getattr(model, "pretrained_cfg", None) or {}).get("input_size") or (3, 224, 224))
    img = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if isinstance(img, (tuple, list)) and len(img) == 2:
        size[1:] = list(img)
    first = next((m for m in model.modules() if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))), None)
    if isinstance(first, nn.modules.conv._ConvNd):
        size[0] = first.in_channels
    return tuple(int(s) for s in size)


def removable_units(
    model: nn.Module, sparse: set[str], input_size: Sequence[int]
) -> tuple[list[ChannelUnit], dict[str, str]]:
    """Chase's removable channel groups of ``model`` (module docstring) and, for every other traced
    group, why it is not one."""
    from .dependency import trace_channel_groups

    trace = trace_channel_groups(model, torch.zeros(1, *input_size))
    stem = _stem_prefix(model)
    units: list[ChannelUnit] = []
    skipped: dict[str, str] = {}
    for traced in trace.groups:
        group = traced.group
        rows = [
            (s.param_name, s.index, s.channel)
            for s in group.slices
            if s.role == "producer" and s.param_name in sparse
        ]
        cols = [(s.param_name, s.index, s.channel) for s in group.slices if s.role == "consumer"]
        producers = [p for p, _, _ in rows if not _is_depthwise(model, p)]
        why = None
        if not group.exact:
            why = f"removal is not exact ({traced.reason})"
        elif bool(traced.pinned.any()) or not torch.equal(traced.classes, torch.arange(group.num_channels)):
            why = "grouped convolution channels"
        elif len(producers) != 1:
            why = f"{len(producers)} producer layers (residual stream)" if producers else "no sparse producer"
        elif stem is not None and (producers[0] + ".").startswith(stem):
            why = "the stem"
        elif not cols:
            why = "its channels are not read by a layer"
        elif any(p not in sparse for p, _, _ in cols):
            why = f"read by the dense parameter {next(p for p, _, _ in cols if p not in sparse)!r}"
        elif any(s.dim != (0 if s.role == "producer" else 1) for s in group.slices if s.param_name in sparse):
            why = "channels along an unexpected dimension"
        if why is None:
            units.append(ChannelUnit(group.name, group.num_channels, producers[0], rows, cols))
        else:
            skipped[group.name] = why
    return units, skipped


@dataclass
class ChaseRule(StructureRule):
    """Chase's structure: channels removed on a cubic schedule, RigL within the channels left."""

    compacts: ClassVar[bool] = True

    channel_sparsity: float = field(
        default=0.5,
        metadata={
            "help": "S_c in [0, 1): fraction of the removable channels removed by T_c (paper: 0.5 CIFAR, 0.4 ImageNet)"
        },
    )
    removal_interval: int | None = field(
        default=None,
        metadata={"help": "steps between channel removals (null: 8 × update_interval, as the official code)"},
    )
    removal_end_fraction: float = field(
        default=0.8125,
        metadata={"help": "T_c / T in (0, 1]: channel removal ends here (official code: 130 of 160 epochs)"},
    )
    min_channel_ratio: float = field(
        default=0.2,
        metadata={"help": "β in [0, 1]: each group keeps β·(1 − S_c) of its channels (official code: 0.2)"},
    )
    ranking: str = field(
        default="global",
        metadata={
            "help": "global (the paper: lowest UMM over all groups, per-group floors) or layer (each group "
            "loses the same fraction, its lowest-UMM channels: more MACs removed at high resolution)"
        },
    )
    input_size: list[int] | None = field(
        default=None, metadata={"help": "(C, H, W) of the torch-pruning trace (null: timm's input size)"}
    )

    def __post_init__(self) -> None:
        check_fraction("chase", "channel_sparsity", self.channel_sparsity, low_open=False, high_open=True)
        check_fraction(
            "chase", "removal_end_fraction", self.removal_end_fraction, low_open=True, high_open=False
        )
        check_fraction("chase", "min_channel_ratio", self.min_channel_ratio, low_open=False, high_open=False)
        if self.removal_interval is not None and (
            isinstance(self.removal_interval, bool)
            or not isinstance(self.removal_interval, int)
            or self.removal_interval < 1
        ):
            raise ValueError(
                f"chase: removal_interval must be an integer >= 1 or null, got {self.removal_interval!r}"
            )
        if self.ranking not in ("global", "layer"):
            raise ValueError(f"chase: ranking must be 'global' or 'layer', got {self.ranking!r}")
        if self.input_size is not None and (
            not isinstance(self.input_size, (list, tuple))
            or not self.input_size
            or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in self.input_size)
        ):
            raise ValueError(
                f"chase: input_size must be positive integers such as [3, 224, 224], got {self.input_size!r}"
            )
        self.units: list[ChannelUnit] = []
        self.alive: dict[str, torch.Tensor] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._budget: dict[str, int] = {}
        self._targets: dict[str, int] = {}
        self._allowed: dict[str, torch.Tensor] = {}
        self._removal_steps: set[int] = set()
        self._end = 1
        self._distribution = "erk"

    # ----------------------------------------------------------------- set-up
    def bind(self, model: nn.Module, shapes: Mapping[str, tuple[int, ...]], config: SparsityConfig) -> None:
        if config.total_steps is None:
            raise ValueError(
                "chase: total_steps is needed (the channel-removal schedule ends at a fraction of it)"
            )
        if is_sharded(model):
            raise ValueError(
                "chase: sharded (FSDP2) models are not supported (torch-pruning traces whole tensors); use DDP"
            )
        size = tuple(self.input_size) if self.input_size is not None else default_input_size(model)
        self.units, skipped = removable_units(model, set(shapes), size)
        if not self.units:
            reasons = "; ".join(f"{name}: {why}" for name, why in list(skipped.items())[:6])
            raise ValueError(
                f"chase: {type(model).__name__} has no removable channel group (inner channels of a block, "
                f"read only by sparse layers, exact to remove) — {reasons or 'torch-pruning found no group'}"
            )
        self._shapes = dict(shapes)
        self._distribution = config.distribution or "erk"
        self.alive = {u.name: torch.ones(u.num_channels, dtype=torch.bool) for u in self.units}
        self._end = max(1, round(self.removal_end_fraction * config.total_steps))  # T_c
        interval = self.removal_interval or 8 * config.update_interval
        offset = config.update_interval // 2  # half a ΔT away from the weight updates
        if self.channel_sparsity > 0:
            steps = (j * interval - offset for j in range(1, self._end // interval + 2))
            self._removal_steps = {s for s in steps if 1 <= s <= self._end} | {self._end}
        self._refresh()

    def initial_mask(self, name: str, shape: tuple[int, ...], count: int, generator: torch.Generator) -> None:
        self._budget[name] = count
        self._targets[name] = count
        return None

    # -------------------------------------------------------------- schedule
    def removed_fraction(self, step: int) -> float:
        """S_c(t): the cubic schedule's target fraction of removed channels at ``step``."""
        t = min(step, self._end) / self._end
        return self.channel_sparsity * (1.0 - (1.0 - t) ** 3)

    def after_step(self, sparsifier: Sparsifier) -> None:
        if sparsifier.step not in self._removal_steps:
            return
        total = sum(u.num_channels for u in self.units)
        alive_now = sum(int(a.sum()) for a in self.alive.values())
        remove = alive_now - math.ceil(total * (1.0 - self.removed_fraction(sparsifier.step)))
        if remove <= 0:
            return
        for name, m in sparsifier.masks.items():  # started from given masks: their counts are the budget
            self._budget.setdefault(name, int(full_tensor(m).sum()))
        params = dict(sparsifier.model.named_parameters())
        candidates: list[tuple[float, str, int]] = []
        for unit in self.units:
            weight = full_tensor(params[unit.scored]).detach().abs().float()
            per_row = weight.reshape(weight.shape[0], -1).mean(1).cpu()
            (_, index, channel) = next(r for r in unit.rows if r[0] == unit.scored)
            umm = torch.zeros(unit.num_channels).index_add_(0, channel, per_row[index])
            umm /= torch.zeros(unit.num_channels).index_add_(0, channel, torch.ones(len(index))).clamp_min(1)
            candidates += [
                (float(umm[c]), unit.name, c) for c in self.alive[unit.name].nonzero().flatten().tolist()
            ]
        if self.ranking == "layer":  # every group down to the same fraction, its lowest-UMM channels first
            keep = 1.0 - self.removed_fraction(sparsifier.step)
            floor = {u.name: max(1, math.ceil(keep * u.num_channels)) for u in self.units}
            remove = total
        else:
            floor = {
                u.name: max(
                    1, math.ceil(self.min_channel_ratio * (1 - self.channel_sparsity) * u.num_channels)
                )
                for u in self.units
            }
        left = {name: int(a.sum()) for name, a in self.alive.items()}
        for _, name, c in sorted(candidates):
            if remove == 0:
                break
            if left[name] > floor[name]:
                self.alive[name][c] = False
                left[name] -= 1
                remove -= 1
        broadcast_masks(list(self.alive.values()))
        self._refresh()
        for name, allowed in self._allowed.items():  # the removed channels' weights go now, for good
            mask = full_tensor(sparsifier.masks[name])
            sparsifier._store(name, mask & allowed.to(mask.device))
        sparsifier.apply_masks()

    def _refresh(self) -> None:
        """Allowed positions and per-layer counts from the alive channels (budget kept, ERK re-derived)."""
        rows: dict[str, torch.Tensor] = {}
        cols: dict[str, torch.Tensor] = {}
        for unit in self.units:
            dead = ~self.alive[unit.name]
            for table, slices in ((rows, unit.rows), (cols, unit.cols)):
                for param, index, channel in slices:
                    dim = 0 if table is rows else 1
                    keep = table.setdefault(param, torch.ones(self._shapes[param][dim], dtype=torch.bool))
                    keep[index[dead[channel]]] = False
        self._allowed = {}
        effective: dict[str, tuple[int, ...]] = {}
        for name, shape in self._shapes.items():
            r = rows.get(name, torch.ones(shape[0], dtype=torch.bool))
            c = cols.get(name, torch.ones(shape[1], dtype=torch.bool)) if len(shape) > 1 else None
            if name in rows or name in cols:
                allowed = r.view(-1, *[1] * (len(shape) - 1))
                if c is not None:
                    allowed = allowed & c.view(1, -1, *[1] * (len(shape) - 2))
                self._allowed[name] = allowed
            effective[name] = (int(r.sum()), *((int(c.sum()),) if c is not None else ()), *shape[2:])
        if not self._budget or all(self.alive[u.name].all() for u in self.units):
            return
        budget = sum(self._budget.values())
        room = sum(math.prod(s) for s in effective.values())
        densities = compute_layer_densities(effective, min(1.0, budget / room), self._distribution)
        self._targets = active_counts(effective, densities)

    # ---------------------------------------------------------------- update
    def layer_plan(self, view: LayerView, rate: float, count: int) -> LayerPlan:
        return LayerPlan(allowed=self._allowed.get(view.name), count=self._targets.get(view.name, count))

    def stats(self) -> dict[str, Any]:
        return {
            "channels_alive": sum(int(a.sum()) for a in self.alive.values()),
            "channels_removable": sum(u.num_channels for u in self.units),
        }

    def state_dict(self) -> dict[str, Any]:
        return {"alive": {name: a.clone() for name, a in self.alive.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        alive = state.get("alive")
        expected = {u.name: u.num_channels for u in self.units}
        if (
            not isinstance(alive, Mapping)
            or set(alive) != set(expected)
            or any(
                not isinstance(alive[n], torch.Tensor) or alive[n].shape != (expected[n],) for n in expected
            )
        ):
            raise ValueError(
                f"chase: the saved alive channels do not match this model's groups {sorted(expected)[:3]}..."
            )
        self.alive = {n: alive[n].to(torch.bool).clone() for n in expected}
        self._refresh()


register_method(
    MethodInfo(
        "chase",
        magnitude_score,
        gradient_score,
        "Chase: RigL within channels, removing the lowest-magnitude channels on a cubic schedule (Yin et al. 2023)",
        needs_grad=True,
        structure=ChaseRule,
    )
)
