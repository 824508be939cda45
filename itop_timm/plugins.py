"""Plugins: code outside itop_timm that registers methods, distributions or schedules, so that the recipe,
the CLI and timm's train.py can use them by name.

Two ways in, both loaded by :func:`load_plugins`:

* the entry-point group ``itop_timm.plugins`` of an installed package, naming modules, e.g. in its
  ``pyproject.toml``::

      [project.entry-points."itop_timm.plugins"]
      my_methods = "my_pkg.methods"

  loaded once by each entry point: the recipe (``recipes/train.py``, ``itop-timm train``), the other
  ``itop-timm`` commands and the ``timm-train`` launcher, before they read any name;
* the recipe key ``run.plugins: [my_pkg.methods]``: modules imported by name when the config is
  resolved (:meth:`itop_timm.training.config.TrainConfig.from_dict`), before its names are checked.

A plugin module registers at import time with :func:`itop_timm.register_method`,
:func:`itop_timm.register_distribution` or :func:`itop_timm.register_schedule`; a method's timm
optimizer names (``<method>_sgd``, ...) follow on their own (:mod:`itop_timm.timm_optimizers`).
Loading is importing, so each plugin runs once per process however often it is loaded.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Iterable
from importlib.metadata import entry_points

__all__ = ["ENTRY_POINT_GROUP", "load_plugins"]

_logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "itop_timm.plugins"


def _import(module: object, source: str) -> None:
    if not isinstance(module, str) or not module or ":" in module:
        raise ValueError(f"{source}: a plugin is a module path such as 'my_pkg.methods', got {module!r}")
    try:
        importlib.import_module(module)
    except Exception as err:
        raise ValueError(
            f"{source}: cannot import plugin module {module!r} ({type(err).__name__}: {err})"
        ) from err


def load_plugins(modules: Iterable[str] = (), *, installed: bool = True) -> list[str]:
    """Import the ``installed`` plugins (entry-point group ``itop_timm.plugins``), then ``modules``.

    Returns the module names imported. Raises ``ValueError`` naming a plugin that cannot be imported.
    """
    names = []
    if installed:
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            _import(ep.value, f"entry point {ep.name!r} of group {ENTRY_POINT_GROUP!r}")
            names.append(ep.value)
    for module in modules:
        _import(module, "run.plugins")
        names.append(module)
    if names:
        _logger.info("itop_timm plugins: %s", names)
    return names
