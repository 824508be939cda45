"""Periodic sampled weight averaging: PSWA and PWALKS (Tripathi et al. 2019, arXiv 1905.05774).

Within each period of ``period_steps`` optimizer steps, after each step, with probability
``sample_prob`` and only inside the last ``last_fraction`` of the period (PWALKS; ``last_fraction=1`` is
PSWA), the current weights are folded into a running mean (float32, on the parameter's device, with
``foreach`` ops and no host sync: the coin is tossed on a seeded CPU generator). At the period's end the
mean is written back into the model and reset; training continues from it. Models with BatchNorm need
their statistics re-estimated after a write-back (:func:`update_bn`); the recipe does this.

Sparse models (``sparsifier=``): a weight is averaged only over the samples in which it was active
(a per-weight count of active samples is kept for the sparse tensors). A topology update inside a period
is handled by that count: a weight dropped during the period is written back as 0 (the current mask is
re-applied after write-back), a weight grown during the period gets the mean of the samples since it
became active, and a weight grown after the last sample keeps its current value (0).
When the model shrinks during training (Chase with ``shrink``), the sums and counts are sliced with it
(the sparsifier's ``"shrink"`` update event).

Hook order: create the averager *after* :func:`itop_timm.sparsify`, so that the sparsifier's step hook
(masks, topology update) has run before the weights are sampled.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from .cuts import slice_like
from .sparsifier import Sparsifier
from .unwrap import unwrap_model, unwrap_optimizer
from .validation import UNIT_INTERVAL, Range

__all__ = ["PeriodicWeightAveraging", "update_bn", "validate_averaging_options"]

_logger = logging.getLogger(__name__)
_FORMAT = "itop_timm.averaging.v1"


def validate_averaging_options(options: Any) -> None:
    """Check the recipe's ``averaging`` section (``period_epochs``, ``sample_prob``, ``last_fraction``)."""
    UNIT_INTERVAL.check("averaging.sample_prob", options.sample_prob)
    UNIT_INTERVAL.check("averaging.last_fraction", options.last_fraction)
    Range(float, 0, low_open=True).check("averaging.period_epochs", options.period_epochs)
    Range(int, 0).check("averaging.bn_update_batches", options.bn_update_batches)


class PeriodicWeightAveraging:
    """PSWA / PWALKS on an optimizer step hook (see the module docstring).

    Args:
        model: the model whose trainable parameters are averaged.
        optimizer: its optimizer; the hook runs after every real ``optimizer.step()``.
        period_steps: period length P in optimizer steps (>= 1), e.g. one epoch.
        sample_prob: probability q in (0, 1] of sampling the weights after a step.
        last_fraction: sample only in the last ``last_fraction`` of each period (PWALKS), in (0, 1].
        sparsifier: the run's :class:`~itop_timm.Sparsifier`, to average active weights only.
        seed: seed of the generator that tosses the sampling coins.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        period_steps: int,
        sample_prob: float = 1.0,
        last_fraction: float = 1.0,
        sparsifier: Sparsifier | None = None,
        seed: int = 0,
    ) -> None:
        Range(int, 1).check("period_steps", period_steps)
        self.sample_prob = UNIT_INTERVAL.check("sample_prob", sample_prob)
        self.last_fraction = UNIT_INTERVAL.check("last_fraction", last_fraction)
        self.period_steps = period_steps
        self.model = unwrap_model(model)
        self.optimizer = unwrap_optimizer(optimizer)
        if sparsifier is not None and sparsifier.optimizer is not self.optimizer:
            raise ValueError("the sparsifier hooks a different optimizer than the one given")
        self.sparsifier = sparsifier
        self._params = {name: p for name, p in self.model.named_parameters() if p.requires_grad}
        self._sums = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in self._params.items()}
        sparse = sparsifier.masks if sparsifier is not None else {}
        self._active_counts = {name: torch.zeros_like(self._sums[name]) for name in sparse}
        self._generator = torch.Generator().manual_seed(seed)
        self.samples = 0  # samples folded into the current period's mean
        self.step_in_period = 0
        self.periods = 0
        self.last_writeback_step: int | None = None
        self.last_writeback: dict[str, Any] | None = None
        self.steps = 0
        self._first_sampled_step = period_steps - max(1, round(last_fraction * period_steps)) + 1
        self._handle = self.optimizer.register_step_post_hook(self._after_optimizer_step)
        # a model that shrinks during training (Chase with shrink): the buffers are sliced like the weights
        self._shrink_handle = (
            sparsifier.register_update_hook(self._on_mask_change) if sparsifier is not None else None
        )

    def _on_mask_change(self, sparsifier: Sparsifier, stats: Mapping[str, Any]) -> None:
        if stats.get("event") != "shrink":
            return
        for buffers in (self._sums, self._active_counts):
            for name, param_cuts in stats["cuts"].items():
                if name in buffers:
                    buffers[name] = slice_like(buffers[name], param_cuts)

    # ----------------------------------------------------------------- hook
    def _after_optimizer_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self.steps += 1
        self.step_in_period += 1
        if self.step_in_period >= self._first_sampled_step:
            # one CPU draw per eligible step, whatever the probability, so the stream is position-stable
            if float(torch.rand((), generator=self._generator)) < self.sample_prob:
                self._fold()
        if self.step_in_period == self.period_steps:
            self.write_back()

    @torch.no_grad()
    def _fold(self) -> None:
        """Add the current weights to the sums (active weights only for sparse tensors)."""
        self.samples += 1
        self._follow_devices()
        sums = [self._sums[n] for n in self._params]
        values = [p.detach().float() for p in self._params.values()]
        torch._foreach_add_(sums, values)  # inactive sparse weights are exactly 0: they add nothing
        if self._active_counts:
            masks = self.sparsifier.masks
            counts = list(self._active_counts.values())
            torch._foreach_add_(counts, [masks[n].to(counts[0].dtype) for n in self._active_counts])

    def _follow_devices(self) -> None:
        for name, p in self._params.items():
            if self._sums[name].device != p.device:
                self._sums[name] = self._sums[name].to(p.device)
                if name in self._active_counts:
                    self._active_counts[name] = self._active_counts[name].to(p.device)

    @torch.no_grad()
    def mean(self) -> dict[str, torch.Tensor]:
        """The current period's running mean (sparse tensors: over each weight's active samples)."""
        out = {}
        for name, p in self._params.items():
            total = self._sums[name]
            if name in self._active_counts:
                count = self._active_counts[name]
                out[name] = torch.where(count > 0, total / count.clamp_min(1), p.detach().float())
            else:
                out[name] = total / max(self.samples, 1)
        return out

    @torch.no_grad()
    def write_back(self) -> None:
        """End the period: copy the mean into the model (if anything was sampled), re-apply the masks, reset."""
        samples = self.samples
        if samples:
            for name, value in self.mean().items():
                self._params[name].copy_(value.to(self._params[name].dtype))
            if self.sparsifier is not None:
                self.sparsifier.apply_masks()
        self.periods += 1
        self.last_writeback_step = self.steps
        self.last_writeback = {"period": self.periods, "samples": samples, "wrote_back": bool(samples)}
        for t in [*self._sums.values(), *self._active_counts.values()]:
            t.zero_()
        self.samples = 0
        self.step_in_period = 0
        _logger.debug("weight averaging: period %d, %d samples written back", self.periods, samples)

    def remove(self) -> None:
        """Detach the optimizer hook (and the sparsifier's update hook)."""
        self._handle.remove()
        if self._shrink_handle is not None:
            self._shrink_handle.remove()

    # ------------------------------------------------------------- resume
    def state_dict(self) -> dict[str, Any]:
        """Sums, active counts, counters and RNG state (plain tensors and numbers)."""
        return {
            "format": _FORMAT,
            "period_steps": self.period_steps,
            "samples": self.samples,
            "step_in_period": self.step_in_period,
            "periods": self.periods,
            "steps": self.steps,
            "last_writeback_step": self.last_writeback_step,
            "sums": {n: t.detach().cpu().clone() for n, t in self._sums.items()},
            "active_counts": {n: t.detach().cpu().clone() for n, t in self._active_counts.items()},
            "generator_state": self._generator.get_state(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output (validated before anything changes)."""
        if not isinstance(state, Mapping) or state.get("format") != _FORMAT:
            raise ValueError(f"not a weight-averaging state (expected format {_FORMAT!r})")
        if state["period_steps"] != self.period_steps:
            raise ValueError(
                f"state was saved with period_steps={state['period_steps']}, this averager has {self.period_steps}"
            )
        for key, ref in (("sums", self._sums), ("active_counts", self._active_counts)):
            got = state[key]
            # (the parameters' shapes now: a model shrunk by a loaded sparsifier state has the saved ones)
            if set(got) != set(ref) or any(tuple(got[n].shape) != tuple(self._params[n].shape) for n in ref):
                raise ValueError(f"weight-averaging state: {key} do not fit the model's parameters")
        for name, t in state["sums"].items():
            self._sums[name] = t.to(self._params[name].device, torch.float32)
        for name, t in state["active_counts"].items():
            self._active_counts[name] = t.to(self._params[name].device, torch.float32)
        self.samples = int(state["samples"])
        self.step_in_period = int(state["step_in_period"])
        self.periods = int(state["periods"])
        self.steps = int(state["steps"])
        self.last_writeback_step = state["last_writeback_step"]
        self._generator.set_state(state["generator_state"])


@torch.no_grad()
def update_bn(
    model: nn.Module,
    loader: Iterable[Any],
    steps: int | None = None,
    device: torch.device | str | None = None,
) -> int:
    """Re-estimate BatchNorm running statistics with ``steps`` batches of ``loader`` (all if None).

    Running means/variances are reset and recomputed as exact averages over the batches (momentum
    ``None``), in train mode, without gradients; the global RNG is left as it was (dropout inside the
    forward passes draws from a forked generator). Returns the number of batches used (0 if the model
    has no BatchNorm).
    """
    norms = [
        m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    ]
    if not norms:
        return 0
    momenta = {m: m.momentum for m in norms}
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    was_training = model.training
    model.train()
    used = 0
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if torch.cuda.is_available() else []):
        for batch in loader:
            if steps is not None and used >= steps:
                break
            x = batch[0] if isinstance(batch, (list, tuple)) else batch
            model(x.to(device) if device is not None else x)
            used += 1
    for m in norms:
        m.momentum = momenta[m]
    model.train(was_training)
    return used
