"""Chase (Yin et al., NeurIPS 2023): channel-level dynamic sparsity that ends in a smaller dense network.

Unstructured RigL inside the channels still alive, while whole channels are removed on their own
schedule (REFERENCE §4):

* removable units: the inner channels of a block, read only by sparse layers
  (:mod:`itop_timm.structured.dependency.units`);
* at steps ``j · removal_interval − ΔT/2`` and at ``T_c = removal_end_fraction · T``, the target removed
  fraction is ``S_c(t) = channel_sparsity · (1 − (1 − t/T_c)³)``; the alive channels with the lowest
  UMM (mean ``|w|`` of the producer's row, zeros included) go, ranked over all groups, each group
  keeping ``min_channel_ratio · (1 − channel_sparsity)`` of its channels (``ranking="layer"``, not in
  the paper: every group loses the fraction ``S_c(t)``, its lowest-UMM channels). A removed channel's rows and
  the columns reading it are masked for good, so ``compact`` slices it out exactly;
* the global budget stays ``density × N``: per-layer counts are re-derived with the run's distribution
  on the shrunken shapes, and the next topology update regrows the weights lost with the channels.
  So channel removal ends no later than the run's last topology update (``T_c`` is capped at it: the
  last multiple of ΔT before ``T`` and not after ``stop_step``; the removal at ``T_c`` comes just before
  that update, which regrows the weights) and the run ends at its density. A run with no topology
  update at all (ΔT ≥ T, or ``stop_step`` < ΔT) is refused unless ``channel_sparsity`` is 0.

Defaults from the official code (CIFAR): ``channel_sparsity`` 0.5 (``--start_layer_rate``),
``min_channel_ratio`` 0.2 (``--minumum_ratio``), removal every 8 ΔT (``--layer_interval 8000`` with
``--update_frequency 1000``) until 130 of 160 epochs (``--stop_gmp_epochs``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..cuts import Cuts
from ..densities import active_counts, compute_layer_densities
from ..distributed import broadcast_masks, full_tensor, is_sharded
from ..masks import validate_masks
from ..structure import RuleContext, StructureRule, checked_budget
from ..structured.dependency.tracing import check_input_size
from ..structured.dependency.units import (
    ChannelUnit,
    default_input_size,
    positions_left,
    removable_units,
)
from ..structured.shrink import LiveShrink
from ..topology import LayerPlan, LayerView
from ..validation import UNIT_INTERVAL, Range, option
from .base import MethodInfo, register_method
from .scores import gradient_score, magnitude_score

__all__ = ["ChaseRule"]


def counts_summing_to(
    shapes: Mapping[str, tuple[int, ...]], densities: Mapping[str, float], total: int
) -> dict[str, int]:
    """Active weights per layer, ``d_l · N_l`` rounded (at least 1, at most ``N_l``), corrected one weight
    at a time, on the layers whose rounding was furthest off, to sum to ``total`` where the shapes allow."""
    counts = active_counts(shapes, densities)
    exact = {name: densities[name] * math.prod(shape) for name, shape in shapes.items()}
    diff = total - sum(counts.values())
    step = 1 if diff > 0 else -1
    while diff:
        movable = [
            name
            for name, shape in shapes.items()
            if (counts[name] < math.prod(shape) if step > 0 else counts[name] > 1)
        ]
        if not movable:
            break
        movable.sort(key=lambda name: step * (counts[name] - exact[name]))  # furthest below (above) first
        for name in movable[: abs(diff)]:
            counts[name] += step
            diff -= step
    return counts


@dataclass
class ChaseRule(StructureRule):
    """Chase's structure: channels removed on a cubic schedule, RigL within the channels left."""

    compacts: ClassVar[bool] = True

    channel_sparsity: float = option(
        "S_c in [0, 1): fraction of the removable channels removed by T_c (paper: 0.5 CIFAR, 0.4 ImageNet)",
        0.5,
        range=Range(float, 0, 1, high_open=True),
    )
    removal_interval: int | None = option(
        "steps between channel removals (null: 8 × update_interval, as the official code)",
        range=Range(int, 1, optional=True),
    )
    removal_end_fraction: float = option(
        "T_c / T in (0, 1]: channel removal ends here, or at the last topology update if earlier (official "
        "code: 130 of 160 epochs)",
        0.8125,
        range=UNIT_INTERVAL,
    )
    min_channel_ratio: float = option(
        "β in [0, 1]: each group keeps β·(1 − S_c) of its channels (official code: 0.2)",
        0.2,
        range=Range(float, 0, 1),
    )
    ranking: str = option(
        "global (the paper: lowest UMM over all groups, per-group floors) or layer (each group loses the "
        "same fraction, its lowest-UMM channels: more MACs removed at high resolution)",
        "global",
        choices=("global", "layer"),
    )
    input_size: list[int] | None = option(
        "(C, H, W) of the torch-pruning trace (null: timm's input size)", check=check_input_size
    )
    shrink: bool = option(
        "slice removed channels out of the live model at once, so the rest of the run trains the smaller "
        "network (same masks and losses; the optimizer's parameters keep their identity)",
        False,
    )

    @property
    def shrinks(self) -> bool:
        return self.shrink

    def __post_init__(self) -> None:
        self._traced: dict[tuple, list[ChannelUnit]] = {}  # shared by copies: one trace per architecture

    def bind(self, context: RuleContext) -> None:
        if context.total_steps is None:
            raise ValueError(
                "chase: total_steps is needed (the channel-removal schedule ends at a fraction of it)"
            )
        if is_sharded(context.model):
            raise ValueError(
                "chase: sharded (FSDP2) models are not supported (torch-pruning traces whole tensors); use DDP"
            )
        size = tuple(self.input_size or default_input_size(context.model))
        key = (type(context.model).__name__, size, tuple(context.shapes.items()))
        if key not in self._traced:
            units, skipped = removable_units(context.model, set(context.shapes), size)
            if not units:
                reasons = "; ".join(f"{name}: {why}" for name, why in list(skipped.items())[:6])
                raise ValueError(
                    f"chase: {type(context.model).__name__} has no removable channel group (inner channels "
                    f"of a block, read only by sparse layers, exact to remove) — "
                    f"{reasons or 'torch-pruning found no group'}"
                )
            self._traced[key] = units
        self.units = self._traced[key]
        # validates that every unit can be sliced in place, before anything changes
        self._live = LiveShrink(context.model, self.units, size) if self.shrink else None
        self._shapes = dict(context.shapes)
        self._budget = dict(context.counts)
        self._targets = dict(context.counts)
        self._distribution = context.distribution
        self.alive = {u.name: torch.ones(u.num_channels, dtype=torch.bool) for u in self.units}
        self._end = self._removal_end(context)  # T_c
        interval = self.removal_interval or 8 * context.update_interval
        offset = context.update_interval // 2  # half a ΔT away from the weight updates
        self._removal_steps: set[int] = set()
        if self.channel_sparsity > 0:
            steps = (j * interval - offset for j in range(1, self._end // interval + 2))
            self._removal_steps = {s for s in steps if 1 <= s <= self._end} | {self._end}
        self._refresh()

    def _removal_end(self, context: RuleContext) -> int:
        """T_c: ``removal_end_fraction · T``, capped at the last topology update so that the weights lost
        with the channels are regrown (a ``ValueError`` if no update runs and channels are to go)."""
        end = max(1, round(self.removal_end_fraction * context.total_steps))
        if self.channel_sparsity == 0:
            return end
        last_update = context.last_scheduled_update()
        if not last_update:
            raise ValueError(
                f"chase: channel removal needs a later topology update to regrow the weights of the removed "
                f"channels, but this run has none (update_interval={context.update_interval}, "
                f"total_steps={context.total_steps}, stop_step={context.stop_step}); allowed: an "
                f"update_interval below total_steps and at most stop_step, or channel_sparsity 0"
            )
        return min(end, last_update)

    def removed_fraction(self, step: int) -> float:
        """S_c(t): the cubic schedule's target fraction of removed channels at ``step``."""
        t = min(step, self._end) / self._end
        return self.channel_sparsity * (1.0 - (1.0 - t) ** 3)

    def after_step(self, step: int, params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
        """At a removal step: mark the lowest-UMM channels removed; their rows and columns go now, for good."""
        if step not in self._removal_steps:
            return None
        total = sum(u.num_channels for u in self.units)
        alive_now = sum(int(a.sum()) for a in self.alive.values())
        remove = alive_now - math.ceil(total * (1.0 - self.removed_fraction(step)))
        if remove <= 0:
            return None
        candidates: list[tuple[float, str, int]] = []
        for unit in self.units:
            present = None if self._live is None else self._live.present(unit.scored, 0)
            umm = unit.magnitudes(full_tensor(params[unit.scored]), present)
            candidates += [
                (float(umm[c]), unit.name, c) for c in self.alive[unit.name].nonzero().flatten().tolist()
            ]
        if self.ranking == "layer":  # every group down to the same fraction, its lowest-UMM channels first
            keep = 1.0 - self.removed_fraction(step)
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
        broadcast_masks(list(self.alive.values()))  # rank 0's choice (identical under DDP anyway)
        self._refresh()
        return dict(self._allowed)

    def shrink_cuts(self, state: Mapping[str, Any] | None = None) -> Cuts | None:
        if self._live is None:
            return None
        alive = self.alive if state is None else self._checked_alive(state)
        regrown = [
            u.name for u in self.units if bool((alive[u.name] & ~self._live.channels_present(u)).any())
        ]
        if regrown:
            raise ValueError(
                f"chase: the model has already lost channels of {regrown[:3]} that this state still has "
                "(a shrunk model cannot grow back; load the state into a freshly built model)"
            )
        return self._live.cuts_for({name: ~a for name, a in alive.items()}) or None

    def apply_shrink(self, cuts: Cuts) -> None:
        assert self._live is not None
        self._live.apply(cuts)
        self._allowed = self._current(self._allowed_original)

    def _current(self, allowed: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``allowed`` (original coordinates) at the live model's current shapes."""
        if self._live is None:
            return dict(allowed)
        out = {}
        for name, positions in allowed.items():
            for dim in range(min(2, positions.ndim)):
                present = self._live.present(name, dim)
                if present is not None and positions.shape[dim] != 1:  # (1: broadcast along dim)
                    positions = positions.index_select(dim, present)
            out[name] = positions
        return out

    def _refresh(self) -> None:
        """Allowed positions and per-layer counts from the alive channels (budget kept, ERK re-derived)."""
        self._allowed_original, effective = positions_left(self.units, self.alive, self._shapes)
        self._allowed = self._current(self._allowed_original)
        if all(self.alive[u.name].all() for u in self.units):
            self._targets = dict(self._budget)
            return
        budget = sum(self._budget.values())
        room = sum(math.prod(s) for s in effective.values())
        densities = compute_layer_densities(effective, min(1.0, budget / room), self._distribution)
        self._targets = counts_summing_to(effective, densities, budget)

    def layer_plan(self, view: LayerView, rate: float, count: int) -> LayerPlan:
        return LayerPlan(allowed=self._allowed.get(view.name), count=self._targets.get(view.name, count))

    def stats(self) -> dict[str, Any]:
        return {
            "channels_alive": sum(int(a.sum()) for a in self.alive.values()),
            "channels_removable": sum(u.num_channels for u in self.units),
        }

    def state_dict(self) -> dict[str, Any]:
        return {"alive": {name: a.clone() for name, a in self.alive.items()}, "budget": dict(self._budget)}

    def _checked_alive(self, state: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        sizes = {u.name: (u.num_channels,) for u in self.units}
        return validate_masks(state.get("alive"), sizes, what="chase: the saved alive channels")

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        alive = self._checked_alive(state)
        self._budget = checked_budget(state.get("budget", self._budget), self._shapes, "chase")
        self.alive = {name: a.clone() for name, a in alive.items()}
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
