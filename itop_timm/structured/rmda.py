"""RMDA — Regularized Modernized Dual Averaging (Huang & Lee, ICLR 2022) — and the ProxSGD baseline.

RMDA, per parameter group (its own counters, unlike the reference code), each step::

    t += 1;  β = sqrt(t);  s = lr·β;  α += s
    V += s · grad(W)                                  # per parameter; W0 = W at the stage start
    W̃ = prox_{(α/β)·λ·ψ}(W0 − V/β)
    W = (1 − c)·W + c·W̃                               # c = ``momentum`` in (0, 1]

At each learning-rate milestone (:class:`RMDAStages`): ``lr ×= gamma``, ``c ← min(1, c / gamma)`` and the
stage restarts (``t = α = 0``, ``W0 = W``, ``V = 0``). RMDA uses no weight decay: ``weight_lambda`` (λ)
and the regulariser ψ (:mod:`itop_timm.structured.prox`, default: the paper's group LASSO per input
channel) play that role. Parameters the regulariser does not cover (1-D: biases, norms) follow the
same dual-averaging update without a prox.

ProxSGD: SGD with momentum followed by ``prox_{lr·λ·ψ}`` of the weights.

Both are in timm's optimizer registry after ``import itop_timm``::

    timm.optim.create_optimizer_v2(model, "rmda", lr=1.0, momentum=0.01, weight_lambda=1e-5)
    timm.optim.create_optimizer_v2(model, "proxsgd", lr=0.1, momentum=0.9, weight_lambda=1e-5)

(timm fills ``momentum=0.9`` when it is not given: pass the paper's ``momentum=0.01`` explicitly.)
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from ..validation import Range
from .prox import Regularizer, create_regularizer, group_sparsity

__all__ = ["RMDA", "ProxSGD", "RMDAStages"]


def _validate(
    lr: float, momentum: float, weight_lambda: float, weight_decay: float, name: str, momentum_range: str
) -> None:
    Range(float, 0, low_open=True).check(f"{name}: lr", lr)
    what = "momentum (the averaging weight c)" if momentum_range == "(0, 1]" else "momentum"
    Range(float, 0, 1, low_open=momentum_range == "(0, 1]", high_open=momentum_range == "[0, 1)").check(
        f"{name}: {what}", momentum
    )
    Range(float, 0).check(f"{name}: weight_lambda", weight_lambda)
    if weight_decay:
        raise ValueError(
            f"{name}: weight_decay must be 0 (the regulariser's weight_lambda replaces it), got {weight_decay!r}"
        )


def _closure_loss(closure: Any) -> Any:
    """The loss of ``optimizer.step(closure)`` (``None`` without a closure), computed with gradients on."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


class _ProximalOptimizer(torch.optim.Optimizer):
    """Shared plumbing: a regulariser over (some of) the parameters, group-sparsity metrics."""

    regularizer: Regularizer | None

    def _init_regularizer(self, regularizer: str | Regularizer | None) -> None:
        params = [p for group in self.param_groups for p in group["params"]]
        self.regularizer = create_regularizer(regularizer, params)
        if self.regularizer is None:
            return
        group_of = {id(p): i for i, group in enumerate(self.param_groups) for p in group["params"]}
        missing = [p for p in self.regularizer.parameters() if id(p) not in group_of]
        if missing:
            raise ValueError(
                f"the regularizer covers {len(missing)} tensor(s) this optimizer does not update"
            )
        for group in getattr(self.regularizer, "groups", []):
            members = {group_of[id(self.regularizer._params[s.param_name])] for s in group.slices}
            if len(members) > 1:
                raise ValueError(
                    f"coupled group {group.name!r} spans several parameter groups; put its tensors in one group"
                )

    def group_sparsity(self, tol: float = 0.0) -> dict[str, float]:
        """Fraction of regulariser groups that are entirely zero (and weighted by size)."""
        return group_sparsity(self.regularizer, tol) if self.regularizer is not None else {}


class RMDA(_ProximalOptimizer):
    """Regularized Modernized Dual Averaging.

    Args:
        params: parameters or parameter groups.
        lr: learning rate (> 0); the paper uses 1.0 for ResNet-50 / CIFAR-100 and 0.1 for logistic regression.
        momentum: the averaging weight c in (0, 1] (1: no averaging; paper: 0.01).
        weight_lambda: λ >= 0, strength of the regulariser (paper: 1e-5 for ResNet-50, 1e-3 for MNIST).
        regularizer: ``"group_lasso_in"`` (default), ``"group_lasso_out"``, ``"l1"``, ``"none"`` or a
            regulariser object (e.g. ``GroupLasso.coupled(model, example_inputs)``).
        weight_decay: must be 0 (accepted because timm's factory always passes it).
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 0.1,
        momentum: float = 0.01,
        weight_lambda: float = 1e-5,
        regularizer: str | Regularizer | None = "group_lasso_in",
        weight_decay: float = 0.0,
    ) -> None:
        _validate(lr, momentum, weight_lambda, weight_decay, "RMDA", "(0, 1]")
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "weight_lambda": weight_lambda,
            "weight_decay": 0.0,
            "t": 0,
            "alpha": 0.0,
        }
        super().__init__(params, defaults)
        for group in self.param_groups:
            _validate(
                group["lr"],
                group["momentum"],
                group["weight_lambda"],
                group.get("weight_decay", 0.0),
                "RMDA",
                "(0, 1]",
            )
        self._init_regularizer(regularizer)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = _closure_loss(closure)
        candidates: dict[int, torch.Tensor] = {}
        scales: dict[int, float] = {}
        updates: list[tuple[torch.Tensor, torch.Tensor, float]] = []
        for group in self.param_groups:
            group["t"] += 1
            beta = math.sqrt(group["t"])
            s = group["lr"] * beta
            group["alpha"] += s
            scale = group["weight_lambda"] * group["alpha"] / beta
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["initial_point"] = p.detach().clone()
                    state["grad_sum"] = torch.zeros_like(p)
                state["grad_sum"].add_(p.grad, alpha=s)
                candidates[id(p)] = state["initial_point"] - state["grad_sum"] / beta
                scales[id(p)] = scale
                updates.append((p, candidates[id(p)], group["momentum"]))
        if self.regularizer is not None:
            self.regularizer.prox_(candidates, scales)
        for p, candidate, c in updates:
            p.mul_(1.0 - c).add_(candidate, alpha=c)
        return loss

    @torch.no_grad()
    def restart(self) -> None:
        """Start a new stage: ``t = α = 0``, ``W0 = W``, ``V = 0`` (called by :class:`RMDAStages`)."""
        for group in self.param_groups:
            group["t"], group["alpha"] = 0, 0.0
            for p in group["params"]:
                state = self.state[p]
                if state:
                    state["initial_point"].copy_(p)
                    state["grad_sum"].zero_()


class ProxSGD(_ProximalOptimizer):
    """SGD with momentum, then ``prox_{lr·λ·ψ}`` of the weights (the paper's ProxSGD baseline)."""

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_lambda: float = 1e-5,
        regularizer: str | Regularizer | None = "group_lasso_in",
        nesterov: bool = False,
        weight_decay: float = 0.0,
    ) -> None:
        _validate(lr, momentum, weight_lambda, weight_decay, "ProxSGD", "[0, 1)")
        super().__init__(
            params,
            {
                "lr": lr,
                "momentum": momentum,
                "weight_lambda": weight_lambda,
                "nesterov": nesterov,
                "weight_decay": 0.0,
            },
        )
        self._init_regularizer(regularizer)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = _closure_loss(closure)
        candidates: dict[int, torch.Tensor] = {}
        scales: dict[int, float] = {}
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = p.grad
                if group["momentum"]:
                    state = self.state[p]
                    buf = state.get("momentum_buffer")
                    if buf is None:
                        buf = state["momentum_buffer"] = d.clone()
                    else:
                        buf.mul_(group["momentum"]).add_(d)
                    d = d.add(buf, alpha=group["momentum"]) if group["nesterov"] else buf
                p.add_(d, alpha=-group["lr"])
                candidates[id(p)] = p
                scales[id(p)] = group["lr"] * group["weight_lambda"]
        if self.regularizer is not None:
            self.regularizer.prox_(candidates, scales)
        return loss


class RMDAStages:
    """The paper's milestone schedule for :class:`RMDA`: at each milestone (in optimizer steps)
    ``lr ×= gamma``, ``c ← min(1, c / gamma)`` and a stage restart. Call :meth:`step` after every
    ``optimizer.step()``; ``state_dict`` / ``load_state_dict`` for resuming."""

    def __init__(self, optimizer: RMDA, milestones: Iterable[int], gamma: float = 0.1) -> None:
        if not isinstance(optimizer, RMDA):
            raise ValueError(f"RMDAStages drives an RMDA optimizer, got {type(optimizer).__name__}")
        if not 0 < gamma < 1:
            raise ValueError(f"gamma must be in (0, 1), got {gamma!r}")
        self.optimizer = optimizer
        self.milestones = sorted(int(m) for m in milestones)
        if any(m < 1 for m in self.milestones):
            raise ValueError(f"milestones are optimizer steps >= 1, got {self.milestones}")
        self.gamma = gamma
        self.steps = 0

    def step(self) -> bool:
        """Count one optimizer step; returns True when a new stage started."""
        self.steps += 1
        if self.steps not in self.milestones:
            return False
        for group in self.optimizer.param_groups:
            group["lr"] *= self.gamma
            group["momentum"] = min(1.0, group["momentum"] / self.gamma)
        self.optimizer.restart()
        return True

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "milestones": list(self.milestones), "gamma": self.gamma}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.steps = int(state["steps"])
        self.milestones = [int(m) for m in state["milestones"]]
        self.gamma = float(state["gamma"])
