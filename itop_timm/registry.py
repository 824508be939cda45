"""Name -> entry tables for sparse-training methods, layer-density distributions and prune-rate schedules.

Styled after timm's registries (``timm/models/_registry.py``, ``timm/optim/_optim_factory.py``): each
entry is a small frozen dataclass or callable registered under a lower-case name, ``list_*`` accepts
fnmatch wildcards, and looking up an unknown name raises a ``ValueError`` that lists what is allowed.
The three registry objects below are the package's only module-level mutable state.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable
from fnmatch import fnmatch
from typing import Generic, TypeVar

__all__ = [
    "Registry",
    "METHODS",
    "DISTRIBUTIONS",
    "SCHEDULES",
    "list_methods",
    "list_distributions",
    "list_schedules",
]

T = TypeVar("T")


class Registry(Generic[T]):
    """A table of named entries of one kind (``kind`` names it in error messages).

    ``builtins`` names the module that registers the built-in entries; it is imported on the first
    look-up, so importing the package stays cheap (no torch) and a table is never read half-filled.
    """

    def __init__(self, kind: str, builtins: str | None = None) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}
        self._builtins = builtins

    def _load_builtins(self) -> None:
        """Import the module of the built-in entries once (it registers them), before a look-up."""
        if self._builtins is not None:
            module, self._builtins = self._builtins, None  # cleared first: that module registers here
            try:
                importlib.import_module(module)
            except BaseException:
                self._builtins = module  # a failed import is retried (and fails loudly) next time
                raise

    def register(self, name: str, entry: T, *, overwrite: bool = False) -> T:
        """Add ``entry`` under ``name`` (lower-cased); refuse to replace an entry unless ``overwrite``."""
        key = name.lower()
        if not key or not key.replace("_", "").replace("-", "").isalnum():
            raise ValueError(f"invalid {self.kind} name {name!r}: use letters, digits, '_' or '-'")
        if key in self._entries and not overwrite:
            raise ValueError(f"{self.kind} {key!r} is already registered (pass overwrite=True to replace it)")
        self._entries[key] = entry
        return entry

    def get(self, name: str) -> T:
        """Return the entry for ``name``; an unknown name raises ``ValueError`` listing the known ones."""
        if not isinstance(name, str):
            raise ValueError(f"{self.kind} name must be a string, got {name!r} ({type(name).__name__})")
        self._load_builtins()
        key = name.lower()
        if key not in self._entries:
            raise ValueError(f"unknown {self.kind} {name!r}; allowed: {', '.join(self.names())}")
        return self._entries[key]

    def names(self, filter: str | Iterable[str] = "", exclude_filters: Iterable[str] = ()) -> list[str]:
        """Sorted names, optionally restricted by fnmatch ``filter`` pattern(s) and ``exclude_filters``."""
        self._load_builtins()
        names = sorted(self._entries)
        if filter:
            patterns = [filter] if isinstance(filter, str) else list(filter)
            names = [n for n in names if any(fnmatch(n, p) for p in patterns)]
        for pattern in exclude_filters:
            names = [n for n in names if not fnmatch(n, pattern)]
        return names

    def __contains__(self, name: object) -> bool:
        self._load_builtins()
        return isinstance(name, str) and name.lower() in self._entries

    def unregister(self, name: str) -> None:
        """Remove ``name`` (mainly for tests and for plugins that replace an entry)."""
        self._entries.pop(name.lower(), None)


# Entries are filled in by the modules that define them (methods/, densities.py, schedules.py), imported
# at the first look-up.
METHODS: Registry = Registry("method", "itop_timm.methods")
DISTRIBUTIONS: Registry[Callable] = Registry("distribution", "itop_timm.densities")
SCHEDULES: Registry[Callable] = Registry("prune-rate schedule", "itop_timm.schedules")


def list_methods(filter: str | Iterable[str] = "", exclude_filters: Iterable[str] = ()) -> list[str]:
    """Names of the registered sparse-training methods (``static``, ``set``, ``rigl``, ``snfs``, ``unfired``, ...)."""
    return METHODS.names(filter, exclude_filters)


def list_distributions(filter: str | Iterable[str] = "", exclude_filters: Iterable[str] = ()) -> list[str]:
    """Names of the registered layer-density distributions (``uniform``, ``er``, ``erk``, ...)."""
    return DISTRIBUTIONS.names(filter, exclude_filters)


def list_schedules(filter: str | Iterable[str] = "", exclude_filters: Iterable[str] = ()) -> list[str]:
    """Names of the registered prune-rate schedules (``cosine``, ``linear``, ``constant``, ...)."""
    return SCHEDULES.names(filter, exclude_filters)
