"""Sparse-training methods: each a pair of score functions plus a few defaults, one file per method.

A topology update removes, per layer, the ``k`` active weights with the *lowest* drop score and then
activates the ``k`` inactive positions with the *highest* grow score (REFERENCE §1,
:mod:`itop_timm.topology`). A method is only that pair, registered by name (:mod:`.base`); a
structured method adds its :class:`~itop_timm.structure.StructureRule` beside them:

=========  ===============  ===========================================================
method     drop score       grow score
=========  ===============  ===========================================================
static     (no updates)     (no updates)
set        ``|w|``          uniform random (SET)
rigl       ``|w|``          ``|dense gradient|`` of the last backward (RigL)
snfs       ``|w|``          ``|EMA of dense gradients|`` (sparse momentum, see :mod:`.snfs`)
unfired    ``|w|``          random among never-active weights first (ITOP, maximises R_s)
chase      ``|w|``          ``|dense gradient|`` within channels still alive (:mod:`.chase`)
srigl      ``|w|``          ``|dense gradient|``, constant fan-in per row (:mod:`.srigl`)
=========  ===============  ===========================================================

Third-party methods (``MethodInfo`` and ``register_method`` are also on the package root)::

    itop_timm.register_method(itop_timm.MethodInfo(
        "grad_times_w", drop_score=lambda l: (l.weight * l.grad).abs(), grow_score=lambda l: l.grad.abs(),
        defaults={"update_interval": 50}, needs_grad=True))
"""

from ..topology import LayerView
from . import chase, rigl, snfs, srigl, static, unfired
from . import set as set_  # noqa: F401  (the module registering "set")
from .base import MethodInfo, ScoreFn, get_method, register_method
from .scores import grad_ema_score, gradient_score, magnitude_score, random_score, unfired_score

__all__ = [
    "LayerView",
    "MethodInfo",
    "ScoreFn",
    "register_method",
    "get_method",
    "magnitude_score",
    "gradient_score",
    "grad_ema_score",
    "random_score",
    "unfired_score",
    "chase",
    "rigl",
    "snfs",
    "srigl",
    "static",
    "unfired",
]
