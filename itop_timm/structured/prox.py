"""Structure-inducing regularisers ψ as small proximal-operator objects (REFERENCE §2).

* :class:`GroupLasso` — ``ψ(W) = Σ_g sqrt(|g|) ‖W_g‖``; prox: ``w_g ← max(0, ‖w_g‖ − τ sqrt(|g|)) / ‖w_g‖ · w_g``.
  Groups are :class:`~itop_timm.structured.dependency.ChannelGroup` s, so one mechanism covers the paper's
  per-parameter groups (``GroupLasso.per_parameter(..., axis="in")``: conv weights per input channel,
  linear weights per input feature; ``axis="out"``: per filter) and torch-pruning's coupled channel groups
  (``GroupLasso.coupled(model, example_inputs)``), whose zeroed channels ``compact`` can remove.
* :class:`L1` — ``ψ(W) = ‖W‖₁``; prox: soft threshold.

Parameters with fewer than two dimensions (biases, norms) are never regularised by the per-parameter
constructors. The prox is applied to *candidate* tensors keyed by their parameter (RMDA's
``W0 − V/β``, or the parameters themselves for ProxSGD), with a threshold scale per parameter
(``λ·α/β`` for RMDA, ``lr·λ`` for ProxSGD).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Protocol

import torch
from torch import nn

from ..validation import Range
from .dependency import ChannelGroup, ChannelSlice, channel_numel, coupled_channel_groups, per_position

__all__ = ["Regularizer", "GroupLasso", "L1", "create_regularizer", "group_sparsity"]


class Regularizer(Protocol):
    """What the proximal optimizers need from a regulariser."""

    def parameters(self) -> list[torch.Tensor]:
        """The parameters the regulariser covers."""
        ...

    def prox_(self, candidates: Mapping[int, torch.Tensor], scales: Mapping[int, float]) -> None:
        """Apply ``prox_{scale·ψ}`` in place to ``candidates[id(param)]`` (threshold scale per parameter)."""
        ...


def _check_lambda(value: float, what: str = "weight_lambda") -> float:
    return Range(float, 0).check(what, value)


class GroupLasso:
    """Group LASSO over channel groups (see the module docstring)."""

    def __init__(self, groups: Iterable[ChannelGroup], params: Mapping[str, torch.Tensor]) -> None:
        self.groups = list(groups)
        self._params = dict(params)
        for group in self.groups:
            for s in group.slices:
                if s.param_name not in self._params:
                    raise ValueError(f"group {group.name!r} refers to unknown parameter {s.param_name!r}")
                size = self._params[s.param_name].shape[s.dim]
                if s.index.numel() and (int(s.index.min()) < 0 or int(s.index.max()) >= size):
                    raise ValueError(
                        f"group {group.name!r}: index out of range for {s.param_name!r} dim {s.dim}"
                    )
            if group.numel is None:
                group.numel = channel_numel(group.slices, self._params, group.num_channels)

    @classmethod
    def per_parameter(
        cls, named_params: Iterable[tuple[str, torch.Tensor]] | nn.Module, axis: str = "in"
    ) -> GroupLasso:
        """One group per input channel (``axis="in"``, the paper's grouping: conv weight norm over dims
        0, 2, 3; linear weight norm over dim 0) or per output channel / filter (``axis="out"``) of every
        parameter with at least 2 dimensions."""
        if axis not in ("in", "out"):
            raise ValueError(f"axis must be 'in' or 'out', got {axis!r}")
        items = list(named_params.named_parameters() if isinstance(named_params, nn.Module) else named_params)
        dim = 1 if axis == "in" else 0
        groups, params = [], {}
        for name, p in items:
            if p.ndim < 2:
                continue
            n = p.shape[dim]
            idx = torch.arange(n)
            params[name] = p
            groups.append(
                ChannelGroup(
                    name, n, [ChannelSlice(name, dim, idx, idx, "consumer" if axis == "in" else "producer")]
                )
            )
        return cls(groups, params)

    @classmethod
    def coupled(cls, model: nn.Module, example_inputs: torch.Tensor, **kwargs) -> GroupLasso:
        """torch-pruning's coupled channel groups of ``model`` (removable by ``compact`` once zero).

        Groups overlap (a conv weight is in its output-channel group and its input-channel group); the
        prox is then applied group after group, the usual approximation of the overlapping-group prox.
        """
        return cls(coupled_channel_groups(model, example_inputs, **kwargs), dict(model.named_parameters()))

    def parameters(self) -> list[torch.Tensor]:
        return list(self._params.values())

    def _slices(self, group: ChannelGroup) -> list[tuple[torch.Tensor, ChannelSlice]]:
        return [(self._params[s.param_name], s) for s in group.slices]

    @torch.no_grad()
    def prox_(self, candidates: Mapping[int, torch.Tensor], scales: Mapping[int, float]) -> None:
        for group in self.groups:
            slices = [(p, s) for p, s in self._slices(group) if id(p) in candidates]
            if not slices:
                continue
            scale = scales[id(slices[0][0])]
            if scale <= 0:
                continue
            device = candidates[id(slices[0][0])].device
            sq = torch.zeros(group.num_channels, dtype=torch.float32, device=device)
            for p, s in slices:
                sq.index_add_(0, s.channel.to(device), _position_sq(candidates[id(p)], s))
            norm = sq.sqrt()
            tau = scale * group.numel.to(device=device, dtype=torch.float32).sqrt()
            factor = torch.where(norm > tau, 1.0 - tau / norm.clamp_min(1e-30), torch.zeros_like(norm))
            for p, s in slices:
                cand = candidates[id(p)]
                f = factor[s.channel.to(device)].to(cand.dtype)
                shape = [1] * cand.ndim
                shape[s.dim] = -1
                index = s.index.to(device)
                cand.index_copy_(s.dim, index, cand.index_select(s.dim, index) * f.view(shape))


def _position_sq(t: torch.Tensor, s: ChannelSlice) -> torch.Tensor:
    return per_position(t.float().pow(2), s.dim)[s.index.to(t.device)]


class L1:
    """``ψ(W) = ‖W‖₁`` on every parameter with at least 2 dimensions (unstructured sparsity)."""

    def __init__(self, named_params: Iterable[tuple[str, torch.Tensor]] | nn.Module) -> None:
        items = named_params.named_parameters() if isinstance(named_params, nn.Module) else named_params
        self._params = {name: p for name, p in items if p.ndim >= 2}

    def parameters(self) -> list[torch.Tensor]:
        return list(self._params.values())

    @torch.no_grad()
    def prox_(self, candidates: Mapping[int, torch.Tensor], scales: Mapping[int, float]) -> None:
        for p in self._params.values():
            cand = candidates.get(id(p))
            if cand is not None and scales[id(p)] > 0:
                shrunk = cand.abs().sub_(scales[id(p)]).clamp_min_(0)
                cand.copy_(cand.sign() * shrunk)


def create_regularizer(spec: str | Regularizer | None, params: Iterable[torch.Tensor]) -> Regularizer | None:
    """``"group_lasso_in"`` (default, the paper's), ``"group_lasso_out"``, ``"l1"``, ``"none"``, or a
    ready regulariser (e.g. ``GroupLasso.coupled(model, x)``)."""
    if spec is None or spec == "none":
        return None
    if not isinstance(spec, str):
        if not hasattr(spec, "prox_"):
            raise ValueError(
                f"regularizer must be a name or an object with prox_(), got {type(spec).__name__}"
            )
        return spec
    named = [(f"param{i}", p) for i, p in enumerate(params)]
    if spec == "group_lasso_in":
        return GroupLasso.per_parameter(named, axis="in")
    if spec == "group_lasso_out":
        return GroupLasso.per_parameter(named, axis="out")
    if spec == "l1":
        return L1(named)
    raise ValueError(
        f"unknown regularizer {spec!r}; allowed: group_lasso_in, group_lasso_out, l1, none, or a Regularizer object"
    )


@torch.no_grad()
def group_sparsity(regularizer: Regularizer, tol: float = 0.0) -> dict[str, float]:
    """Structured-sparsity metrics: fraction of groups that are entirely zero (``|w| <= tol``), also
    weighted by group size; for :class:`L1`, the fraction of zero weights."""
    if isinstance(regularizer, L1):
        total = sum(p.numel() for p in regularizer.parameters())
        zero = sum(int((p.abs() <= tol).sum()) for p in regularizer.parameters())
        return {"zero_fraction": zero / max(total, 1), "groups": total}
    if not isinstance(regularizer, GroupLasso):
        return {}
    zero = weighted_zero = count = weighted = 0.0
    for group in regularizer.groups:
        sq = torch.zeros(group.num_channels, dtype=torch.float32)
        for p, s in regularizer._slices(group):
            if tol > 0:
                t = torch.where(p.abs() <= tol, torch.zeros_like(p), p)
            else:
                t = p
            sq.index_add_(0, s.channel, _position_sq(t, s).cpu())
        is_zero = sq == 0
        zero += float(is_zero.sum())
        count += group.num_channels
        weighted_zero += float(group.numel[is_zero].sum())
        weighted += float(group.numel.sum())
    return {
        "zero_groups": zero / max(count, 1),
        "zero_groups_weighted": weighted_zero / max(weighted, 1),
        "groups": count,
    }
