"""The Sparsifier: masks, the optimizer step hook, the topology update and ITOP bookkeeping.

The training loop stays the user's (``loss.backward(); optimizer.step()``). :func:`sparsify` registers
optimizer step hooks that, at every real optimizer step,

1. keep inactive weights and their optimizer state exactly 0, so a regrown weight starts at 0 with
   fresh state. For the elementwise optimizers in :data:`GRADIENT_MASKED_OPTIMIZERS` (SGD, Adam,
   AdamW, ...) a step *pre-hook* zeroes the inactive positions of the gradients: such a step leaves a
   weight whose gradient, value and state are 0 at 0, so nothing else is touched (one pass over the
   gradients). Otherwise, and on steps whose dense gradients a topology update reads, the *post-hook*
   re-applies the masks to the sparse weights and to every optimizer-state tensor shaped like the
   weight (SGD momentum, Adam moments, Lion/LAMB state, ...);
2. every ``update_interval`` steps, per layer: drops the ``k = ceil(p_t * active)`` active weights with
   the lowest drop score and grows ``k`` inactive positions with the highest grow score (the method's
   two score functions), density preserved; the union of ever-active weights gives R_s.

Steps the optimizer skips (AMP ``GradScaler`` overflow, Accelerate gradient accumulation) never reach
the hook, so only real optimizer steps are counted. All randomness comes from one seeded CPU
``torch.Generator``; in a process group rank 0's masks are broadcast after initialisation and after
every update, so every rank holds identical masks.

Sharded models (FSDP2, ``fully_shard``): masks, union masks and gradient EMAs are DTensors sharded
like their parameters; the step hook works on local shards only (no communication), and the topology
update gathers one layer's weight, gradient and masks at a time, decides on the full tensors exactly as
unsharded, and keeps this rank's shard (see :mod:`itop_timm.distributed`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from .config import SPARSIFY_DEFAULTS, SparsityConfig
from .densities import active_counts, compute_layer_densities, sparse_parameter_shapes
from .distributed import (
    all_finite,
    broadcast_masks,
    check_supported_wrapping,
    full_tensor,
    global_counts,
    local,
    shard_like,
)
from .masks import validate_masks
from .methods import LayerView, MethodInfo, get_method
from .schedules import create_schedule
from .structure import next_layer_mask

__all__ = [
    "SparsityConfig",
    "Sparsifier",
    "sparsify",
    "unwrap_model",
    "unwrap_optimizer",
    "SPARSIFY_DEFAULTS",
    "GRADIENT_MASKED_OPTIMIZERS",
]

_logger = logging.getLogger(__name__)

STATE_FORMAT = "itop_timm.sparsifier.v1"

#: ``hook(sparsifier, stats)`` called after every topology update (see :meth:`Sparsifier.register_update_hook`).
UpdateHook = Callable[["Sparsifier", dict[str, Any]], None]

#: Optimizers (these exact classes, not subclasses) whose step is elementwise with no reduction over a
#: tensor, and leaves a weight at exactly 0 with its state at 0 when gradient, weight and state are 0 —
#: so masking the gradients before the step keeps inactive weights and state at 0 by itself, and
#: active weights get bit-for-bit the updates the post-step re-masking gives. Any other optimizer (LAMB's
#: trust ratio and cautious variants reduce over the tensor; others keep state that moves at 0) is
#: re-masked after every step.
GRADIENT_MASKED_OPTIMIZERS: tuple[type[torch.optim.Optimizer], ...] = (
    torch.optim.SGD,
    torch.optim.Adam,
    torch.optim.AdamW,
    torch.optim.NAdam,
    torch.optim.RAdam,
    torch.optim.RMSprop,
)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip DDP / DataParallel / FSDP-style ``.module`` wrappers and ``torch.compile``'s ``_orig_mod``."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def unwrap_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """Strip Accelerate's ``AcceleratedOptimizer`` so hooks sit on the optimizer that really steps."""
    from accelerate.optimizer import AcceleratedOptimizer

    while isinstance(optimizer, AcceleratedOptimizer):
        optimizer = optimizer.optimizer
    return optimizer


class Sparsifier:
    """Owns the masks of a model's sparse tensors and keeps them applied during training.

    Create it with :func:`sparsify`. Public state:

    * ``masks`` — ``{parameter name: bool tensor}`` (names as in ``model.named_parameters()``);
    * ``itop_rate`` — R_s, fraction of sparse weights ever active; ``density`` — realised density;
    * ``layer_densities()`` — realised per-layer densities; ``target_densities`` — planned ones;
    * ``step`` — real optimizer steps seen; ``last_update`` — stats of the latest topology update;
    * ``state_dict()`` / ``load_state_dict()`` — masks, union, step, RNG (exact resume). With Accelerate,
      ``itop_timm.training.checkpointing.register_state_hooks(accelerator, {"sparsifier": sp})`` makes
      ``accelerator.save_state`` / ``load_state`` carry it as safetensors + JSON (``register_for_checkpointing``
      works too, but Accelerate unpickles such objects with ``weights_only=False``).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        config: SparsityConfig,
        masks: Mapping[str, torch.Tensor] | None = None,
        compile_hook: bool = False,
    ) -> None:
        check_supported_wrapping(model, optimizer)
        self.model = unwrap_model(model)
        self.compile_hook = compile_hook
        self.optimizer = unwrap_optimizer(optimizer)
        if not isinstance(self.optimizer, torch.optim.Optimizer):
            raise ValueError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self.config = config = config.resolved()
        self.method: MethodInfo = get_method(config.method)

        shapes = sparse_parameter_shapes(self.model, config.include, config.exclude)
        if not shapes:
            raise ValueError(
                f"{type(self.model).__name__} has no sparsifiable tensor (conv/linear weight"
                f"{'' if config.include is None else f' matching include={list(config.include)}'}"
                f"{'' if not config.exclude else f' outside exclude={list(config.exclude)}'})"
            )
        params = dict(self.model.named_parameters())
        self._params: dict[str, nn.Parameter] = {name: params[name] for name in shapes}
        optimized = {id(p) for group in self.optimizer.param_groups for p in group["params"]}
        missing = [name for name, p in self._params.items() if id(p) not in optimized]
        if missing:
            raise ValueError(
                f"{len(missing)} sparse tensor(s) are not optimized by the optimizer (first: {missing[:3]}); "
                "create the optimizer over the model's parameters, or exclude them"
            )
        _refuse_second_sparsifier(self.optimizer)

        self.structure = config.structure_rule()
        if self.structure is not None:
            self.structure.bind(self.model, shapes, config)  # may refuse the architecture, naming the layer
        self._generator = torch.Generator().manual_seed(config.seed)
        if masks is not None:
            initial = {n: m.to("cpu").clone() for n, m in validate_masks(masks, shapes).items()}
            counts = {name: int(m.sum()) for name, m in initial.items()}
            self.target_densities = {name: counts[name] / m.numel() for name, m in initial.items()}
            # the given masks define the density (the `density` argument is not used)
            realised = sum(counts.values()) / sum(m.numel() for m in initial.values())
            self.config = config = dataclasses.replace(config, density=realised)
        else:
            self.target_densities = compute_layer_densities(shapes, config.density, config.distribution)
            counts = active_counts(shapes, self.target_densities)
            initial = {name: self._initial_mask(name, shapes[name], counts[name]) for name in shapes}
        self._schedule = (
            create_schedule(
                config.prune_schedule, config.prune_rate, config.final_prune_rate, config.total_steps
            )
            if self.method.dynamic
            else None
        )
        # -- validation done: from here on the model and optimizer are modified --
        self.masks: dict[str, torch.Tensor] = {
            name: initial[name].to(p.device) for name, p in self._params.items()
        }
        broadcast_masks(list(self.masks.values()))
        self.masks = {name: shard_like(m, self._params[name]) for name, m in self.masks.items()}
        self._ever_active: dict[str, torch.Tensor] = {name: m.clone() for name, m in self.masks.items()}
        self._grad_ema: dict[str, torch.Tensor] | None = (
            {name: torch.zeros_like(p, dtype=torch.float32) for name, p in self._params.items()}
            if self.method.grad_ema_beta is not None
            else None
        )
        self.step = 0
        self.last_update: dict[str, Any] | None = None
        self._update_hooks: OrderedDict[int, UpdateHook] = (
            OrderedDict()
        )  # weak-referenceable for RemovableHandle
        self._paused = False
        # per (name, dtype): (the mask it was made from, its version, the mask as that dtype or None)
        self._factors: dict[tuple[str, torch.dtype], tuple[torch.Tensor, int, torch.Tensor | None]] = {}
        # gradients are masked instead of weights and state while the masks are those last applied
        self._masks_gradients = type(self.optimizer) in GRADIENT_MASKED_OPTIMIZERS and self._grad_ema is None
        self._applied: dict[str, tuple[torch.Tensor, int]] | None = None  # masks as last applied
        self._grads_masked = False
        self.apply_masks()
        self._handles = [
            self.optimizer.register_step_pre_hook(self._before_optimizer_step),
            self.optimizer.register_step_post_hook(self._after_optimizer_step),
        ]
        _mark_owner(self.optimizer, self)
        _logger.info(
            "sparsify: method=%s density=%.4f (%s) over %d tensors, %d of %d weights active",
            self.method.name,
            self.density,
            config.distribution,
            len(self.masks),
            sum(counts.values()),
            self.num_sparse_weights,
        )

    # ------------------------------------------------------------------ masks
    def _initial_mask(self, name: str, shape: tuple[int, ...], count: int) -> torch.Tensor:
        """``count`` active weights: placed by the structure rule if it wants to, else uniformly at random."""
        if self.structure is not None:
            mask = self.structure.initial_mask(name, shape, count, self._generator)
            if mask is not None:
                return mask
        numel = math.prod(shape)
        mask = torch.zeros(numel, dtype=torch.bool)
        mask[torch.randperm(numel, generator=self._generator)[:count]] = True
        return mask.view(shape)

    def _follow_devices(self) -> None:
        """Move masks (and union/EMA) to their parameter's device, e.g. after ``accelerator.prepare``."""
        for name, p in self._params.items():
            if self.masks[name].device != p.device:
                self.masks[name] = self.masks[name].to(p.device)
                self._ever_active[name] = self._ever_active[name].to(p.device)
                if self._grad_ema is not None:
                    self._grad_ema[name] = self._grad_ema[name].to(p.device)

    def _mask_factor(self, name: str, dtype: torch.dtype) -> torch.Tensor | None:
        """``masks[name]`` as a ``dtype`` tensor to multiply by, or ``None`` when it is all true.

        Cached until the mask is replaced or changed in place (its version counter moves), so the
        step hook neither converts bool to float nor reduces the mask on every step.
        """
        mask = local(self.masks[name])  # sharded: this rank's shard (a topology update writes into it)
        cached = self._factors.get((name, dtype))
        if cached is None or cached[0] is not mask or cached[1] != mask._version:
            factor = None if bool(mask.all()) else mask.to(dtype)
            cached = self._factors[(name, dtype)] = (mask, mask._version, factor)
        return cached[2]

    @torch.no_grad()
    def apply_masks(self) -> None:
        """Zero inactive weights and the optimizer state (tensors shaped like the weight) at those positions.

        One ``torch._foreach_mul_`` over every such tensor with the cached masks in the tensor's dtype;
        tensors whose mask is all true are skipped. Each parameter keeps its own tensors (nothing is
        flattened together), so sharded parameters mask their local shards only. The step hooks call it
        whenever needed; call it yourself after writing into the weights outside the optimizer.
        """
        self._follow_devices()
        self._applied = {name: (local(m), local(m)._version) for name, m in self.masks.items()}
        if self.compile_hook:
            self._apply_masks_compiled()
            return
        tensors: list[torch.Tensor] = []
        factors: list[torch.Tensor] = []
        for name, p in self._params.items():
            for value in (p, *self.optimizer.state.get(p, {}).values()):
                if isinstance(value, torch.Tensor) and value.shape == p.shape:
                    factor = self._mask_factor(name, value.dtype)
                    if factor is not None:
                        tensors.append(local(value))  # sharded: this rank's shard, no communication
                        factors.append(factor)
        if tensors:
            torch._foreach_mul_(tensors, factors)

    def _apply_masks_compiled(self) -> None:
        """``apply_masks`` as one ``torch.compile``-d function: per layer, one fused kernel reads the
        bool mask once and zeroes the weight and its optimizer state (compiled on first use and again
        when the set of state tensors changes, e.g. after the first step)."""
        groups: list[tuple[torch.Tensor, list[torch.Tensor]]] = []
        for name, p in self._params.items():
            if self._mask_factor(name, torch.bool) is None:  # all true: nothing to zero
                continue
            state = self.optimizer.state.get(p, {}).values()
            tensors = [p, *(v for v in state if isinstance(v, torch.Tensor) and v.shape == p.shape)]
            groups.append((local(self.masks[name]), [local(t) for t in tensors]))  # sharded: local shards
        if groups:
            _compiled_zero_off_mask()(groups)

    def _masks_unchanged(self) -> bool:
        """Whether every mask is still the one (same tensor, same version) :meth:`apply_masks` last applied."""
        applied = self._applied
        if applied is None:
            return False
        for name, m in self.masks.items():
            mask = local(m)
            if applied[name][0] is not mask or applied[name][1] != mask._version:
                return False
        return True

    @torch.no_grad()
    def _before_optimizer_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        """Zero the gradients' inactive positions when that alone keeps inactive weights and state at 0:
        an elementwise optimizer, masks unchanged since weights and state were last masked, and no
        topology update after this step (it reads the dense gradients)."""
        self._grads_masked = False
        if self._paused or not self._masks_gradients:
            return
        self._follow_devices()  # e.g. moved by accelerator.prepare: new masks, so re-masked after this step
        if self.update_due(self.step + 1) or not self._masks_unchanged():
            return
        grads: list[torch.Tensor] = []
        factors: list[torch.Tensor] = []
        for name, p in self._params.items():
            if p.grad is not None:
                factor = self._mask_factor(name, p.grad.dtype)
                if factor is not None:
                    grads.append(local(p.grad))  # sharded: this rank's shard, no communication
                    factors.append(factor)
        if grads:
            torch._foreach_mul_(grads, factors)
        self._grads_masked = True

    def _after_optimizer_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self._paused:
            return
        self.step += 1
        if not self._grads_masked:  # (set by the pre-hook of this very step)
            self.apply_masks()
        if self.structure is not None:
            self.structure.after_step(self)
        if self._grad_ema is not None:
            self._update_grad_ema()
        if self.update_due(self.step):
            self.update_topology()

    @torch.no_grad()
    def _update_grad_ema(self) -> None:
        emas, grads = [], []
        for name, p in self._params.items():
            if p.grad is not None:
                emas.append(local(self._grad_ema[name]))
                grads.append(local(p.grad).to(torch.float32))
        if emas:
            torch._foreach_lerp_(emas, grads, 1.0 - float(self.method.grad_ema_beta))

    # ------------------------------------------------------------ topology
    def update_due(self, step: int) -> bool:
        """Whether a topology update runs after optimizer step ``step``: every ``update_interval`` steps,
        never at or after ``total_steps`` (the last weights stay trained) and not after ``stop_step``."""
        cfg = self.config
        rule_end = None if self.structure is None else self.structure.last_update_step(cfg.total_steps)
        return (
            self.method.dynamic
            and step % cfg.update_interval == 0
            and (cfg.total_steps is None or step < cfg.total_steps)
            and (cfg.stop_step is None or step <= cfg.stop_step)
            and (rule_end is None or step <= rule_end)
        )

    @torch.no_grad()
    def update_topology(self) -> dict[str, Any]:
        """Drop and regrow weights in every sparse layer now (normally called by the step hook).

        Returns the stats also stored in ``last_update``. When any gradient is not finite (AMP
        overflow), the update is skipped and the stats say so.
        """
        if not self.method.dynamic:
            raise RuntimeError(f"method {self.method.name!r} has a static mask: no topology update")
        self._follow_devices()
        grads = [p.grad for p in self._params.values() if p.grad is not None]
        if not all_finite(grads):
            _logger.warning("step %d: gradients are not finite; topology update skipped", self.step)
            self.last_update = {"step": self.step, "skipped": "non-finite gradients"}
            self._notify_update()
            return self.last_update
        rate = self._schedule(self.step)
        dropped: dict[str, int] = {}
        grown: dict[str, int] = {}
        changed: dict[str, torch.Tensor] = {}
        no_grad = self._layers_without_needed_grad()
        for name, p in self._params.items():
            if name in no_grad:
                continue
            # one layer at a time on full tensors (sharded: gathered here, identical on every rank)
            mask = full_tensor(self.masks[name])
            weight, grad, union = full_tensor(p), full_tensor(p.grad), full_tensor(self._ever_active[name])
            grad_ema = full_tensor(self._grad_ema_of(name))
            view_of = functools.partial(self._layer_view, name, weight, grad, union, grad_ema)
            plan = None
            if self.structure is not None:
                plan = self.structure.layer_plan(view_of(mask), rate, int(mask.sum()))
            result = next_layer_mask(
                mask,
                rate,
                functools.partial(_score, self.method.drop_score, view_of),
                functools.partial(_score, self.method.grow_score, view_of),
                plan,
            )
            if result is None:
                continue
            new_mask, dropped[name], grown[name] = result
            changed[name] = (mask & ~new_mask).sum()
            mask.copy_(new_mask)
            broadcast_masks([mask])  # rank 0's decision, layer by layer
            self._store(name, mask)
        self.apply_masks()
        moved = {name: int(v) for name, v in changed.items()}
        self.last_update = {
            "step": self.step,
            "prune_rate": rate,
            "dropped": sum(dropped.values()),
            "grown": sum(grown.values()),
            "replaced": sum(moved.values()),
            "itop_rate": self.itop_rate,
            "density": self.density,
            "layers": {
                name: {"dropped": dropped[name], "grown": grown[name], "replaced": moved[name]}
                for name in dropped
            },
        }
        if self.structure is not None:
            self.last_update["structure"] = self.structure.stats()
        if no_grad:
            self.last_update["no_grad_layers"] = no_grad
        _logger.debug(
            "topology update at step %d: %s",
            self.step,
            {k: v for k, v in self.last_update.items() if k != "layers"},
        )
        self._notify_update()
        return self.last_update

    def _layer_view(
        self,
        name: str,
        weight: torch.Tensor,
        grad: torch.Tensor | None,
        union: torch.Tensor,
        grad_ema: torch.Tensor | None,
        mask: torch.Tensor,
    ) -> LayerView:
        return LayerView(name, weight, grad, mask, union, grad_ema, self._generator)

    def register_update_hook(self, hook: UpdateHook) -> RemovableHandle:
        """Call ``hook(sparsifier, stats)`` after every topology update, skipped ones included (their
        stats hold ``"skipped"``); ``stats`` is :attr:`last_update`. Returns a handle whose ``remove()``
        unsubscribes. Hooks run on every rank, in registration order, inside ``optimizer.step()``."""
        handle = RemovableHandle(self._update_hooks)
        self._update_hooks[handle.id] = hook
        return handle

    def _notify_update(self) -> None:
        for hook in list(self._update_hooks.values()):
            hook(self, self.last_update)

    def _store(self, name: str, full_mask: torch.Tensor) -> None:
        """Write a layer's new full mask into its (possibly sharded) mask and add it to the union."""
        mask = self.masks[name]
        if full_mask is not mask:
            local(mask).copy_(local(shard_like(full_mask, mask)))
        local(self._ever_active[name]).logical_or_(local(mask))

    def _layers_without_needed_grad(self) -> list[str]:
        """Sparse layers left unchanged by this update: the method grows by gradient and they have none."""
        if not self.method.needs_grad:
            return []
        names = [name for name, p in self._params.items() if p.grad is None]
        if names:
            _logger.warning(
                "step %d: %d sparse layer(s) have no gradient (first: %s); method %r grows by gradient, "
                "so they keep their mask in this topology update",
                self.step,
                len(names),
                names[:3],
                self.method.name,
            )
        return names

    def _grad_ema_of(self, name: str) -> torch.Tensor | None:
        return None if self._grad_ema is None else self._grad_ema[name]

    # -------------------------------------------------------------- stats
    @property
    def num_sparse_weights(self) -> int:
        """N: number of weights in all sparse tensors."""
        return sum(m.numel() for m in self.masks.values())

    def _count(self, masks: Iterable[torch.Tensor]) -> int:
        return sum(global_counts(list(masks)))

    @property
    def density(self) -> float:
        """Realised overall density: active weights / N (host sync)."""
        return self._count(self.masks.values()) / self.num_sparse_weights

    @property
    def itop_rate(self) -> float:
        """R_s: weights ever active during training / N (host sync)."""
        return self._count(self._ever_active.values()) / self.num_sparse_weights

    @property
    def ever_active(self) -> dict[str, torch.Tensor]:
        """Union masks of every weight that was ever active (read-only view)."""
        return dict(self._ever_active)

    def layer_densities(self) -> dict[str, float]:
        """Realised density of every sparse tensor."""
        return _densities(self.masks)

    def layer_itop_rates(self) -> dict[str, float]:
        """R_s of every sparse tensor."""
        return _densities(self._ever_active)

    # ---------------------------------------------------------- lifecycle
    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Optimizer steps taken inside are not training steps: not counted, no masks, no update.

        Needed around ``torch.distributed.checkpoint.state_dict``'s optimizer calls (Accelerate's FSDP
        ``save_state`` / ``load_state``): with no optimizer state yet they call ``optimizer.step()``
        once with zero gradients and learning rate 0 to create it.
        """
        self._paused = True
        try:
            yield
        finally:
            self._paused = False
            self._applied = None  # weights may have moved unmasked: the next step masks them again

    def remove(self) -> None:
        """Detach the optimizer hooks (the masks stay as they are)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        _mark_owner(self.optimizer, None)

    def embed_in_optimizer_state(self) -> None:
        """Also carry this sparsifier's state inside ``optimizer.state_dict()`` under ``"itop_timm"``
        (restored by ``optimizer.load_state_dict``), so loops that checkpoint only the optimizer — like
        timm's ``train.py`` — resume masks, union and RNG too."""

        def add_state(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> dict[str, Any]:
            state["itop_timm"] = self.state_dict()
            return state

        def take_state(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> dict[str, Any]:
            state = dict(state)
            embedded = state.pop("itop_timm", None)
            if embedded is not None:
                self.load_state_dict(embedded)
            return state

        self._handles.append(self.optimizer.register_state_dict_post_hook(add_state))
        self._handles.append(self.optimizer.register_load_state_dict_pre_hook(take_state))

    # ------------------------------------------------------- state dict
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue bit-for-bit: masks, union, step, RNG state, gradient EMA.

        Holds only tensors, numbers, strings, lists and dicts (loadable with ``weights_only=True``).
        Tensors are full and on the CPU; for a sharded model every rank must call this (it gathers).
        """
        state: dict[str, Any] = {
            "format": STATE_FORMAT,
            "config": self.config.to_dict(),
            "step": self.step,
            "masks": {name: _full_cpu(m) for name, m in self.masks.items()},
            "ever_active": {name: _full_cpu(m) for name, m in self._ever_active.items()},
            "generator_state": self._generator.get_state(),
        }
        if self._grad_ema is not None:
            state["grad_ema"] = {name: _full_cpu(t) for name, t in self._grad_ema.items()}
        if self.structure is not None:
            state["structure"] = self.structure.state_dict()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output (full tensors, sharded here like the parameters);
        validates everything before changing anything."""
        if not isinstance(state, Mapping) or state.get("format") != STATE_FORMAT:
            raise ValueError(f"not an itop_timm sparsifier state (expected format {STATE_FORMAT!r})")
        shapes = {name: tuple(p.shape) for name, p in self._params.items()}
        masks = validate_masks(state["masks"], shapes, what="masks")
        union = validate_masks(state["ever_active"], shapes, what="ever_active")
        uncovered = [name for name in shapes if bool((masks[name] & ~union[name]).any())]
        if uncovered:
            raise ValueError(f"ever_active must contain the masks; not so for {uncovered[:3]}")
        step = state["step"]
        if not _is_int(step) or step < 0:
            raise ValueError(f"invalid step {step!r} in sparsifier state")
        rng = state["generator_state"]
        if not isinstance(rng, torch.Tensor) or rng.dtype != torch.uint8:
            raise ValueError("invalid generator_state in sparsifier state")
        ema = state.get("grad_ema")
        if self._grad_ema is not None:
            if (
                ema is None
                or set(ema) != set(shapes)
                or any(tuple(ema[n].shape) != shapes[n] for n in shapes)
            ):
                raise ValueError(
                    f"method {self.method.name!r} needs grad_ema for every sparse tensor in the state"
                )
        if self.structure is not None and not isinstance(state.get("structure"), Mapping):
            raise ValueError(f"method {self.method.name!r} needs its structure state in the sparsifier state")
        saved_config = state.get("config", {})
        differing = sorted(
            k for k, v in self.config.to_dict().items() if k in saved_config and saved_config[k] != v
        )
        if differing:
            _logger.warning("loading sparsifier state saved with different settings: %s", differing)
        # -- validated (the rule validates its own state before changing it): apply --
        if self.structure is not None:
            self.structure.load_state_dict(state["structure"])
        for name, p in self._params.items():
            self.masks[name] = shard_like(masks[name], p)
            self._ever_active[name] = shard_like(union[name], p)
            if self._grad_ema is not None:
                self._grad_ema[name] = shard_like(ema[name].to(torch.float32), p)
        self.step = step
        self._generator.set_state(rng)
        self.apply_masks()

    def __repr__(self) -> str:
        return (
            f"Sparsifier(method={self.method.name!r}, tensors={len(self.masks)}, density={self.density:.4f}, "
            f"itop_rate={self.itop_rate:.4f}, step={self.step})"
        )


def _full_cpu(t: torch.Tensor) -> torch.Tensor:
    """A whole CPU copy of ``t`` (gathered if sharded)."""
    return full_tensor(t.detach()).cpu().clone()


def _densities(masks: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Fraction of ``True`` values of every (full) mask."""
    counts = global_counts(list(masks.values()))
    return {name: c / m.numel() for (name, m), c in zip(masks.items(), counts, strict=True)}


_OWNER_ATTR = "_itop_timm_sparsifier"


def _mark_owner(optimizer: torch.optim.Optimizer, sparsifier: Sparsifier | None) -> None:
    """Record (weakly: no reference cycle, not pickled by ``Optimizer.__getstate__``) which sparsifier
    hooks ``optimizer``; ``None`` clears the record. The optimizer's id is kept too, so a
    ``copy.deepcopy`` of it does not count as sparsified."""
    record = None if sparsifier is None else (weakref.ref(sparsifier), id(optimizer))
    setattr(optimizer, _OWNER_ATTR, record)


def _refuse_second_sparsifier(optimizer: torch.optim.Optimizer) -> None:
    """A second :func:`sparsify` on an optimizer that already has a hooked sparsifier would stack a
    second mask hook (the densities multiply); refuse it before anything changes."""
    record = getattr(optimizer, _OWNER_ATTR, None)
    owner = record[0]() if record is not None and record[1] == id(optimizer) else None
    if owner is not None and owner._handles:
        raise ValueError(
            f"this optimizer is already sparsified ({owner!r}); a second sparsify would stack another "
            "mask hook: keep using the first Sparsifier, or call its .remove() first"
        )


def _score(
    fn: Callable[[LayerView], torch.Tensor], view_of: Callable[[torch.Tensor], LayerView], mask: torch.Tensor
) -> torch.Tensor:
    """A method's score function applied to a layer seen with ``mask``."""
    return fn(view_of(mask))


def _zero_off_mask(groups: list[tuple[torch.Tensor, list[torch.Tensor]]]) -> None:
    """In place, for each (bool mask, tensors): every tensor becomes ``where(mask, tensor, 0)``."""
    for mask, tensors in groups:
        for t in tensors:
            t.copy_(torch.where(mask, t, 0.0))


@functools.cache
def _compiled_zero_off_mask() -> Any:
    return torch.compile(_zero_off_mask, dynamic=False)


def sparsify(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    method: str | MethodInfo = "rigl",
    density: float = 0.1,
    distribution: str | None = None,
    update_interval: int | None = None,
    prune_rate: float | None = None,
    prune_schedule: str | None = None,
    total_steps: int | None = None,
    stop_step: int | None = None,
    seed: int = 0,
    *,
    final_prune_rate: float | None = None,
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
    masks: Mapping[str, torch.Tensor] | None = None,
    compile_hook: bool = False,
    method_options: Mapping[str, Any] | None = None,
) -> Sparsifier:
    """Train ``model`` sparse: draw masks, zero inactive weights and hook ``optimizer.step``.

    Args:
        model: any ``nn.Module`` (a timm model, possibly wrapped by DDP / ``torch.compile``).
        optimizer: the optimizer over ``model``'s parameters (torch, timm or Accelerate-wrapped).
        method: registered method name (``list_methods()``): ``static``, ``set``, ``rigl``, ``snfs``, ``unfired``,
            ``chase``, ``srigl``.
        density: overall fraction of sparse weights kept, in (0, 1].
        distribution: layer densities: ``erk`` (default), ``er`` or ``uniform`` (``list_distributions()``).
        update_interval: ΔT, optimizer steps between topology updates (default 100).
        prune_rate: initial fraction p0 of each layer's active weights replaced per update (default 0.5).
        prune_schedule: ``cosine`` (default), ``linear`` or ``constant`` decay of the prune rate.
        total_steps: T, total optimizer steps of training (needed by decaying schedules).
        stop_step: last step at which a topology update may happen (``None``: until the end; RigL used 0.75 T).
        seed: seed of the generator behind the initial masks and every random choice.
        final_prune_rate: the schedule's end value (default 0.005).
        include, exclude: fnmatch patterns overriding which tensors are sparse
            (see :func:`itop_timm.densities.sparse_parameter_shapes`).
        masks: start from these masks (``{name: bool tensor}``, e.g. from ``load_sparse``) instead of
            random ones; their densities are kept.
        compile_hook: re-mask through a ``torch.compile``-d kernel per layer that reads each bool mask
            once for the weight and all its optimizer state (the cheapest hook on the CPU; costs one
            compilation of tens of seconds at the start, so it pays off on long runs). Off: one
            ``torch._foreach_mul_`` with masks cached in the tensors' dtype.
        method_options: the method's own settings (``chase``: ``channel_sparsity``, ...; ``srigl``:
            ``gamma_sal``, ...); ``itop-timm methods`` lists each method's options and defaults.

    Every argument is validated before the model or optimizer is touched; bad values raise ``ValueError``
    naming the value and what is allowed. Arguments left ``None`` take the method's defaults, then
    :data:`SPARSIFY_DEFAULTS`.
    """
    config = SparsityConfig.resolve(
        method,
        density=density,
        distribution=distribution,
        update_interval=update_interval,
        prune_rate=prune_rate,
        final_prune_rate=final_prune_rate,
        prune_schedule=prune_schedule,
        total_steps=total_steps,
        stop_step=stop_step,
        seed=seed,
        include=include,
        exclude=exclude,
        method_options=method_options,
    )
    return Sparsifier(model, optimizer, config, masks=masks, compile_hook=compile_hook)
