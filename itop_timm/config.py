"""The settings of a sparse run: one :class:`SparsityConfig` from :func:`itop_timm.sparsify`, timm's sparse
optimizers and the recipe's YAML ``sparsity:`` section to the :class:`~itop_timm.Sparsifier`.

Each field is declared with :func:`~itop_timm.validation.option`: its meaning (``--help`` reads it),
what it allows and, where the library has one, its default. This is the only place those defaults
are written. A field left ``None`` is *unset*: :meth:`SparsityConfig.resolved` fills it with the
method's default (``MethodInfo.defaults``), else the library's (:data:`SPARSIFY_DEFAULTS`, read off
the fields). Values that are set are validated when the config is built; the resolved config is
validated once more as a whole (the prune-rate schedule needs ``total_steps``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from types import MappingProxyType
from typing import Any

from .kernels.modes import COMPUTE_MODES
from .registry import DISTRIBUTIONS, METHODS, SCHEDULES
from .schedules import create_schedule
from .structure import StructureRule, build_rule, check_rule_options
from .validation import SEED, UNIT_INTERVAL, UNSET, Range, check_options, option, short_repr

__all__ = ["SparsityConfig", "SPARSIFY_DEFAULTS", "option", "UNSET"]


def _patterns(value: str | Iterable[str] | None) -> tuple[str, ...] | None:
    if value is None:
        return None
    patterns = (value,) if isinstance(value, str) else tuple(value)
    if not all(isinstance(p, str) for p in patterns):
        raise ValueError(f"must be fnmatch patterns (strings), got {short_repr(value)}")
    return patterns


def _options_mapping(value: Any) -> dict[str, Any]:
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise ValueError(f"must be a mapping of option names, got {short_repr(value)}")
    return dict(value)


@dataclass(frozen=True)
class SparsityConfig:
    """Settings of a sparse run (see :func:`itop_timm.sparsify`); ``None`` means unset."""

    method: str = option("registered method (list_methods()): static, set, rigl, snfs, unfired, ...", "rigl")
    density: float = option("overall fraction of sparse weights kept, in (0, 1]", 0.1, range=UNIT_INTERVAL)
    distribution: str | None = option(
        "layer densities: erk, er, uniform (list_distributions())", library_default="erk"
    )
    update_interval: int | None = option(
        "ΔT: optimizer steps between topology updates",
        library_default=100,
        range=Range(int, 1, unit="optimizer steps"),
    )
    prune_rate: float | None = option(
        "p0: initial fraction of each layer's active weights replaced per update",
        library_default=0.5,
        range=UNIT_INTERVAL,
    )
    final_prune_rate: float | None = option(
        "the prune-rate schedule's end value", library_default=0.005, range=Range(float, 0, 1)
    )
    prune_schedule: str | None = option(
        "decay of the prune rate: cosine, linear, constant (list_schedules())", library_default="cosine"
    )
    total_steps: int | None = option(
        "T: optimizer steps of the whole run (decaying schedules need it)", range=Range(int, 1, optional=True)
    )
    stop_step: int | None = option(
        "last step at which a topology update may happen (None: until the end)",
        range=Range(int, 0, optional=True),
    )
    seed: int | None = option(
        "seed of the initial masks and every random choice", library_default=0, range=SEED
    )
    include: tuple[str, ...] | None = option(
        "fnmatch patterns of the sparse tensors (None: every conv/linear weight)", check=_patterns
    )
    exclude: tuple[str, ...] | None = option(
        "fnmatch patterns of tensors kept dense", library_default=(), check=_patterns
    )
    compute: str = option(
        "how sparse layers compute: masked (dense tensors with masks), sparse (CPU kernels over the active "
        "weights only, forward and backward), auto (sparse where a timing at the start finds it faster)",
        "masked",
        choices=COMPUTE_MODES,
    )
    method_options: dict[str, Any] | None = option(
        "the method's own settings, e.g. {channel_sparsity: 0.3} for chase, {gamma_sal: 0.3} for srigl "
        "(itop-timm methods lists them)",
        library_default={},
        check=_options_mapping,
    )

    def __post_init__(self) -> None:
        self._normalise_and_check()

    def _normalise_and_check(self) -> None:
        """Validate every value that is set (names lower-cased, patterns as tuples, numbers by their
        declared ranges, method options by the method's rule)."""
        values = check_options(SparsityConfig, self.library_fields())
        info = self.method_info  # raises for an unknown method
        if info is not None:
            values["method"] = info.name
        for name, registry in (("distribution", DISTRIBUTIONS), ("prune_schedule", SCHEDULES)):
            if values[name] is not None:
                registry.get(values[name])  # raises for unknown names, listing the known ones
                values[name] = values[name].lower()
        if values["method_options"] is not None and info is not None:
            values["method_options"] = check_rule_options(info.structure, info.name, values["method_options"])
        for name, value in values.items():
            object.__setattr__(self, name, value)

    def structure_rule(self) -> StructureRule | None:
        """The method's structure rule built from ``method_options`` (``None`` for an unstructured
        method), built once per config: the sparsifier binds a copy of it, and what the rule learns
        from a model (Chase's channel groups) is kept for every later copy of the same config."""
        rule = self.__dict__.get("_structure_rule", UNSET)
        if rule is UNSET:
            info = self.method_info
            rule = None if info is None else build_rule(info.structure, info.name, self.method_options or {})
            object.__setattr__(self, "_structure_rule", rule)  # a cache, not a field
        return rule

    def replace(self, **changes: Any) -> SparsityConfig:
        """``dataclasses.replace(self, **changes)`` that keeps the built structure rule (and what it
        learnt from a model, e.g. Chase's trace) when the method and its options stay the same."""
        new = dataclasses.replace(self, **changes)
        rule = self.__dict__.get("_structure_rule", UNSET)
        if rule is not UNSET and (new.method, new.method_options) == (self.method, self.method_options):
            object.__setattr__(new, "_structure_rule", rule)
        return new

    @property
    def method_info(self) -> Any:
        """The registered :class:`~itop_timm.MethodInfo` (``ValueError`` listing the known ones for an
        unknown name)."""
        return METHODS.get(getattr(self.method, "name", self.method))

    @property
    def is_resolved(self) -> bool:
        """Whether every field with a library default is set."""
        return all(getattr(self, name) is not None for name in SPARSIFY_DEFAULTS)

    def resolved(self) -> SparsityConfig:
        """A copy with every unset field filled: the method's defaults first, then :data:`SPARSIFY_DEFAULTS`;
        validated as a whole (a dynamic method's schedule needs valid rates and ``total_steps``)."""
        info = self.method_info
        defaults = {**SPARSIFY_DEFAULTS, **info.defaults}
        filled = {name: v for name, v in defaults.items() if getattr(self, name) is None and v is not None}
        config = dataclasses.replace(self, **filled) if filled else self
        if info.dynamic:  # the schedule checks final <= initial and that a decay knows total_steps
            create_schedule(
                config.prune_schedule, config.prune_rate, config.final_prune_rate, config.total_steps
            )
        return config

    @classmethod
    def resolve(cls, method: Any = None, **given: Any) -> SparsityConfig:
        """``SparsityConfig(method=method, **given).resolved()``: explicit (non-``None``) values win over
        the method's defaults, which win over :data:`SPARSIFY_DEFAULTS`; ``None`` (also for ``method``
        and ``density``) takes the fields' defaults. Unknown names raise ``ValueError`` listing the
        allowed ones."""
        known = [f.name for f in fields(SparsityConfig)]
        unknown = sorted(set(given) - set(known))
        if unknown:
            raise ValueError(f"unknown sparsity setting(s) {unknown}; allowed: {known}")
        given["method"] = method
        return SparsityConfig(**{k: v for k, v in given.items() if v is not None}).resolved()

    def library_fields(self) -> dict[str, Any]:
        """The values of :class:`SparsityConfig`'s own fields (a subclass's extra fields left out)."""
        return {f.name: getattr(self, f.name) for f in fields(SparsityConfig)}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (patterns as lists)."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        for key in ("include", "exclude"):
            d[key] = list(d[key]) if d[key] is not None else None
        if d["method_options"] is not None:
            d["method_options"] = {
                k: list(v) if isinstance(v, tuple) else v for k, v in d["method_options"].items()
            }
        return d


#: Values used for settings that neither the caller nor the method's defaults set (read off the
#: ``library_default`` of :class:`SparsityConfig`'s fields: the single source of these defaults).
SPARSIFY_DEFAULTS: Mapping[str, Any] = MappingProxyType(
    {f.name: f.metadata["library_default"] for f in fields(SparsityConfig) if "library_default" in f.metadata}
)
