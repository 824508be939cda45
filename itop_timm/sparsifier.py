"""The Sparsifier: masks on a model's sparse tensors, kept applied and moved by the optimizer's step.

The training loop stays the user's (``loss.backward(); optimizer.step()``). :func:`~itop_timm.sparsify`
builds a :class:`Sparsifier`, whose optimizer step hooks, at every real optimizer step (steps that AMP's
``GradScaler`` or Accelerate's gradient accumulation skip never reach them):

1. keep inactive weights and their optimizer state exactly 0 (:mod:`itop_timm.masking`: gradients
   masked before an elementwise optimizer's step, or weights and state re-masked after it);
2. let the method's structure rule take weights away on its own schedule (:meth:`Sparsifier.restrict`);
3. every ``update_interval`` steps drop and regrow weights by the method's scores
   (:mod:`itop_timm.updater`), density preserved; the union of ever-active weights gives R_s.

All randomness comes from one seeded CPU ``torch.Generator``; in a process group rank 0's masks are
broadcast after initialisation and after every change, so every rank holds identical masks. Sharded
models (FSDP2): masks are DTensors sharded like their parameters (:mod:`itop_timm.mask_state`); the step
hook works on local shards only, the updates on one layer's full tensors at a time.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from .config import SparsityConfig
from .cuts import Cuts, cut_shape, shrink_optimizer_state
from .densities import active_counts, compute_layer_densities, sparse_parameter_shapes
from .distributed import check_supported_wrapping
from .kernels.compute import SparseCompute
from .mask_state import MaskState, random_mask
from .masking import GRADIENT_MASKED_OPTIMIZERS, MaskApplier
from .masks import validate_masks
from .methods import MethodInfo, get_method
from .optimizer_link import check_can_hook, embed_state, mark_owner
from .schedules import create_schedule
from .structure import RuleContext
from .unwrap import unwrap_model, unwrap_optimizer
from .updater import TopologyUpdater
from .validation import Range

__all__ = ["Sparsifier", "STATE_FORMAT", "UpdateHook"]

_logger = logging.getLogger(__name__)

STATE_FORMAT = "itop_timm.sparsifier.v1"

#: ``hook(sparsifier, stats)`` called after every mask change: a topology update (its stats are
#: ``last_update``) or a restriction (``stats["event"] == "restrict"``); see
#: :meth:`Sparsifier.register_update_hook`.
UpdateHook = Callable[["Sparsifier", dict[str, Any]], None]


class Sparsifier:
    """Owns the masks of a model's sparse tensors and keeps them applied during training.

    Create it with :func:`sparsify`. Public state:

    * ``masks`` — ``{parameter name: bool tensor}`` (names as in ``model.named_parameters()``);
    * ``itop_rate`` — R_s, fraction of sparse weights ever active; ``density`` — realised density;
    * ``layer_densities()`` — realised per-layer densities; ``target_densities`` — planned ones;
    * ``step`` — real optimizer steps seen; ``last_update`` — stats of the latest topology update;
    * ``restrict(allowed)`` — take weights away outside given positions (what structure rules use);
    * ``state_dict()`` / ``load_state_dict()`` — masks, union, step, RNG (exact resume); with Accelerate,
      ``itop_timm.training.checkpointing.register_state_hooks`` saves it as safetensors + JSON.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        config: SparsityConfig,
        masks: Mapping[str, torch.Tensor] | None = None,
        compile_hook: bool = False,
        defer_shrink: bool = False,
    ) -> None:
        check_supported_wrapping(model, optimizer)
        self.model = unwrap_model(model)
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
        check_can_hook(self.optimizer, self._params)

        if masks is not None:
            given = {n: m.to("cpu").clone() for n, m in validate_masks(masks, shapes).items()}
            counts = {name: int(m.sum()) for name, m in given.items()}
            self.target_densities = {name: counts[name] / m.numel() for name, m in given.items()}
            # the given masks define the density (the `density` argument is not used)
            realised = sum(counts.values()) / sum(m.numel() for m in given.values())
            self.config = config = config.replace(density=realised)
        else:
            self.target_densities = compute_layer_densities(shapes, config.density, config.distribution)
            counts = active_counts(shapes, self.target_densities)
        rule = config.structure_rule()
        self.structure = None if rule is None else copy.copy(rule)  # this run's copy of the config's rule
        shrinks = rule is not None and rule.shrinks
        if shrinks and not defer_shrink and isinstance(model, nn.parallel.DistributedDataParallel):
            raise ValueError(
                "method_options shrink with a DistributedDataParallel model: DDP's reducer holds the "
                "parameters, which a shrink slices; pass defer_shrink=True and call shrink() between "
                "steps with the DDP wrapper taken off (then wrap the model again), or leave shrink off"
            )
        self._defer_shrink = defer_shrink
        self._shrink_pending = False
        if self.structure is not None:  # may refuse the architecture, naming the layer
            self.structure.bind(
                RuleContext(
                    self.model,
                    shapes,
                    counts,
                    config.total_steps,
                    config.update_interval,
                    config.distribution,
                    config.stop_step,
                )
            )
        self._generator = torch.Generator().manual_seed(config.seed)
        initial = (
            given if masks is not None else {n: self._initial_mask(n, shapes[n], counts[n]) for n in shapes}
        )
        self._updater = (
            TopologyUpdater(
                self.method,
                self.structure,
                create_schedule(
                    config.prune_schedule, config.prune_rate, config.final_prune_rate, config.total_steps
                ),
                self._generator,
            )
            if self.method.dynamic
            else None
        )
        self._dense_gradients: tuple[int, bool] | None = None  # (step, whether the next step needs them)
        self._compute = self._sparse_compute(config.compute)  # validates the layers, builds the kernels
        # -- validation done: from here on the model and optimizer are modified --
        self._state = MaskState(self._params, initial, grad_ema=self.method.grad_ema_beta is not None)
        self.masks: dict[str, torch.Tensor] = self._state.masks  # the same dict, updated in place
        self.step = 0
        self.last_update: dict[str, Any] | None = None
        self._update_hooks: OrderedDict[int, UpdateHook] = OrderedDict()  # weak-referenceable for handles
        self._paused = False
        self._masking = MaskApplier(self._params, self.optimizer, compiled=compile_hook)
        # gradients are masked instead of weights and state while the masks are those last applied
        self._masks_gradients = (
            type(self.optimizer) in GRADIENT_MASKED_OPTIMIZERS and self._state.grad_ema is None
        )
        self._grads_masked = False
        self.apply_masks()
        self._handles = [
            self.optimizer.register_step_pre_hook(self._before_optimizer_step),
            self.optimizer.register_step_post_hook(self._after_optimizer_step),
        ]
        mark_owner(self.optimizer, self)
        if self._compute is not None:
            self._compute.install(self.masks)
        _logger.info(
            "sparsify: method=%s density=%.4f (%s) over %d tensors, %d of %d weights active",
            self.method.name,
            self.density,
            config.distribution,
            len(self.masks),
            sum(counts.values()),
            self.num_sparse_weights,
        )

    @property
    def hooked(self) -> bool:
        """Whether the optimizer hooks are attached (until :meth:`remove`)."""
        return bool(self._handles)

    @property
    def compute_plan(self) -> dict[str, Any] | None:
        """With ``compute="sparse" | "auto"``: the mode, the per-layer ``plan`` (``"sparse"``: the CPU
        kernels compute it; ``"dense"``: ``auto`` timed it slower; absent: not timed yet) and the layers
        the kernels cannot compute (``unsupported``, with the reason). None with masked compute."""
        return None if self._compute is None else self._compute.describe()

    @property
    def compile_hook(self) -> bool:
        """Whether re-masking runs as a ``torch.compile``-d kernel per layer."""
        return self._masking.compiled

    def _sparse_compute(self, mode: str) -> SparseCompute | None:
        """The sparse-kernel compute of ``compute="sparse" | "auto"`` (not yet installed), or ``None``."""
        if mode == "masked":
            return None
        if self.method.grad_ema_beta is not None:
            if mode == "sparse":
                raise ValueError(
                    f"compute='sparse' with method {self.method.name!r}: the method reads dense gradients "
                    f"at every step (its gradient EMA), so every step would compute densely; use "
                    f"compute='masked'"
                )
            _logger.info(
                "compute='auto': method %r reads dense gradients every step: masked", self.method.name
            )
            return None
        return SparseCompute(self.model, list(self._params), mode, self._needs_dense_gradients)

    def _needs_dense_gradients(self) -> bool:
        """Whether the coming step's topology update reads dense gradients (then computed densely);
        asked by every sparse layer's forward, so worked out once per step."""
        cached = self._dense_gradients
        if cached is None or cached[0] != self.step:
            cached = self._dense_gradients = (
                self.step,
                self.method.needs_grad and self.update_due(self.step + 1),
            )
        return cached[1]

    def _initial_mask(self, name: str, shape: tuple[int, ...], count: int) -> torch.Tensor:
        """``count`` active weights: placed by the structure rule if it wants to, else uniformly at random."""
        mask = (
            None
            if self.structure is None
            else self.structure.initial_mask(name, shape, count, self._generator)
        )
        return random_mask(shape, count, self._generator) if mask is None else mask

    def apply_masks(self) -> None:
        """Zero inactive weights and the optimizer state (tensors shaped like the weight) at those positions.

        One ``torch._foreach_mul_`` over every such tensor with the cached masks in the tensor's dtype
        (or the compiled kernel, see :mod:`itop_timm.masking`); sharded parameters mask their local
        shards only. The step hooks call it whenever needed; call it yourself after writing into the
        weights outside the optimizer.
        """
        self._state.follow_devices()
        self._masking.apply(self.masks)

    def _before_optimizer_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        """Zero the gradients' inactive positions when that alone keeps inactive weights and state at 0:
        an elementwise optimizer, masks unchanged since weights and state were last masked, and no
        topology update after this step (it reads the dense gradients)."""
        self._grads_masked = False
        if self._paused or not self._masks_gradients:
            return
        self._state.follow_devices()  # e.g. moved by accelerator.prepare: new masks, so re-masked after this step
        if self.update_due(self.step + 1) or not self._masking.unchanged(self.masks):
            return
        self._masking.mask_gradients(self.masks)
        self._grads_masked = True

    def _after_optimizer_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self._paused:
            return
        self.step += 1
        if not self._grads_masked:  # (set by the pre-hook of this very step)
            self.apply_masks()
        if self.structure is not None:
            allowed = self.structure.after_step(self.step, self._params)
            if allowed:
                self.restrict(allowed)
                self._shrink_pending = self.structure.shrinks
                if not self._defer_shrink:
                    self.shrink()
        if self._state.grad_ema is not None:
            self._state.update_grad_ema(self.method.grad_ema_beta)
        if self.update_due(self.step):
            self.update_topology()

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

    def update_topology(self) -> dict[str, Any]:
        """Drop and regrow weights in every sparse layer now (normally called by the step hook).

        Returns the stats also stored in ``last_update``. When any gradient is not finite (AMP
        overflow), the update is skipped and the stats say so.
        """
        if self._updater is None:
            raise RuntimeError(f"method {self.method.name!r} has a static mask: no topology update")
        self._state.follow_devices()
        stats = self._updater(self.step, self._params, self._state)
        if "skipped" not in stats:
            self._masks_changed(stats)
            _logger.debug(
                "topology update at step %d: %s", self.step, {k: v for k, v in stats.items() if k != "layers"}
            )
        self.last_update = stats
        self._notify_update(stats)
        return stats

    @torch.no_grad()
    def restrict(self, allowed: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        """Deactivate every active weight outside ``allowed`` (``{name: bool tensor broadcastable to the
        weight}``), e.g. the rows and columns of channels a structure rule removed.

        Besides the topology update, the one way masks change: validated before anything changes, rank
        0's masks broadcast, weights and optimizer state re-masked, update hooks notified with stats whose
        ``"event"`` is ``"restrict"`` (returned too). Later topology updates may grow there again unless
        the rule's :class:`~itop_timm.topology.LayerPlan` forbids it. Every rank must call it.
        """
        removed = self._state.restrict(allowed)
        layers = {name: {"removed": n} for name, n in removed.items() if n}
        stats = {"step": self.step, "event": "restrict", "removed": sum(removed.values()), "layers": layers}
        self._masks_changed(stats)
        self._notify_update(stats)
        return stats

    @property
    def shrinks(self) -> bool:
        """Whether the method slices the units it removes out of the live model (Chase with ``shrink``)."""
        return self.structure is not None and self.structure.shrinks

    @property
    def shrink_pending(self) -> bool:
        """Whether units the structure rule removed wait to be sliced out by :meth:`shrink` (only ever
        with ``defer_shrink=True``; otherwise the step that removes them slices them out)."""
        return self._shrink_pending

    def shrink(self) -> dict[str, Any] | None:
        """Slice the units the structure rule removed (Chase with ``shrink``) out of the live model, its
        optimizer state and the masks now; returns the ``"shrink"`` stats the update hooks get, or ``None``
        when nothing is left to slice. The optimizer step that removes units calls it, unless the
        sparsifier was made with ``defer_shrink=True``: then call it between steps, at a point where
        nothing else holds the parameters (e.g. with a DDP wrapper taken off). Until then the removed
        units are only masked, which computes the same. Every rank must call it."""
        self._shrink_pending = False
        cuts = None if self.structure is None else self.structure.shrink_cuts()
        return self._shrink(cuts) if cuts else None

    def _shrink_model(self, cuts: Cuts) -> None:
        """Slice ``cuts`` out of the optimizer state (checked first) and the model (the structure rule)."""
        shrink_optimizer_state(self.optimizer, dict(self.model.named_parameters()), cuts)
        self.structure.apply_shrink(cuts)

    @torch.no_grad()
    def _shrink(self, cuts: Cuts) -> dict[str, Any]:
        """After the structure rule removed units for good (their weights restricted away): slice them out
        of the live model, its optimizer state and the masks, and tell the update hooks (``"event"``
        ``"shrink"``, with the ``cuts`` so that owners of other parameter-shaped tensors slice them too)."""
        before = sum(p.numel() for p in self.model.parameters())
        self._shrink_model(cuts)
        self._state.shrink(cuts)
        self.apply_masks()
        stats = {
            "step": self.step,
            "event": "shrink",
            "cuts": cuts,
            "params_before": before,
            "params_after": sum(p.numel() for p in self.model.parameters()),
        }
        _logger.info(
            "shrink at step %d: %d -> %d parameters", self.step, stats["params_before"], stats["params_after"]
        )
        self._notify_update(stats)
        return stats

    def _masks_changed(self, stats: dict[str, Any]) -> None:
        """After masks changed on every rank: re-mask weights and state, count, add the figures to ``stats``."""
        self.apply_masks()
        active, ever_active = self._state.recount()
        stats.update(
            itop_rate=ever_active / self.num_sparse_weights, density=active / self.num_sparse_weights
        )
        if self.structure is not None:
            stats["structure"] = self.structure.stats()

    def register_update_hook(self, hook: UpdateHook) -> RemovableHandle:
        """Call ``hook(sparsifier, stats)`` after every mask change: every topology update, skipped ones
        included (their stats hold ``"skipped"``; the stats are :attr:`last_update`), and every
        :meth:`restrict` (``stats["event"] == "restrict"``). Returns a handle whose ``remove()``
        unsubscribes. Hooks run on every rank, in registration order, inside ``optimizer.step()``."""
        handle = RemovableHandle(self._update_hooks)
        self._update_hooks[handle.id] = hook
        return handle

    def _notify_update(self, stats: dict[str, Any]) -> None:
        for hook in list(self._update_hooks.values()):
            hook(self, stats)

    @property
    def num_sparse_weights(self) -> int:
        """N: number of weights in all sparse tensors."""
        return self._state.num_weights

    @property
    def density(self) -> float:
        """Realised overall density: active weights / N (one host sync; sharded masks: as counted at the
        last mask change, so printing it on one rank never waits for the others)."""
        return self._state.totals()[0] / self.num_sparse_weights

    @property
    def itop_rate(self) -> float:
        """R_s: weights ever active during training / N (counted like :attr:`density`)."""
        return self._state.totals()[1] / self.num_sparse_weights

    @property
    def ever_active(self) -> dict[str, torch.Tensor]:
        """Union masks of every weight that was ever active (read-only view)."""
        return dict(self._state.ever_active)

    def layer_densities(self) -> dict[str, float]:
        """Realised density of every sparse tensor (sharded: a collective, every rank must call it)."""
        return self._state.fractions(self.masks)

    def layer_itop_rates(self) -> dict[str, float]:
        """R_s of every sparse tensor (sharded: a collective, every rank must call it)."""
        return self._state.fractions(self._state.ever_active)

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
            self._masking.forget()  # weights may have moved unmasked: the next step masks them again

    def remove(self) -> None:
        """Detach the optimizer hooks and give sparse-computed layers their own ``forward`` back (the
        masks stay as they are)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if self._compute is not None:
            self._compute.remove()
        mark_owner(self.optimizer, None)

    def embed_in_optimizer_state(self) -> None:
        """Also carry this sparsifier's state inside ``optimizer.state_dict()`` under ``"itop_timm"``
        (restored by ``optimizer.load_state_dict``), so loops that checkpoint only the optimizer — like
        timm's ``train.py`` — resume masks, union and RNG too."""
        self._handles += embed_state(self.optimizer, self.state_dict, self.load_state_dict)

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue bit-for-bit: masks, union, step, RNG state, gradient EMA, the
        structure rule's state. Holds only tensors, numbers, strings, lists and dicts (loadable with
        ``weights_only=True``); tensors are full and on the CPU (sharded: every rank must call this)."""
        state: dict[str, Any] = {
            "format": STATE_FORMAT,
            "config": self.config.to_dict(),
            "step": self.step,
            **self._state.state_dict(),
            "generator_state": self._generator.get_state(),
        }
        if self.structure is not None:
            state["structure"] = self.structure.state_dict()
        if self._compute is not None:
            state["compute_plan"] = self._compute.state_dict()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output (full tensors, sharded here like the parameters);
        validates everything before changing anything."""
        if not isinstance(state, Mapping) or state.get("format") != STATE_FORMAT:
            raise ValueError(f"not an itop_timm sparsifier state (expected format {STATE_FORMAT!r})")
        if self.structure is not None and not isinstance(state.get("structure"), Mapping):
            raise ValueError(f"method {self.method.name!r} needs its structure state in the sparsifier state")
        # a state saved after a live shrink: the model is first brought to the shapes it had then
        cuts = None if self.structure is None else self.structure.shrink_cuts(state["structure"])
        shapes = {name: cut_shape(p.shape, (cuts or {}).get(name, [])) for name, p in self._params.items()}
        checked = self._state.check_state(state, self.method.name, shapes)
        step = Range(int, 0).check("sparsifier state: step", state.get("step"))
        rng = state.get("generator_state")
        if not isinstance(rng, torch.Tensor) or rng.dtype != torch.uint8:
            raise ValueError("invalid generator_state in sparsifier state")
        plan = SparseCompute.check_plan(state.get("compute_plan", {}))
        saved_config = state.get("config", {})
        differing = sorted(
            k for k, v in self.config.to_dict().items() if k in saved_config and saved_config[k] != v
        )
        if differing:
            _logger.warning("loading sparsifier state saved with different settings: %s", differing)
        # -- validated (the rule validates its own state, the optimizer state is checked before it is
        # sliced): apply --
        if cuts:
            self._shrink_model(cuts)
        if self.structure is not None:
            self.structure.load_state_dict(state["structure"])
        self._state.load(checked)
        self.step = step
        self._generator.set_state(rng)
        if self._compute is not None:
            self._compute.load_state_dict(plan)
        self.apply_masks()

    def __repr__(self) -> str:
        return (
            f"Sparsifier(method={self.method.name!r}, tensors={len(self.masks)}, density={self.density:.4f}, "
            f"itop_rate={self.itop_rate:.4f}, step={self.step})"
        )
