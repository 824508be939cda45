"""The sparsity metadata's schema: the type every value has that ``load_sparse``, the card or ``info`` reads."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ..serialization import CheckpointError
from ..validation import is_int, is_number, short_repr
from .architecture import ARCHITECTURE_KEY

__all__ = ["META_SCHEMA", "check_meta_types"]


def _is_optional_number(value: Any) -> bool:
    return value is None or is_number(value)


def _is_str_map(value: Any, check: Callable[[Any], bool]) -> bool:
    return isinstance(value, dict) and all(isinstance(k, str) and check(v) for k, v in value.items())


def _is_shape(value: Any) -> bool:
    return isinstance(value, list) and all(is_int(s) and s >= 0 for s in value)


def _is_tensor_entry(entry: Any) -> bool:
    return (
        isinstance(entry, dict)
        and _is_shape(entry.get("shape"))
        and is_int(entry.get("active"))
        and is_number(entry.get("density"))
        and _is_optional_number(entry.get("itop_rate"))
    )


#: metadata key -> (required, type check); every value load_sparse, the card or ``info`` reads
META_SCHEMA: dict[str, tuple[bool, Callable[[Any], bool]]] = {
    "architecture": (True, lambda v: isinstance(v, str)),
    "method": (True, lambda v: isinstance(v, str)),
    "density": (True, is_number),
    "compact": (True, lambda v: isinstance(v, bool)),
    "has_union": (True, lambda v: isinstance(v, bool)),
    "tensors": (True, lambda v: _is_str_map(v, _is_tensor_entry)),
    "sha256": (True, lambda v: _is_str_map(v, lambda h: isinstance(h, str))),
    "dtypes": (True, lambda v: _is_str_map(v, lambda d: isinstance(d, str))),
    "shapes": (True, lambda v: _is_str_map(v, _is_shape)),
    "num_classes": (False, lambda v: v is None or is_int(v)),
    "step": (False, lambda v: v is None or is_int(v)),
    "itop_rate": (False, _is_optional_number),
    "target_density": (False, _is_optional_number),
    "metrics": (False, lambda v: _is_str_map(v, lambda m: m is None or isinstance(m, (str, int, float)))),
    "dataset": (False, lambda v: v is None or isinstance(v, str)),
    "extra": (False, lambda v: isinstance(v, dict)),
    "config_sha256": (False, lambda v: isinstance(v, str)),
    "nonfinite": (False, lambda v: _is_str_map(v, is_int)),
    "training_config": (False, lambda v: v is None or isinstance(v, dict)),
    ARCHITECTURE_KEY: (False, lambda v: isinstance(v, dict)),  # its rebuilder checks the rest
}


def check_meta_types(meta: Mapping[str, Any], path: Path) -> None:
    """Every metadata value that is read must have its documented type (else :class:`CheckpointError`)."""
    for key, (required, check) in META_SCHEMA.items():
        if key not in meta:
            if required:
                raise CheckpointError(f"{path}: invalid metadata: {key!r} is missing")
        elif not check(meta[key]):
            raise CheckpointError(f"{path}: invalid metadata: {key!r} = {short_repr(meta[key])}")
