"""The settings of a sparse run: one :class:`SparsityConfig` from :func:`itop_timm.sparsify`, timm's sparse
optimizers and the recipe's YAML ``sparsity:`` section to the :class:`~itop_timm.Sparsifier`.

Each field carries its meaning (``--help`` reads it) and, where the library has one, its default. A
field left ``None`` is *unset*: :meth:`SparsityConfig.resolved` fills it with the method's default
(``MethodInfo.defaults``), else the library's (:data:`SPARSIFY_DEFAULTS`, read off the fields). Values
that are set are validated when the config is built; the resolved config is validated once more as a
whole (the prune-rate schedule needs ``total_steps``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Any

from .densities import validate_density
from .methods import MethodInfo, get_method
from .registry import DISTRIBUTIONS
from .schedules import create_schedule
from .structure import StructureRule, rule_options

__all__ = ["SparsityConfig", "SPARSIFY_DEFAULTS", "option", "UNSET"]

#: Marker in a field's metadata: the field has no library default (``None`` stays ``None``).
UNSET = object()


def option(help: str, default: Any = None, *, library_default: Any = UNSET, factory: Any = None) -> Any:
    """A dataclass field with its meaning (``metadata["help"]``) and, for fields that default to
    ``None`` = unset, the value the library uses instead (``metadata["library_default"]``)."""
    metadata = {"help": help}
    if library_default is not UNSET:
        metadata["library_default"] = library_default
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _patterns(value: str | Iterable[str] | None) -> tuple[str, ...] | None:
    if value is None:
        return None
    return (value,) if isinstance(value, str) else tuple(value)


@dataclass(frozen=True)
class SparsityConfig:
    """Settings of a sparse run (see :func:`itop_timm.sparsify`); ``None`` means unset."""

    method: str = option("registered method (list_methods()): static, set, rigl, snfs, unfired, ...", "rigl")
    density: float = option("overall fraction of sparse weights kept, in (0, 1]", 0.1)
    distribution: str | None = option(
        "layer densities: erk, er, uniform (list_distributions())", library_default="erk"
    )
    update_interval: int | None = option("ΔT: optimizer steps between topology updates", library_default=100)
    prune_rate: float | None = option(
        "p0: initial fraction of each layer's active weights replaced per update", library_default=0.5
    )
    final_prune_rate: float | None = option("the prune-rate schedule's end value", library_default=0.005)
    prune_schedule: str | None = option(
        "decay of the prune rate: cosine, linear, constant (list_schedules())", library_default="cosine"
    )
    total_steps: int | None = option("T: optimizer steps of the whole run (decaying schedules need it)")
    stop_step: int | None = option("last step at which a topology update may happen (None: until the end)")
    seed: int | None = option("seed of the initial masks and every random choice", library_default=0)
    include: tuple[str, ...] | None = option(
        "fnmatch patterns of the sparse tensors (None: every conv/linear weight)"
    )
    exclude: tuple[str, ...] | None = option("fnmatch patterns of tensors kept dense", library_default=())
    method_options: dict[str, Any] | None = option(
        "the method's own settings, e.g. {channel_sparsity: 0.3} for chase, {gamma_sal: 0.3} for srigl "
        "(itop-timm methods lists them)",
        library_default={},
    )

    def __post_init__(self) -> None:
        self._normalise_and_check()

    def _normalise_and_check(self) -> None:
        """Validate every value that is set (names lower-cased, patterns as tuples)."""
        set_ = object.__setattr__
        if self.method_info is not None:
            set_(self, "method", self.method_info.name)
        set_(self, "density", validate_density(self.density))
        if self.distribution is not None:
            DISTRIBUTIONS.get(self.distribution)  # raises for unknown names
            set_(self, "distribution", self.distribution.lower())
        set_(self, "include", _patterns(self.include))
        set_(self, "exclude", _patterns(self.exclude))
        if self.update_interval is not None and (
            not _is_int(self.update_interval) or self.update_interval < 1
        ):
            raise ValueError(
                f"update_interval must be an integer >= 1 (optimizer steps), got {self.update_interval!r}"
            )
        if self.total_steps is not None and (not _is_int(self.total_steps) or self.total_steps < 1):
            raise ValueError(f"total_steps must be a positive integer or None, got {self.total_steps!r}")
        if self.stop_step is not None and (not _is_int(self.stop_step) or self.stop_step < 0):
            raise ValueError(f"stop_step must be a non-negative integer or None, got {self.stop_step!r}")
        if self.seed is not None and not _is_int(self.seed):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if self.method_options is not None:
            if not isinstance(self.method_options, Mapping) or not all(
                isinstance(k, str) for k in self.method_options
            ):
                raise ValueError(
                    f"method_options must be a mapping of option names, got {self.method_options!r}"
                )
            set_(self, "method_options", dict(self.method_options))
            if self.method_info is not None:  # the method's rule validates each value
                self.structure_rule()

    def structure_rule(self) -> StructureRule | None:
        """A new instance of the method's structure rule built from ``method_options`` (``None`` for an
        unstructured method); unknown options or bad values raise ``ValueError`` naming them."""
        info = self.method_info
        return rule_options(info.structure if info else None, self.method, self.method_options or {})

    @property
    def method_info(self) -> MethodInfo | None:
        """The registered method (``ValueError`` listing the known ones for an unknown name)."""
        return get_method(self.method)

    @property
    def is_resolved(self) -> bool:
        """Whether every field with a library default is set."""
        return all(getattr(self, name) is not None for name in SPARSIFY_DEFAULTS)

    def resolved(self) -> SparsityConfig:
        """A copy with every unset field filled: the method's defaults first, then :data:`SPARSIFY_DEFAULTS`;
        validated as a whole (a dynamic method's schedule needs valid rates and ``total_steps``)."""
        info = self.method_info
        known = {f.name for f in fields(SparsityConfig)}
        filled: dict[str, Any] = {}
        for name, library in SPARSIFY_DEFAULTS.items():
            if getattr(self, name) is None:
                filled[name] = info.defaults.get(name, library)
        for name, value in info.defaults.items():  # method defaults without a library default
            if name in known and name not in SPARSIFY_DEFAULTS and getattr(self, name) is None:
                filled[name] = value
        config = dataclasses.replace(self, **filled) if filled else self
        if info.dynamic:  # validates prune_rate, final_prune_rate, schedule name and total_steps
            create_schedule(
                config.prune_schedule, config.prune_rate, config.final_prune_rate, config.total_steps
            )
        return config

    @classmethod
    def resolve(cls, method: str | MethodInfo = "rigl", **given: Any) -> SparsityConfig:
        """``SparsityConfig(method=..., **given).resolved()``: explicit (non-``None``) values win over the
        method's defaults, which win over :data:`SPARSIFY_DEFAULTS`. Unknown names raise ``ValueError``."""
        known = {f.name for f in fields(SparsityConfig)}
        unknown = sorted(set(given) - known)
        if unknown:
            raise ValueError(f"unknown sparsity setting(s) {unknown}; allowed: {sorted(known - {'method'})}")
        name = method.name if isinstance(method, MethodInfo) else method
        return SparsityConfig(method=name, **given).resolved()

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
