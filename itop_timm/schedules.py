"""Prune-rate schedules: the fraction of active weights replaced at a topology update, as a function of
the optimizer step.

A schedule factory is registered by name and called as ``factory(initial, final, total_steps)``; it
returns a callable ``rate(step) -> float``. ``cosine`` is ITOP's/RigL's default (REFERENCE §1):
``p_t = final + (initial - final) * (1 + cos(pi * t / T)) / 2``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from .registry import SCHEDULES

__all__ = [
    "PruneRateSchedule",
    "ScheduleInfo",
    "create_schedule",
    "register_schedule",
    "schedule_needs_total_steps",
]

PruneRateSchedule = Callable[[int], float]


@dataclass(frozen=True)
class CosineSchedule:
    """Cosine decay from ``initial`` at step 0 to ``final`` at ``total_steps`` (held after)."""

    initial: float
    final: float
    total_steps: int

    def __call__(self, step: int) -> float:
        t = min(max(step, 0), self.total_steps)
        return (
            self.final + (self.initial - self.final) * (1.0 + math.cos(math.pi * t / self.total_steps)) / 2.0
        )


@dataclass(frozen=True)
class LinearSchedule:
    """Linear decay from ``initial`` at step 0 to ``final`` at ``total_steps`` (held after)."""

    initial: float
    final: float
    total_steps: int

    def __call__(self, step: int) -> float:
        t = min(max(step, 0), self.total_steps)
        return self.initial + (self.final - self.initial) * t / self.total_steps


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


register_schedule(ScheduleInfo("cosine", CosineSchedule, True, "cosine decay to the final rate (ITOP, RigL)"))
register_schedule(ScheduleInfo("linear", LinearSchedule, True, "linear decay to the final rate"))
register_schedule(
    ScheduleInfo(
        "constant", lambda initial, final, total_steps: ConstantSchedule(initial), False, "fixed rate"
    )
)


def schedule_needs_total_steps(name: str) -> bool:
    """Whether the schedule ``name`` decays over ``total_steps`` (and so needs it)."""
    return SCHEDULES.get(name).needs_total_steps


def create_schedule(
    name: str, initial: float, final: float = 0.005, total_steps: int | None = None
) -> PruneRateSchedule:
    """Build the registered schedule ``name``; ``ValueError`` on unknown names or bad arguments."""
    info = SCHEDULES.get(name)
    if isinstance(initial, bool) or not isinstance(initial, (int, float)) or not (0.0 < initial <= 1.0):
        raise ValueError(f"prune_rate must be in (0, 1], got {initial!r}")
    if isinstance(final, bool) or not isinstance(final, (int, float)) or not (0.0 <= final <= initial):
        raise ValueError(f"final prune rate must be in [0, prune_rate={initial}], got {final!r}")
    if info.needs_total_steps:
        if total_steps is None:
            raise ValueError(
                f"prune_schedule={name!r} decays over training: pass total_steps (number of optimizer steps)"
            )
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
            raise ValueError(f"total_steps must be a positive integer, got {total_steps!r}")
    return info.factory(float(initial), float(final), total_steps)
