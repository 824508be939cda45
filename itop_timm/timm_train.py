"""Run timm's own ``train.py``, unmodified, with itop_timm's sparse optimizers registered.

timm's ``train.py`` builds its optimizer with ``create_optimizer_v2(model, **optimizer_kwargs(args),
**args.opt_kwargs)``, but nothing in it imports itop_timm, so ``--opt rigl_sgd`` would reach timm's
plain SGD with ``density=...`` and fail. This runner imports itop_timm (which registers
``<method>_<optimizer>`` with timm's optimizer registry) and the installed plugins, then runs the
script as ``python train.py ...`` would::

    python -m itop_timm.timm_train path/to/train.py /data/imagenet --model resnet50 \\
        --opt rigl_sgd --opt-kwargs density=0.1 update_interval=100
    itop-timm timm-train path/to/train.py ...                          # the same
    torchrun --nproc_per_node 8 -m itop_timm.timm_train path/to/train.py ...
    accelerate launch -m itop_timm.timm_train path/to/train.py ...

Sparse settings go in ``--opt-kwargs``. For the run it starts, the runner also (through timm's own
functions, looked up by the script when it calls them; the file is not changed):

* derives ``total_steps`` when ``--opt-kwargs`` does not give it: timm's own count of optimizer
  updates, the scheduled epochs of ``create_scheduler_v2`` (warm-up prefix and cool-down included) x
  ``ceil(len(training loader) / --grad-accum-steps)`` (the training loader is built before the optimizer);
* adds the sparsity figures to timm's console (rank 0): ``Density`` and ``R_s`` on each ``Train:``
  line, a line per topology update and per epoch, and ``train_density`` / ``train_itop_rate``
  columns in ``summary.csv``;
* writes the Hub-ready safetensors sparse folder ``<output dir>/sparse`` (weights, masks, union,
  settings; :func:`itop_timm.save_sparse`, atomic) each time timm writes an epoch's ``summary.csv``
  row, right before timm saves that epoch's checkpoint. ``load_sparse``, ``itop-timm info / export /
  push`` take it; timm's ``.pth.tar`` files are pickles, which itop_timm never loads.

The sparsifier's state rides inside ``optimizer.state_dict()``, so timm's checkpoints and ``--resume``
carry masks, R_s and RNG.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import logging
import runpy
import sys
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["main", "build_parser", "TimmTrainHooks", "derive_total_steps", "SPARSE_FOLDER"]

_logger = logging.getLogger(__name__)

#: The safetensors sparse folder written into timm's output directory.
SPARSE_FOLDER = "sparse"

#: timm's logger of its ``Train:`` lines (``logging.getLogger('train')`` in train.py).
TIMM_TRAIN_LOGGER = "train"

#: train.py arguments left out of the recorded training config: local paths and tracker settings.
_LOCAL_ARGS = frozenset(
    {"data_dir", "data", "output", "resume", "initial_checkpoint", "class_map", "config", "experiment"}
)


def build_parser(prog: str = "python -m itop_timm.timm_train") -> argparse.ArgumentParser:
    """The runner's own arguments: the script, then everything for the script, passed on unchanged."""
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "script", help="path of timm's train.py (or a script that builds its optimizer like it)"
    )
    parser.add_argument("script_args", nargs=argparse.REMAINDER, help="the script's own arguments")
    return parser


def derive_total_steps(args: Any, train_batches: int) -> int:
    """timm train.py's number of optimizer updates (its ``num_updates_total``): the epochs
    ``create_scheduler_v2`` schedules for ``args`` (with the warm-up prefix and the cool-down) x the
    updates per epoch, ``ceil(train_batches / args.grad_accum_steps)``."""
    import torch
    from timm.scheduler import create_scheduler_v2, scheduler_kwargs

    accumulation = int(getattr(args, "grad_accum_steps", 1) or 1)
    updates_per_epoch = (train_batches + accumulation - 1) // accumulation
    probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)  # only for the epoch count
    _, epochs = create_scheduler_v2(probe, **scheduler_kwargs(args), updates_per_epoch=updates_per_epoch)
    return int(epochs) * updates_per_epoch


def _is_primary() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _recorded_args(args: Any) -> dict[str, Any]:
    """The script's arguments as JSON, without local paths (what the sparse folder records)."""
    recorded = {}
    for key, value in sorted(vars(args).items()):
        if key in _LOCAL_ARGS or key.startswith("wandb"):
            continue
        try:
            recorded[key] = json.loads(json.dumps(value))
        except (TypeError, ValueError):
            continue
    return recorded


class _SparsityOnTrainLines(logging.Filter):
    """Appends ``Density`` and ``R_s`` to timm's ``Train:`` log lines (logger ``train``)."""

    def __init__(self, sparsifier: Any) -> None:
        super().__init__()
        self.sparsifier = sparsifier

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str) and record.msg.startswith("Train:"):
            sp = self.sparsifier
            record.msg = f"{record.msg}  Density: {sp.density:.4f}  R_s: {sp.itop_rate:.4f}"
        return True


class TimmTrainHooks:
    """What the runner adds to one run of timm's train.py, without changing the file: wrappers of the
    timm functions the script calls (``timm.data.create_loader``, ``timm.optim.optimizer_kwargs`` and
    ``create_optimizer_v2``, ``timm.utils.update_summary``), put in place by :meth:`installed` and put
    back when it exits. See the module docstring for what they do."""

    def __init__(self) -> None:
        self.train_batches: int | None = None
        self.args: Any = None
        self.sparsifier: Any = None
        self.updates = 0
        self._detach: list[Callable[[], None]] = []
        self._resolved_data_config: tuple[dict[str, Any] | None] | None = None

    @contextlib.contextmanager
    def installed(self) -> Iterator[TimmTrainHooks]:
        import timm.data
        import timm.optim
        import timm.utils

        with contextlib.ExitStack() as stack:
            self._wrap(stack, timm.data, "create_loader", self._create_loader)
            if hasattr(timm.data, "create_naflex_loader"):
                self._wrap(stack, timm.data, "create_naflex_loader", self._create_loader)
            self._wrap(stack, timm.optim, "optimizer_kwargs", self._optimizer_kwargs)
            self._wrap(stack, timm.optim, "create_optimizer_v2", self._create_optimizer)
            self._wrap(stack, timm.utils, "update_summary", self._update_summary)
            stack.callback(self._detach_sparsifier)
            yield self

    @staticmethod
    def _wrap(stack: contextlib.ExitStack, module: Any, name: str, wrapper: Callable[..., Any]) -> None:
        original = getattr(module, name)
        signature = inspect.signature(original)

        def call(*args: Any, **kwargs: Any) -> Any:
            return wrapper(original, signature.bind(*args, **kwargs))

        call.__wrapped__ = original  # type: ignore[attr-defined]
        setattr(module, name, call)
        stack.callback(setattr, module, name, original)

    # -- total_steps ---------------------------------------------------------------------------
    def _create_loader(self, original: Callable[..., Any], bound: inspect.BoundArguments) -> Any:
        loader = original(*bound.args, **bound.kwargs)
        if bound.arguments.get("is_training", False):
            self.train_batches = len(loader)
        return loader

    def _optimizer_kwargs(self, original: Callable[..., Any], bound: inspect.BoundArguments) -> Any:
        from .timm_optimizers import parse_sparse_optimizer_name

        kwargs = original(*bound.args, **bound.kwargs)
        args = self.args = next(iter(bound.arguments.values()))
        given = dict(getattr(args, "opt_kwargs", None) or {})
        if parse_sparse_optimizer_name(kwargs.get("opt")) is None or "total_steps" in given:
            return kwargs
        if self.train_batches is None:
            _logger.warning(
                "total_steps not given in --opt-kwargs, and not derived: the script built no training "
                "loader with timm.data.create_loader before its optimizer"
            )
            return kwargs
        kwargs["total_steps"] = derive_total_steps(args, self.train_batches)
        if _is_primary():
            _logger.info(
                "total_steps=%d (timm's scheduled epochs x optimizer updates per epoch; "
                "--opt-kwargs total_steps=N sets it)",
                kwargs["total_steps"],
            )
        return kwargs

    # -- the console ---------------------------------------------------------------------------
    def _create_optimizer(self, original: Callable[..., Any], bound: inspect.BoundArguments) -> Any:
        optimizer = original(*bound.args, **bound.kwargs)
        sparsifier = getattr(optimizer, "sparsifier", None)
        if sparsifier is not None:
            self._detach_sparsifier()
            self.sparsifier, self.updates = sparsifier, 0
            handle = sparsifier.register_update_hook(self._on_update)
            line_filter = _SparsityOnTrainLines(sparsifier)
            timm_logger = logging.getLogger(TIMM_TRAIN_LOGGER)
            timm_logger.addFilter(line_filter)
            self._detach = [handle.remove, lambda: timm_logger.removeFilter(line_filter)]
        return optimizer

    def _detach_sparsifier(self) -> None:
        for detach in self._detach:
            detach()
        self._detach = []

    def _on_update(self, sparsifier: Any, stats: Mapping[str, Any]) -> None:
        if stats.get("event") == "restrict":
            return
        if "skipped" not in stats:
            self.updates += 1
        if not _is_primary():
            return
        if "skipped" in stats:
            _logger.warning("Topology update at step %d skipped: %s", stats["step"], stats["skipped"])
            return
        _logger.info(
            "Topology update %d at step %d: %d weights moved  Density: %.4f  R_s: %.4f",
            self.updates,
            stats["step"],
            stats.get("replaced", 0),
            sparsifier.density,
            sparsifier.itop_rate,
        )

    def _update_summary(self, original: Callable[..., Any], bound: inspect.BoundArguments) -> Any:
        sp = self.sparsifier
        if sp is None:
            return original(*bound.args, **bound.kwargs)
        density, itop_rate = sp.density, sp.itop_rate
        train = bound.arguments.get("train_metrics") or {}
        bound.arguments["train_metrics"] = OrderedDict(
            [*train.items(), ("density", density), ("itop_rate", itop_rate)]
        )
        result = original(*bound.args, **bound.kwargs)
        epoch = bound.arguments.get("epoch")
        _logger.info(
            "Sparsity: epoch %s  Density: %.4f  R_s: %.4f  topology updates: %d  step %d",
            epoch,
            density,
            itop_rate,
            self.updates,
            sp.step,
        )
        filename = bound.arguments.get("filename")
        if filename is not None:
            self._save(Path(filename).parent / SPARSE_FOLDER, epoch, bound.arguments.get("eval_metrics"))
        return result

    # -- the sparse folder ---------------------------------------------------------------------
    def _save(self, folder: Path, epoch: Any, eval_metrics: Mapping[str, Any] | None) -> None:
        """The safetensors sparse folder of the current weights (main process, where timm writes)."""
        from .checkpoint import save_sparse
        from .serialization import CheckpointError

        args, sp = self.args, self.sparsifier
        metrics: dict[str, Any] = {"epoch": epoch}
        if eval_metrics and not getattr(args, "model_ema", False):  # EMA: timm's metrics are the EMA's
            metrics |= {f"eval_{k}": float(v) for k, v in eval_metrics.items()}
        try:
            save_sparse(
                sp.model,
                sp,
                folder,
                metrics=metrics,
                training_config={"timm_train": _recorded_args(args)} if args is not None else None,
                data_config=self._data_config(sp.model),
            )
        except (CheckpointError, ValueError, OSError) as err:  # timm's own checkpoint still follows
            _logger.error("the sparse folder %s was not written: %s", folder, err)

    def _data_config(self, model: Any) -> dict[str, Any] | None:
        """The preprocessing for the script's arguments, resolved once (``None`` when it cannot be)."""
        if self.args is None:
            return None
        if self._resolved_data_config is None:
            self._resolved_data_config = (self._resolve_data_config(model),)
        return self._resolved_data_config[0]

    def _resolve_data_config(self, model: Any) -> dict[str, Any] | None:
        import timm.data

        # the model-consistent resolution where timm has it (the model's channels over the pretrained cfg's)
        resolve = getattr(timm.data, "resolve_input_data_config", None)
        try:
            if resolve is not None:
                return dict(resolve(model, vars(self.args)))
            return dict(timm.data.resolve_data_config(vars(self.args), model=model))
        except Exception as err:  # noqa: BLE001 - a script's own arguments: the folder is written without it
            _logger.warning("the sparse folder records no preprocessing: %s", err)
            return None


def main(argv: Sequence[str] | None = None, prog: str = "python -m itop_timm.timm_train") -> None:
    """Register the sparse optimizers and run ``script`` as ``__main__`` with ``script_args`` as its argv
    (with :class:`TimmTrainHooks` installed)."""
    parser = build_parser(prog)
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    script = Path(args.script)
    if not script.is_file():
        parser.error(f"script {args.script!r} not found (give the path of timm's train.py)")

    import itop_timm  # noqa: F401 - registers the sparse optimizers with timm

    from .plugins import load_plugins

    try:
        load_plugins()
    except ValueError as err:
        parser.error(str(err))
    sys.argv = [str(script), *args.script_args]
    sys.path.insert(0, str(script.resolve().parent))  # as `python train.py` would
    with TimmTrainHooks().installed():
        runpy.run_path(str(script), run_name="__main__")


if __name__ == "__main__":
    main()
