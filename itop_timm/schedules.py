"""Prune-rate schedules: the fraction of active weights replaced at a topology update, as a function of
the optimizer step.

A schedule factory is registered by name and called as ``factory(initial, final, total_steps)``; it
returns a callable ``rate(step) -> float``. ``cosine`` is ITOP's/RigL's default (REFERENCE §1):
``p_t = final + (initial - final) * (1 + cos(pi * t / T)) / 2``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

from .registry import SCHEDULES
from .validation import UNIT_INTERVAL, Range

__all__ = [
    "PruneRateSchedule",
    "ScheduleInfo",
    "create_schedule",
    "register_schedule",
    "schedule_needs_total_steps",
]

PruneRateSchedule = Callable[[int], float]


def cosine_curve(initial: float, final: float, t: int, total_steps: int) -> float:
    """Cosine decay from ``initial`` at step 0 to ``final`` at ``total_steps``."""
    return final + (initial - final) * (1.0 + math.cos(math.pi * t / total_steps)) / 2.0


def linear_curve(initial: float, final: float, t: int, total_steps: int) -> float:
    """Linear decay from ``initial`` at step 0 to ``final`` at ``total_steps``."""
    return initial + (final - initial) * t / total_steps


@dataclass(frozen=True)
class DecaySchedule:
    """``curve(initial, final, t, total_steps)`` at ``t = step`` clamped to ``[0, total_steps]`` (held after)."""

    initial: float
    final: float
    total_steps: int
    curve: Callable[[float, float, int, int], float]

    def __call__(self, step: int) -> float:
        return self.curve(self.initial, self.final, min(max(step, 0), self.total_steps), self.total_steps)


@dataclass(frozen=True)
class ConstantSchedule:
    """Always ``initial``."""

    initial: float

    def __call__(self, step: int) -> float:
        return self.initial


@dataclass(frozen=True)
class ScheduleInfo:
    """A registered schedule: ``factory(initial, final, total_steps) -> rate(step)``."""

    name: str
    factory: Callable[[float, float, int | None], PruneRateSchedule]
    needs_total_steps: bool
    description: str = ""


def register_schedule(info: ScheduleInfo, *, overwrite: bool = False) -> ScheduleInfo:
    """Register a prune-rate schedule (see :class:`ScheduleInfo`)."""
    return SCHEDULES.register(info.name, info, overwrite=overwrite)


register_schedule(
    ScheduleInfo(
        "cosine",
        functools.partial(DecaySchedule, curve=cosine_curve),
        True,
        "cosine decay to the final rate (ITOP, RigL)",
    )
)
register_schedule(
    ScheduleInfo(
        "linear", functools.partial(DecaySchedule, curve=linear_curve), True, "linear decay to the final rate"
    )
)
register_schedule(
    ScheduleInfo(
        "constant", lambda initial, final, total_steps: ConstantSchedule(initial), False, "fixed rate"
    )
)


def schedule_needs_total_steps(name: str) -> bool:
    """Whether the schedule ``name`` decays over ``total_steps`` (and so needs it)."""
    return SCHEDULES.get(name).needs_total_steps


def create_schedule(
    name: str, initial: float, final: float | None = None, total_steps: int | None = None
) -> PruneRateSchedule:
    """Build the registered schedule ``name`` from ``initial`` to ``final`` over ``total_steps`` (a decaying
    schedule needs both; a constant one ignores them); ``ValueError`` on unknown names or bad arguments."""
    info = SCHEDULES.get(name)
    initial = UNIT_INTERVAL.check("prune_rate", initial)
    if info.needs_total_steps:
        for what, value in (("final_prune_rate", final), ("total_steps", total_steps)):
            if value is None:
                raise ValueError(
                    f"prune_schedule={name!r} decays over training: pass {what}"
                    + (" (number of optimizer steps)" if what == "total_steps" else "")
                )
        Range(int, 1).check("total_steps", total_steps)
    final = (
        initial
        if final is None
        else Range(float, 0, initial).check("final prune rate (<= prune_rate)", final)
    )
    return info.factory(initial, final, total_steps)
