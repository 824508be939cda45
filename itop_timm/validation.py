"""Declared settings and the one validator behind them.

A setting is a dataclass field made with :func:`option`: its meaning (``metadata["help"]``, which
``--help`` and ``itop-timm methods`` print), its default and what it allows — a numeric
:class:`Range`, a tuple of ``choices`` or a ``check`` function. :func:`check_options` validates values
against those declarations generically (the fields of :class:`~itop_timm.SparsityConfig`, a structure
rule's options), so no setting writes its own "number in range, not a bool" test. Every failure reads
``"<name> must be <what is allowed>, got <value>"`` and is raised before anything is modified.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "Range",
    "SEED",
    "UNIT_INTERVAL",
    "UNSET",
    "is_int",
    "is_number",
    "option",
    "check_options",
    "short_repr",
]

#: Marker in a field's metadata: the field has no library default (``None`` stays ``None``).
UNSET = object()


def is_int(value: object) -> bool:
    """Whether ``value`` is an ``int`` (``bool`` is not)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    """Whether ``value`` is an ``int`` or a ``float`` (``bool`` is not; NaN is)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _bound(value: float) -> str:
    """A range's bound as written: integers in full (``4294967295``), other numbers as ``:g``."""
    return str(value) if is_int(value) else f"{value:g}"


@dataclass(frozen=True)
class Range:
    """Allowed values of a numeric setting.

    Attributes:
        kind: ``int`` (integers only) or ``float`` (any real number; returned as ``float``).
        low, high: bounds (``None``: unbounded on that side).
        low_open, high_open: whether a bound itself is excluded.
        optional: ``None`` is allowed too (meaning "unset" / "no limit").
        unit: a word or two on what the number counts, shown in errors (e.g. ``"optimizer steps"``).
    """

    kind: type = float
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    optional: bool = False
    unit: str = ""

    def describe(self) -> str:
        """What is allowed, in words: ``"an integer >= 1"``, ``"in (0, 1]"``, ``"> 0"``, ``"... or null"``."""
        low = None if self.low is None else f"{'>' if self.low_open else '>='} {_bound(self.low)}"
        high = None if self.high is None else f"{'<' if self.high_open else '<='} {_bound(self.high)}"
        if low and high:
            text = f"in {'(' if self.low_open else '['}{_bound(self.low)}, {_bound(self.high)}"
            text += ")" if self.high_open else "]"
            text = f"an integer {text}" if self.kind is int else text
        elif self.kind is int:
            text = (
                "a non-negative integer"
                if low == ">= 0"
                else " ".join(filter(None, ["an integer", low, high]))
            )
        else:
            text = low or high or "a number"
        if self.unit:
            text += f" ({self.unit})"
        return text + (" or null" if self.optional else "")

    def contains(self, value: Any) -> bool:
        """Whether ``value`` is allowed."""
        if value is None:
            return self.optional
        if not (is_int(value) if self.kind is int else is_number(value) and not math.isnan(value)):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def check(self, name: str, value: Any) -> Any:
        """``value`` (a ``float`` for ``kind=float``), or ``ValueError`` naming ``name``, the range and the value."""
        if not self.contains(value):
            raise ValueError(f"{name} must be {self.describe()}, got {short_repr(value)}")
        return value if value is None or self.kind is int else float(value)


#: A fraction in (0, 1]: densities, sampling probabilities.
UNIT_INTERVAL = Range(float, 0, 1, low_open=True)

#: A seed: what every generator a run seeds accepts (NumPy's legacy seeding, which Accelerate's
#: ``set_seed`` uses, takes 32-bit unsigned integers; torch's generators take more).
SEED = Range(int, 0, 2**32 - 1)


def short_repr(value: Any, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters (errors never print unbounded values)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def option(
    help: str,
    default: Any = None,
    *,
    library_default: Any = UNSET,
    factory: Callable[[], Any] | None = None,
    range: Range | None = None,
    choices: tuple[str, ...] | None = None,
    check: Callable[[Any], Any] | None = None,
) -> Any:
    """A dataclass field declaring a setting.

    Args:
        help: its meaning, one line.
        default: the field's default (``None``: unset, see ``library_default``).
        library_default: for a field defaulting to ``None`` = unset, the value the library uses instead.
        factory: a default factory instead of ``default``.
        range: allowed numbers (``None`` always passes for a field whose default is ``None``).
        choices: allowed strings (matched case-insensitively, returned lower-cased).
        check: ``check(value) -> value`` raising ``ValueError`` with what is allowed, for anything else.
    """
    metadata: dict[str, Any] = {"help": help}
    if library_default is not UNSET:
        metadata["library_default"] = library_default
    for key, value in (("range", range), ("choices", choices), ("check", check)):
        if value is not None:
            metadata[key] = value
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def _check_one(f: dataclasses.Field, name: str, value: Any) -> Any:
    if value is None and f.default is None:
        return None  # unset
    meta = f.metadata
    if "range" in meta:
        value = meta["range"].check(name, value)
    if "choices" in meta:
        allowed = meta["choices"]
        if not isinstance(value, str) or value.lower() not in allowed:
            listed = " or ".join(filter(None, [", ".join(map(repr, allowed[:-1])), repr(allowed[-1])]))
            raise ValueError(f"{name} must be {listed}, got {short_repr(value)}")
        value = value.lower()
    if "check" in meta:
        try:
            value = meta["check"](value)
        except ValueError as err:
            raise ValueError(f"{name} {err}") from None
    return value


def check_options(cls: type, values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``values`` checked against the :func:`option` declarations of dataclass ``cls``'s fields (unknown
    names are not checked here); returns them normalised (floats, lower-cased choices). Error messages
    name each value as ``prefix + field name``."""
    declared = {f.name: f for f in dataclasses.fields(cls)}
    return {
        key: _check_one(declared[key], prefix + key, value) if key in declared else value
        for key, value in values.items()
    }
