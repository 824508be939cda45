"""SRigL (Lasby et al., ICLR 2024): RigL with constant fan-in and neuron ablation (REFERENCE §5).

Every row that is alive (a linear layer's output neuron, a convolution's output channel) holds exactly
``k`` active weights, so a trained layer condenses into dense ``[rows, k]`` values and indices
(:func:`itop_timm.structured.condense`). At each topology update, per layer (REFERENCE §5.2):

a. salient = the ``n_keep`` largest ``|w|`` of the active weights ∪ the ``n_drop`` largest ``|dense
   gradient|`` of the rest (``n_drop = ceil(rate · active)``);
b. a row with fewer than ``max(1, ⌊gamma_sal · k0⌋)`` salient weights is ablated (``k0``: the fan-in
   without ablation; the classifier is never ablated; at least one row stays), re-decided at every update;
   ``k = ⌊budget / alive rows⌋`` keeps the layer's density;
c. the engine's update with ``LayerPlan(allowed=alive rows, row_k=k)``: keep the ``n_keep`` largest
   ``|w|`` (at most ``k`` per row), grow every alive row back to ``k`` by ``|dense gradient|``.

Defaults from the paper: ``gamma_sal = 0.3`` (its CNN setting; 0.95 for ViTs), drop fraction α = 0.3
with cosine decay (``prune_rate``), updates until ``T_end = 0.75 T`` (``t_end_fraction``). Our cosine
decays over the whole run (the library's schedule), the paper's over ``T_end``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ..structure import RuleContext, StructureRule, checked_budget
from ..structured.dependency.tracing import classifier_modules
from ..topology import LayerPlan, LayerView
from ..validation import UNIT_INTERVAL, option
from .base import MethodInfo, register_method
from .scores import gradient_score, magnitude_score

__all__ = ["SRigLRule"]


@dataclass
class SRigLRule(StructureRule):
    """SRigL's structure: constant fan-in per alive row, rows ablated by salience."""

    gamma_sal: float = option(
        "γ_sal in (0, 1]: rows with fewer than max(1, ⌊γ_sal·k0⌋) salient weights are ablated "
        "(Lasby et al. 2024: 0.3 for CNNs, 0.95 for ViTs)",
        0.3,
        range=UNIT_INTERVAL,
    )
    t_end_fraction: float = option(
        "last topology update at this fraction of training, in (0, 1] (paper: 0.75)",
        0.75,
        range=UNIT_INTERVAL,
    )

    def bind(self, context: RuleContext) -> None:
        head = {id(p) for module in classifier_modules(context.model) for p in module.parameters()}
        params = context.model.named_parameters()
        self._classifier = {name for name, p in params if id(p) in head} & set(context.shapes)
        self._shapes = dict(context.shapes)
        self._budget = dict(context.counts)
        self._ablated: dict[str, int] = {}

    def initial_mask(
        self, name: str, shape: tuple[int, ...], count: int, generator: torch.Generator
    ) -> torch.Tensor:
        """``⌊count / rows⌋`` (at least 1) random positions in every row (in ``count`` random rows when
        the layer has fewer active weights than rows)."""
        rows, fan_in = shape[0], math.prod(shape[1:])
        k = min(fan_in, max(1, count // rows))
        scores = torch.rand(rows, fan_in, generator=generator)
        mask = torch.zeros(rows, fan_in, dtype=torch.bool)
        mask.scatter_(1, torch.topk(scores, k, dim=1).indices, True)
        alive = min(rows, count // k)
        if alive < rows:
            mask[torch.randperm(rows, generator=generator)[alive:]] = False
        return mask.view(shape)

    def layer_plan(self, view: LayerView, rate: float, count: int) -> LayerPlan:
        budget = self._budget[view.name]
        mask = view.mask.reshape(view.mask.shape[0], -1)
        rows, fan_in = mask.shape
        n_drop = min(math.ceil(rate * count), count)
        weight = view.weight.detach().abs().reshape(rows, -1).float()
        grad = view.grad_or_zeros().detach().abs().reshape(rows, -1).float()
        salient = torch.zeros_like(mask)
        n_keep = count - n_drop
        if n_keep > 0:
            ranked = torch.where(mask, weight, weight.new_full((), -math.inf)).reshape(-1)
            salient.view(-1)[torch.topk(ranked, n_keep, sorted=False).indices] = True
        if n_drop > 0:
            ranked = torch.where(salient, grad.new_full((), -math.inf), grad).reshape(-1)
            salient.view(-1)[torch.topk(ranked, min(n_drop, int((~salient).sum())), sorted=False).indices] = (
                True
            )
        per_row = salient.sum(1)
        k0 = max(1, budget // rows)
        alive = per_row >= max(1, math.floor(self.gamma_sal * k0))
        if view.name in self._classifier:
            alive[:] = True
        if not bool(alive.any()):
            alive[int(per_row.argmax())] = True
        n_alive = int(alive.sum())
        self._ablated[view.name] = rows - n_alive
        k = min(fan_in, max(1, budget // n_alive))
        return LayerPlan(allowed=alive.view(rows, *[1] * (view.mask.ndim - 1)), row_k=k)

    def last_update_step(self, total_steps: int | None) -> int | None:
        return None if total_steps is None else math.floor(self.t_end_fraction * total_steps)

    def stats(self) -> dict[str, Any]:
        return {"ablated_rows": sum(self._ablated.values())}

    def state_dict(self) -> dict[str, Any]:
        return {"budget": dict(self._budget)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._budget = checked_budget(state.get("budget", self._budget), self._shapes, "srigl")


register_method(
    MethodInfo(
        "srigl",
        magnitude_score,
        gradient_score,
        "SRigL: RigL with constant fan-in per row and neuron ablation (Lasby et al. 2024)",
        defaults={"prune_rate": 0.3},
        needs_grad=True,
        structure=SRigLRule,
    )
)
