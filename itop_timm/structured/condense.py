"""SRigL's condensed form of a linear layer with constant fan-in (REFERENCE §5.3).

Every row of a layer trained by ``srigl`` holds exactly ``k`` weights (or none: ablated). Such a layer is
stored as dense ``values[n_alive, k]`` and ``indices[n_alive, k]``, and computed as a gather, a
multiply and a sum (one ``F.embedding_bag`` call): ``y[b, j] = Σ_i values[j, i] · x[b, indices[j, i]] + bias[j]`` (ablated rows output
their bias). No sparse kernels: plain dense ops, fast at small batch on the CPU.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CondensedLinear", "condense"]

_logger = logging.getLogger(__name__)


class CondensedLinear(nn.Module):
    """A linear layer with constant fan-in, stored condensed (see the module docstring).

    Attributes:
        values: ``[n_alive, k]`` weights of the alive rows.
        indices: ``[n_alive, k]`` input positions of those weights (int64: ``embedding_bag``'s int32 path
            measured 2× slower on the CPU).
        alive: ``[n_alive]`` int64 output rows that hold weights (``None`` when every row does).
        bias: ``[out_features]`` or ``None``.
    """

    def __init__(
        self,
        values: torch.Tensor,
        indices: torch.Tensor,
        out_features: int,
        in_features: int,
        alive: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.values = nn.Parameter(values)
        self.register_buffer("indices", indices.to(torch.int64))
        self.register_buffer("alive", alive)
        self.bias = None if bias is None else nn.Parameter(bias)

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, mask: torch.Tensor | None = None, name: str = "linear"
    ) -> CondensedLinear:
        """Condense ``linear`` (its nonzero weights, or those in ``mask``); ``ValueError`` naming ``name``
        when the rows holding weights do not all hold the same number."""
        weight = linear.weight.detach()
        active = (weight != 0) if mask is None else mask.to(device=weight.device, dtype=torch.bool)
        counts = active.sum(1)
        alive_rows = counts > 0
        k_values = counts[alive_rows].unique()
        if k_values.numel() > 1:
            raise ValueError(
                f"{name}: rows hold {k_values.tolist()[:5]} weights; condensing needs the same number in every "
                "row that holds any (constant fan-in, as trained by srigl)"
            )
        k = int(k_values[0]) if k_values.numel() else 0
        rows = alive_rows.nonzero().flatten()
        # within each alive row, the positions of its k active weights in ascending order
        order = torch.sort((~active[rows]).to(torch.int8), dim=1, stable=True).indices[:, :k]
        values = torch.gather(weight[rows], 1, order).clone()
        bias = None if linear.bias is None else linear.bias.detach().clone()
        alive = None if bool(alive_rows.all()) else rows
        return cls(values, order, linear.out_features, linear.in_features, alive, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        # one fused gather-multiply-sum: row j is the bag indices[j] of x's columns, weighted by values[j]
        y = F.embedding_bag(self.indices, flat.T.contiguous(), per_sample_weights=self.values, mode="sum").T
        if self.alive is not None:
            out = flat.new_zeros(flat.shape[0], self.out_features)
            out[:, self.alive] = y
            y = out
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, k={self.values.shape[1]}, "
            f"alive_rows={self.values.shape[0]}"
        )


def condense(
    model: nn.Module, masks: Mapping[str, torch.Tensor] | None = None, *, min_sparsity: float = 0.5
) -> tuple[nn.Module, dict[str, Any]]:
    """Replace, in place, every ``nn.Linear`` with constant fan-in by a :class:`CondensedLinear`.

    Args:
        model: e.g. a ViT or MLP-Mixer trained with ``method="srigl"`` (for inference: the layers'
            weights become the condensed values).
        masks: ``{parameter name: bool mask}`` (from ``load_sparse`` or ``Sparsifier.masks``); without
            them the nonzero weights are the active ones.
        min_sparsity: layers whose active fraction is above ``1 - min_sparsity`` stay dense (condensing
            a nearly dense layer makes it slower).

    Returns:
        ``(model, report)``: ``report["condensed"]`` lists the replaced layers and ``report["skipped"]``
        maps the other linear layers to why.
    """
    if not 0 <= min_sparsity < 1:
        raise ValueError(f"min_sparsity must be in [0, 1), got {min_sparsity!r}")
    masks = dict(masks or {})
    replace: dict[str, CondensedLinear] = {}
    skipped: dict[str, str] = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        mask = masks.get(f"{name}.weight")
        active = (module.weight != 0) if mask is None else mask.to(torch.bool)
        if float(active.float().mean()) > 1 - min_sparsity:
            skipped[name] = f"density {float(active.float().mean()):.3f} above {1 - min_sparsity:.3f}"
            continue
        try:
            replace[name] = CondensedLinear.from_linear(module, mask, name)
        except ValueError as err:
            skipped[name] = str(err)
    for name, layer in replace.items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer)
    _logger.info("condense: %d linear layer(s) condensed, %d left dense", len(replace), len(skipped))
    return model, {"condensed": list(replace), "skipped": skipped}
